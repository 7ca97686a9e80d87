"""Training at full size, in the terms a published estimate gives: FLOPs, chip-hours or days.

Patterson et al. 2021's identity, taken from whichever end is published:

    chip-hours = FLOPs / FLOP/s per chip / 3600      (FLOPs and a rate: Patterson's Table 4)
               = [training] chip_hours               (LLaMA, Llama 2/3, BLOOM: GPU-hours)
               = chips × days × 24                   (a cluster for a time: GPT-4 estimates)
    days       = chip-hours / chips / 24             (with [hardware] chips)
    IT MWh     = chip-hours × W per chip × power_fraction / 1e6
    then minigpt.scale.footprint: × PUE, × grid (gross, net), water on-site and off-site.

Where FLOPs and chip-hours are both known, the implied FLOP/s per chip and its share of peak (MFU)
are reported. What cannot be computed from the inputs is reported as not given (None), never asked
for. The sensitivity table (utilisation × PUE) needs a rate, given or implied.
"""

from minigpt import units
from minigpt.energy import accounting
from minigpt.scale import footprint, work
from minigpt.scale.chips import FLOOR_ENERGY_OF_PEAK, Chip
from minigpt.scale.footprint import WH_PER_MWH
from minigpt.scale.scenario import Scenario
from minigpt.units import SECONDS_PER_HOUR

UTILISATION_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)  # sensitivity rows: × the scenario's FLOP/s
PUE_DELTAS = (-0.1, 0.0, 0.1, 0.5)  # sensitivity columns: + the scenario's PUE (at least 1.0)
# 24, kept an int so that whole days on whole chips give whole chip-hours
HOURS_PER_DAY = round(units.SECONDS_PER_DAY / SECONDS_PER_HOUR)


def chip_hours_of(scn: Scenario, flops: float | None, chip: Chip) -> tuple[float, str]:
    """Chip-hours and how they were had (the scenario was checked to allow one way)."""
    given, days = scn.get("training", "chip_hours"), scn.get("training", "days")
    if given is not None:
        return given, "given"
    if days is not None:
        return chip.chips * days * HOURS_PER_DAY, "chips × days × 24"
    return flops / chip.achieved / SECONDS_PER_HOUR, "FLOPs / FLOP/s per chip / 3600"


def training_costs(flops: float | None, chip: Chip, s: accounting.Settings,
                   chip_hours: float | None = None) -> dict:
    """Patterson's identity: chip-hours (from FLOPs and the chip's rate unless given), days (with a
    chip count), the implied rate and MFU, then energy, carbon and water (footprint)."""
    if chip_hours is None:
        chip_hours = flops / chip.achieved / SECONDS_PER_HOUR
    rate = flops / (chip_hours * SECONDS_PER_HOUR) if flops else None  # FLOP/s, given or implied
    out = {"chip_hours": chip_hours,
           "days": chip_hours / chip.chips / HOURS_PER_DAY if chip.chips else None,
           "flops_per_chip": rate, "mfu": rate / chip.peak if rate and chip.peak else None,
           "watts_per_chip": chip.watts, "power_basis": chip.basis, "power": chip.power_text(),
           "hardware": chip.describe()}
    return out | footprint.footprint(chip_hours * chip.watts / WH_PER_MWH, s)


def training(scn: Scenario, a: work.Arch | None, active: float | None, chip: Chip,
             s: accounting.Settings) -> dict:
    """The [training] figures of a checked scenario, as a dict of the JSON keys."""
    out = work.training_flops(scn, a, active)
    used = out["train_flops_used"]
    hours, how = chip_hours_of(scn, used, chip)
    out |= training_costs(used, chip, s, hours)
    out["chip_hours_is"] = how
    from_mfu = "mfu" in scn.values["hardware"] and chip.achieved  # the rate is mfu × peak
    out["flops_per_chip_is"] = ("not given" if used is None else
                                f"mfu × {chip.dtype} peak" if from_mfu else
                                "given" if chip.achieved else "implied: FLOPs / chip-hours")
    # chip-hours at 100% of peak
    ideal_h = used / chip.peak / SECONDS_PER_HOUR if used and chip.peak else None
    pj = s.pj_per_flop[FLOOR_ENERGY_OF_PEAK[chip.dtype]]
    out["training_layers"] = {
        "measured": None, "time_x_power_mwh": out["energy_mwh"],
        "roofline_mwh": ideal_h * chip.watts * s.pue / WH_PER_MWH if ideal_h else None,
        "floor_mwh": units.mwh(used * pj * units.PJ) if used else None}
    out["sensitivity"] = (sensitivity(used, out["flops_per_chip"], chip, s)
                          if used and out["flops_per_chip"] else None)
    return out


def sensitivity(flops: float, rate: float, chip: Chip, s: accounting.Settings) -> dict:
    """MWh as utilisation (× the scenario's FLOP/s per chip) and PUE move; days beside each row."""
    pues = sorted({round(max(1.0, s.pue + d), 3) for d in PUE_DELTAS})
    rows = []
    for f in UTILISATION_FACTORS:
        r = rate * f
        if chip.peak and r > chip.peak:
            continue
        chip_h = flops / r / SECONDS_PER_HOUR
        rows.append({"factor": f, "flops_per_chip": r,
                     "mfu": r / chip.peak if chip.peak else None,
                     "days": chip_h / chip.chips / HOURS_PER_DAY if chip.chips else None,
                     "energy_mwh": [chip_h * chip.watts * p / WH_PER_MWH for p in pues]})
    return {"pue": pues, "rows": rows}
