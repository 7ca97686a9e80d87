"""Per-query energy in the terms analysts use: the throughput form, boundaries, the break-even.

Published per-query figures differ mostly in where they draw the boundary and what they start from.
This module holds the three forms that are not a model of the work (minigpt.scale.serving has the
roofline and the compute-bound forms):

throughput (Jegham et al. 2025, "How Hungry is AI?", arXiv 2505.09598), from observed speed:

    seconds     = output_tokens / tokens_per_s + latency_s
    accelerator = chips × W per chip × accelerator_utilization       (W)
    host        = host_watts × host_utilization                      (W)
    Wh          = seconds × (accelerator + host) × PUE / 3600

boundaries (Google 2025, arXiv 2508.15734: active accelerators, host CPU and DRAM, idle reserve
machines, data-centre overhead), each cumulative, the energy inside that boundary:

    accelerator = Wh × accelerator_share
    host        = Wh × (accelerator_share + host_share)
    idle        = Wh × (accelerator_share + host_share + idle_share)
    overhead    = Wh                                   (everything; its own share is the rest)
    (each at most Wh: shares that add to a little over 1, within their rounding, stop there)

Without shares, a form splits what it models: the throughput form its accelerator and host terms
(no idle machines); the chip power basis the accelerators alone; the system basis accelerators and
host together (not separable); a stated figure nothing but its total. IT energy = Wh / PUE.

fleet and break-even:

    GWh per year   = Wh × queries_per_day × 365 / 1e9
    MWh per day    = Wh × queries_per_day / 1e6
    breakeven_days = training MWh (drawn) / MWh per day: the days of serving after which inference
                     has used as much energy as the training run ([training] energy_mwh where
                     given, else the computed run's)
"""

from dataclasses import asdict, dataclass

from minigpt import units
from minigpt.energy import accounting
from minigpt.scale.chips import Chip
from minigpt.scale.footprint import WH_PER_GWH, WH_PER_MWH
from minigpt.scale.scenario import SHARES, Scenario


@dataclass(frozen=True)
class Throughput:
    """The throughput form worked: a query's seconds, the watts drawn meanwhile, its Wh."""

    chips: int
    seconds: float  # output / tokens per second + latency
    accelerator_watts: float  # chips × W per chip × utilisation
    host_watts: float  # host W × utilisation
    wh_per_query: float  # after PUE

    def to_json(self) -> dict:
        return asdict(self)


def throughput_chips(scn: Scenario) -> int:
    """The accelerators serving a query: [inference] chips, else [hardware] chips, else 1."""
    return scn.get("inference", "chips") or scn.get("hardware", "chips") or 1


def throughput(scn: Scenario, chip: Chip, s: accounting.Settings) -> Throughput | None:
    """The throughput form of scn (None without tokens_per_s; chips.chip_of has made sure of the
    chips' watts)."""
    rate = scn.get("inference", "tokens_per_s")
    if rate is None:
        return None
    get = scn.values["inference"].get
    hw = scn.values["hardware"].get
    n = throughput_chips(scn)
    seconds = get("output_tokens") / rate + get("latency_s", 0.0)
    accelerator = n * chip.watts * hw("accelerator_utilization", 1.0)
    host = hw("host_watts", 0.0) * hw("host_utilization", 1.0)
    return Throughput(n, seconds, accelerator, host,
                      units.wh(seconds * (accelerator + host) * s.pue))


@dataclass(frozen=True)
class Boundaries:
    """A query's Wh inside each boundary, cumulative (None: the form cannot separate it)."""

    accelerator: float | None  # the active accelerators alone
    host: float | None  # and their host CPU and DRAM
    idle: float | None  # and idle reserve machines: all the IT energy
    overhead: float  # and the data centre's overhead: everything, the Wh per query
    split: str  # where the split came from

    def to_json(self) -> dict:
        return {"accelerator": self.accelerator, "host": self.host, "idle": self.idle,
                "overhead": self.overhead}


def boundaries(scn: Scenario, wh: float, basis: str, chip: Chip, tp: Throughput | None,
               s: accounting.Settings) -> Boundaries:
    """Wh per query inside each boundary, by the rule in the module docstring."""
    a, h, i = (scn.get("inference", k) for k in SHARES)
    if a is not None:  # shares adding to a little over 1, within their rounding, stop at the total
        return Boundaries(wh * min(a, 1), wh * min(a + h, 1), wh * min(a + h + i, 1), wh,
                          "the scenario's shares of the total; overhead the rest")
    if basis == "throughput":
        acc = units.wh(tp.seconds * tp.accelerator_watts)
        it = acc + units.wh(tp.seconds * tp.host_watts)
        return Boundaries(acc, it, it, wh, "the throughput form: accelerator and host terms, "
                          "no idle machines")
    if basis == "stated":
        return Boundaries(None, None, None, wh, "a stated total: give [inference] "
                          "accelerator_share, host_share, idle_share to split it")
    it = wh / s.pue
    if "system" in chip.basis:
        return Boundaries(None, it, it, wh, "system power basis: accelerators with their host "
                          "(not separable), no idle machines")
    return Boundaries(it, it, it, wh, "chip power basis: the accelerators alone, no host, no "
                      "idle machines")


def gwh_per_year(wh: float, queries_per_day: float | None) -> float | None:
    """A fleet's yearly inference energy: Wh × queries a day × 365, in GWh."""
    if queries_per_day is None:
        return None
    return wh * queries_per_day * units.DAYS_PER_YEAR / WH_PER_GWH


@dataclass(frozen=True)
class Breakeven:
    """The days of serving after which inference has drawn as much as training."""

    training_mwh: float  # drawn, after PUE
    training_mwh_is: str  # "stated" ([training] energy_mwh) or "computed"
    inference_mwh_per_day: float
    days: float | None  # None: no queries a day, or none served

    def to_json(self) -> dict:
        return {"breakeven_days": self.days, "breakeven_training_mwh": self.training_mwh,
                "breakeven_training_mwh_is": self.training_mwh_is,
                "inference_mwh_per_day": self.inference_mwh_per_day}


BREAKEVEN_KEYS = ("breakeven_days", "breakeven_training_mwh", "breakeven_training_mwh_is",
                  "inference_mwh_per_day")


def breakeven(scn: Scenario, computed_mwh: float | None, wh: float | None
              ) -> Breakeven | None:
    """Training MWh / inference MWh per day (None without a training energy or a fleet)."""
    stated = scn.get("training", "energy_mwh")
    mwh = stated if stated is not None else computed_mwh
    per_day = scn.get("inference", "queries_per_day")
    if mwh is None or wh is None or per_day is None:
        return None
    daily = wh * per_day / WH_PER_MWH  # MWh a day
    return Breakeven(mwh, "stated" if stated is not None else "computed", daily,
                     mwh / daily if daily > 0 else None)
