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

The result is a Training: the work (scale.work.TrainingFlops), the costs of Patterson's identity
(Costs, with its footprint), the energy layers and the sensitivity table.
"""

from dataclasses import dataclass

from minigpt import units
from minigpt.energy import accounting
from minigpt.scale import footprint, work
from minigpt.scale.chips import FLOOR_ENERGY_OF_PEAK, Chip
from minigpt.scale.footprint import WH_PER_MWH, Footprint
from minigpt.scale.scenario import Scenario
from minigpt.units import SECONDS_PER_HOUR

UTILISATION_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)  # sensitivity rows: × the scenario's FLOP/s
PUE_DELTAS = (-0.1, 0.0, 0.1, 0.5)  # sensitivity columns: + the scenario's PUE (at least 1.0)
# 24, kept an int so that whole days on whole chips give whole chip-hours
HOURS_PER_DAY = round(units.SECONDS_PER_DAY / SECONDS_PER_HOUR)


@dataclass(frozen=True)
class Costs:
    """Patterson's identity worked: chip-hours, days, the rate per chip, MFU, and the footprint."""

    chip_hours: float
    days: float | None  # None without a chip count
    flops_per_chip: float | None  # FLOP/s, given or implied; None without FLOPs
    mfu: float | None  # flops_per_chip / peak
    footprint: Footprint

    def to_json(self) -> dict:
        return {"chip_hours": self.chip_hours, "days": self.days,
                "flops_per_chip": self.flops_per_chip, "mfu": self.mfu} | self.footprint.to_json()


@dataclass(frozen=True)
class EnergyLayers:
    """A projection's energy in the layers a run's report shows (no run: nothing measured)."""

    time_x_power_mwh: float  # chip-hours × W × PUE: the estimate itself
    roofline_mwh: float | None  # at 100% of peak, same W and PUE
    floor_mwh: float | None  # FLOPs × pJ/FLOP alone (no bytes, no PUE)

    def to_json(self) -> dict:
        return {"measured": None, "time_x_power_mwh": self.time_x_power_mwh,
                "roofline_mwh": self.roofline_mwh, "floor_mwh": self.floor_mwh}


@dataclass(frozen=True)
class SensitivityRow:
    """One utilisation: its rate, MFU and days, and MWh drawn at each PUE."""

    factor: float  # × the scenario's FLOP/s per chip
    flops_per_chip: float
    mfu: float | None
    days: float | None
    energy_mwh: tuple[float, ...]  # one per PUE column

    def to_json(self) -> dict:
        return {"factor": self.factor, "flops_per_chip": self.flops_per_chip, "mfu": self.mfu,
                "days": self.days, "energy_mwh": list(self.energy_mwh)}


@dataclass(frozen=True)
class Sensitivity:
    """MWh drawn as utilisation (rows) and PUE (columns) move."""

    pue: tuple[float, ...]
    rows: tuple[SensitivityRow, ...]

    def to_json(self) -> dict:
        return {"pue": list(self.pue), "rows": [r.to_json() for r in self.rows]}


@dataclass(frozen=True)
class Training:
    """The [training] figures of a scenario: the work, its costs and how each was had."""

    flops: work.TrainingFlops
    costs: Costs
    chip_hours_is: str  # "given", "chips × days × 24" or "FLOPs / FLOP/s per chip / 3600"
    flops_per_chip_is: str  # "given", "mfu × <dtype> peak", "implied: ..." or "not given"
    layers: EnergyLayers
    sensitivity: Sensitivity | None  # None without FLOPs and a rate

    def to_json(self) -> dict:
        return self.flops.to_json() | self.costs.to_json() | {
            "chip_hours_is": self.chip_hours_is, "flops_per_chip_is": self.flops_per_chip_is,
            "training_layers": self.layers.to_json(),
            "sensitivity": self.sensitivity.to_json() if self.sensitivity else None}


def chip_hours_of(scn: Scenario, flops: float | None, chip: Chip) -> tuple[float, str]:
    """Chip-hours and how they were had (the scenario was checked to allow one way)."""
    given, days = scn.get("training", "chip_hours"), scn.get("training", "days")
    if given is not None:
        return given, "given"
    if days is not None:
        return chip.chips * days * HOURS_PER_DAY, "chips × days × 24"
    return flops / chip.achieved / SECONDS_PER_HOUR, "FLOPs / FLOP/s per chip / 3600"


def training_costs(flops: float | None, chip: Chip, s: accounting.Settings,
                   chip_hours: float | None = None) -> Costs:
    """Patterson's identity: chip-hours (from FLOPs and the chip's rate unless given), days (with a
    chip count), the implied rate and MFU, then energy, carbon and water (footprint)."""
    if chip_hours is None:
        chip_hours = flops / chip.achieved / SECONDS_PER_HOUR
    rate = flops / (chip_hours * SECONDS_PER_HOUR) if flops else None  # FLOP/s, given or implied
    return Costs(chip_hours, chip_hours / chip.chips / HOURS_PER_DAY if chip.chips else None,
                 rate, rate / chip.peak if rate and chip.peak else None,
                 footprint.footprint(chip_hours * chip.watts / WH_PER_MWH, s))


def training(scn: Scenario, a: work.Arch | None, active: float | None, chip: Chip,
             s: accounting.Settings) -> Training:
    """The [training] figures of a checked scenario."""
    flops = work.training_flops(scn, a, active)
    used = flops.used
    hours, how = chip_hours_of(scn, used, chip)
    costs = training_costs(used, chip, s, hours)
    from_mfu = "mfu" in scn.values["hardware"] and chip.achieved  # the rate is mfu × peak
    rate_is = ("not given" if used is None else f"mfu × {chip.dtype} peak" if from_mfu else
               "given" if chip.achieved else "implied: FLOPs / chip-hours")
    # chip-hours at 100% of peak
    ideal_h = used / chip.peak / SECONDS_PER_HOUR if used and chip.peak else None
    pj = s.pj_per_flop[FLOOR_ENERGY_OF_PEAK[chip.dtype]]
    layers = EnergyLayers(costs.footprint.energy_mwh,
                          ideal_h * chip.watts * s.pue / WH_PER_MWH if ideal_h else None,
                          units.mwh(used * pj * units.PJ) if used else None)
    rate = costs.flops_per_chip
    return Training(flops, costs, how, rate_is, layers,
                    sensitivity(used, rate, chip, s) if used and rate else None)


def sensitivity(flops: float, rate: float, chip: Chip, s: accounting.Settings) -> Sensitivity:
    """MWh as utilisation (× the scenario's FLOP/s per chip) and PUE move; days beside each row."""
    pues = tuple(sorted({round(max(1.0, s.pue + d), 3) for d in PUE_DELTAS}))
    rows = []
    for f in UTILISATION_FACTORS:
        r = rate * f
        if chip.peak and r > chip.peak:
            continue
        chip_h = flops / r / SECONDS_PER_HOUR
        rows.append(SensitivityRow(f, r, r / chip.peak if chip.peak else None,
                                   chip_h / chip.chips / HOURS_PER_DAY if chip.chips else None,
                                   tuple(chip_h * chip.watts * p / WH_PER_MWH for p in pues)))
    return Sensitivity(pues, tuple(rows))
