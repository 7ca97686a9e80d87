"""A finished run beside GPT-3: its training FLOPs per token and what GPT-3's count costs.

It reads a scenario and uses the full-size work, the chip and the footprint, so it belongs to
scale, above minigpt.energy, whose Settings it builds on (through the footprint).
"""

from minigpt import units
from minigpt.errors import ConfigError
from minigpt.scale import chips, footprint, training, work
from minigpt.scale.scenario import load as load_scenario


def gpt3_projection_line(tokens_trained: int, rows: list[dict], joules: float | None = None,
                         scenario: str = "gpt3-175b") -> str:
    """One line: this run's training FLOPs per token beside GPT-3 175B's counted the same way (our
    closed form), and what that count over its 300B tokens costs on the scenario's hardware
    (Patterson et al. 2021's V100 row by default); with joules, also at this run's J per FLOP."""
    if tokens_trained <= 0:
        raise ValueError("tokens_trained must be positive")
    flops = sum(r["flops"] for r in rows if r["phase"] in ("forward", "backward", "optimizer"))
    scn = load_scenario(scenario)
    a, D = work.arch_of(scn), scn.get("training", "tokens")
    chip = chips.chip_of(scn)
    if a is None or D is None or chip.achieved is None:
        raise ConfigError(f"{scn.where('model')}: a projection needs an architecture, "
                          f"[training] tokens and a rate per chip")
    big = work.training_step_flops(a, 1, a.block_size) * D / a.block_size  # FLOPs, closed form
    cost = training.training_costs(big, chip, footprint.settings_of(scn))
    mine = f"this run {flops / tokens_trained:.3g} FLOP/token over {tokens_trained:,} tokens"
    if joules and flops:
        per_flop = joules / flops  # J/FLOP on this machine
        gwh = units.gwh(per_flop * big)
        mine += f" ({per_flop / units.PJ:.3g} pJ/FLOP: GPT-3 at that rate {gwh:,.0f} GWh)"
    return (f"at GPT-3 scale: {mine}; GPT-3 175B counted the same way: "
            f"{big / D:.3g} FLOP/token × {D:.3g} tokens = {big:.3g} "
            f"FLOPs, on {chip.describe()}: {cost.days:.3g} days, "
            f"{cost.footprint.energy_mwh:,.0f} MWh, {cost.footprint.co2_tonnes:,.0f} tCO2e")
