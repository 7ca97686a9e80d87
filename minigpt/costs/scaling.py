"""Scaling: what a scenario (minigpt.costs.scenario) costs at full size, training and serving.

Training FLOPs are our closed form: every FLOP the meter would count in a training step of one
sequence of block_size tokens (forward, backward, clip + AdamW), times tokens / block_size. The
functions below (forward_flops, backward_flops, training_step_flops, arch_params) are thin wrappers
over minigpt.costs.model, the one closed form, whose records the meter's own counts equal; beside
it, the 6·N·D convention. The days, MWh and tCO2e follow
Patterson et al. 2021's identity:

    chip-hours = FLOPs / achieved FLOP/s per chip / 3600     days = chip-hours / chips / 24
    MWh = chip-hours × W per chip × PUE / 1e6                tCO2e = MWh × kgCO2e/kWh

Mixture of experts (n_experts, experts_per_token, moe_every; minigpt/nn/moe.py trains them): each
MoE block's MLP becomes n_experts MLPs plus a linear router (n_embd × n_experts, no bias). Total
params count all experts, active params only experts_per_token of them; training FLOPs are the
closed form's under balanced routing (every expert computes N·k/E tokens), so they use the active
experts (the optimizer still updates every parameter). Routing's elementwise work (router softmax,
top-k, gate renormalisation, the load-balancing loss, and the dispatch/combine passes that move each
token to its experts and back) is counted too, exactly as the meter counts it in the NumPy model.

Inference is a roofline (the ideal machine, a lower bound on time): a decode step streams the
weights it uses (all experts that any of the batch's tokens picks, under uniform routing) plus the
KV cache, and does a forward's FLOPs; a token takes max(bytes / bandwidth, FLOPs / peak).
"""

from dataclasses import dataclass

from minigpt.costs import energy, hardware
from minigpt.costs import model as cost_model
from minigpt.costs.hardware import Profile
from minigpt.costs.scenario import Scenario
from minigpt.costs.scenario import load as load_scenario  # noqa: F401  (re-exported)
from minigpt.errors import ConfigError

SECONDS_PER_YEAR = 365.25 * 86400
FLOOR_ENERGY_OF_PEAK = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "int8": "int8"}
UTILISATION_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)  # sensitivity rows: × the scenario's FLOP/s
PUE_DELTAS = (-0.1, 0.0, 0.1, 0.5)  # sensitivity columns: + the scenario's PUE (at least 1.0)


@dataclass(frozen=True)
class Arch:
    """A GPT-2 architecture, optionally with mixture-of-experts MLPs: the fields
    minigpt.costs.model reads from a ModelConfig, so the one closed form serves both."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    n_experts: int = 1
    experts_per_token: int = 1
    moe_every: int = 1
    capacity_factor: float = 0.0  # 0: dropless (balanced routing drops nothing then anyway)
    dropout: float = 0.0


def arch_of(scn: Scenario) -> Arch | None:
    m = scn.values.get("model", {})
    if "n_layer" not in m:
        return None
    return Arch(m["n_layer"], m["n_embd"], m["n_head"], m["block_size"], m["vocab_size"],
                m.get("n_experts", 1), m.get("experts_per_token", 1), m.get("moe_every", 1))


def mlp_params(C: int) -> int:
    return cost_model.mlp_params(C)


def arch_params(a: Arch) -> tuple[int, int]:
    """(total, active) parameters: minigpt.costs.model.n_params and n_active_params."""
    return cost_model.n_params(a), cost_model.n_active_params(a)


def forward_flops(a: Arch, B: int, T: int, pos0: int = 0, last_only: bool = False,
                  targets: bool = False) -> int:
    """FLOPs of a forward of B sequences of T new tokens after pos0 (all kinds, dropout 0;
    MoE blocks under balanced routing)."""
    return cost_model.total_flops(cost_model.forward_records(a, B, T, pos0, last_only, targets))


def backward_flops(a: Arch, B: int, T: int) -> int:
    """FLOPs of the backward of a B x T training forward (all kinds, dropout 0)."""
    return cost_model.total_flops(cost_model.backward_records(a, B, T))


def training_step_flops(a: Arch, B: int, T: int) -> int:
    """One optimizer step on B x T tokens: forward with loss, backward, clip (3) + AdamW (14)."""
    return cost_model.total_flops(cost_model.predict_training_step(a, B, T))


def kv_bytes_per_token(a: Arch, kv_bits: int) -> float:
    return 2 * a.n_layer * a.n_embd * kv_bits / 8  # K and V, every layer, bytes


def experts_touched(a: Arch, tokens: int) -> float:
    """Expected distinct experts per layer that `tokens` tokens pick (uniform, independent)."""
    E, k = a.n_experts, a.experts_per_token
    return E * (1 - (1 - k / E) ** tokens) if E > 1 else 1.0


def weights_read(a: Arch | None, params: float, active: float, tokens: int) -> float:
    """Parameters one forward step over `tokens` tokens must read (all, bar unpicked experts).
    Without an expert layout (a stated count), one token reads the active ones, more read all."""
    if a is None or a.n_experts == 1:
        return active if tokens == 1 else params
    experts = a.n_layer * mlp_params(a.n_embd)  # one expert in every layer
    return params - (a.n_experts - experts_touched(a, tokens)) * experts


@dataclass
class Chip:
    """The hardware side of a scenario: one chip's figures and how many there are."""

    profile: Profile
    dtype: str  # which peak: fp16 by default
    peak: float | None  # FLOP/s
    achieved: float | None  # FLOP/s per chip in training
    watts: float  # W per chip
    bandwidth: float | None  # bytes/s
    chips: int | None

    def describe(self) -> str:
        n = f"{self.chips:,} " if self.chips else ""
        rate = f" at {self.achieved / 1e12:.3g} TFLOP/s each" if self.achieved else ""
        mfu = f" ({100 * self.achieved / self.peak:.1f}% of {self.dtype} peak)" if (
            self.achieved and self.peak) else ""
        return f"{n}{self.profile.name}{rate}{mfu}, {self.watts:g} W"


def chip_of(scn: Scenario) -> Chip:
    hw = scn.values["hardware"]
    try:
        prof = hardware.load_profile(hw["profile"])
    except ConfigError as e:
        raise ConfigError(f"{scn.where('hardware', 'profile')}: [hardware] profile: {e}") from None
    dtype = hw.get("dtype", "fp16")
    peak = prof.peak_flops.get(dtype)
    achieved = hw.get("achieved_flops_per_chip")
    if "mfu" in hw:
        if peak is None:
            raise ConfigError(f"{scn.where('hardware', 'mfu')}: [hardware] mfu: {prof.name} has no"
                              f" {dtype} peak; give achieved_flops_per_chip instead")
        achieved = hw["mfu"] * peak
    if achieved and peak and achieved > peak:
        raise ConfigError(f"{scn.where('hardware', 'achieved_flops_per_chip')}: [hardware] "
                          f"achieved_flops_per_chip {achieved:.3g} exceeds {prof.name}'s {dtype} "
                          f"peak {peak:.3g}")
    watts = hw.get("watts_per_chip", prof.power_watts)
    if watts is None:
        raise ConfigError(f"{scn.where('hardware')}: [hardware] watts_per_chip: needed "
                          f"({prof.name} has no power figure)")
    bandwidth = hw.get("memory_bandwidth", prof.memory_bandwidth)  # bytes/s
    return Chip(prof, dtype, peak, achieved, watts, bandwidth, hw.get("chips"))


def settings_of(scn: Scenario) -> energy.Settings:
    hw = scn.values["hardware"]
    keys = ("pue", "carbon_kg_per_kwh", "water_l_per_kwh", "household_kwh_per_year")
    s = energy.settings(**{k: hw.get(k) for k in keys})
    for k in keys:
        if k in hw:
            s.origins[k] = scn.where("hardware", k)
    return s


def training_costs(flops: float, chip: Chip, s: energy.Settings) -> dict:
    """Patterson's identity: chip-hours, days (with a chip count), MWh, tCO2e, m3 of water."""
    chip_hours = flops / chip.achieved / 3600
    mwh = chip_hours * chip.watts * s.pue / 1e6
    return {"chip_hours": chip_hours, "days": chip_hours / chip.chips / 24 if chip.chips else None,
            "energy_mwh": mwh, "co2_tonnes": mwh * s.carbon_kg_per_kwh,
            "water_m3": None if s.water_l_per_kwh is None else mwh * s.water_l_per_kwh,
            "households_year": mwh * 1e3 / s.household_kwh_per_year, "hardware": chip.describe()}


def _floor_pj(chip: Chip, s: energy.Settings) -> float:
    return s.pj_per_flop[FLOOR_ENERGY_OF_PEAK[chip.dtype]]


def training(scn: Scenario, a: Arch | None, active: float, chip: Chip, s: energy.Settings) -> dict:
    D = scn.get("training", "tokens")
    six = 6 * active * D
    ours = training_step_flops(a, 1, a.block_size) * D / a.block_size if a else None
    published = scn.get("training", "flops")
    used = published or ours or six
    out = {"train_tokens": D, "train_flops": ours, "train_flops_6nd": six,
           "train_flops_published": published, "train_flops_used": used,
           "train_flops_used_is": "published" if published else "closed form" if ours else "6ND"}
    out |= training_costs(used, chip, s)
    ideal_h = used / chip.peak / 3600 if chip.peak else None  # chip-hours at 100% of peak
    out["training_layers"] = {
        "measured": None, "time_x_power_mwh": out["energy_mwh"],
        "roofline_mwh": ideal_h * chip.watts * s.pue / 1e6 if ideal_h else None,
        "floor_mwh": used * _floor_pj(chip, s) * energy.PJ / 3.6e9}
    out["sensitivity"] = sensitivity(used, chip, s)
    return out


def sensitivity(flops: float, chip: Chip, s: energy.Settings) -> dict:
    """MWh as utilisation (× the scenario's FLOP/s) and PUE move; days beside each row."""
    pues = sorted({round(max(1.0, s.pue + d), 3) for d in PUE_DELTAS})
    rows = []
    for f in UTILISATION_FACTORS:
        rate = chip.achieved * f
        if chip.peak and rate > chip.peak:
            continue
        chip_h = flops / rate / 3600
        rows.append({"factor": f, "flops_per_chip": rate,
                     "mfu": rate / chip.peak if chip.peak else None,
                     "days": chip_h / chip.chips / 24 if chip.chips else None,
                     "energy_mwh": [chip_h * chip.watts * p / 1e6 for p in pues]})
    return {"pue": pues, "rows": rows}
