"""Hardware and power: the chip a scenario runs on, its rates, and the watts it is charged.

The watts per accelerator have a basis, which every report names, because published estimates
differ on it and it moves the answer by about 2x:

    chip     the accelerator's rated power (TDP/TGP: the profile's power_watts), the default;
    system   the whole system's power per accelerator (the profile's system_power_watts: a server's
             maximum rating over its accelerators, e.g. NVIDIA DGX A100 6.5 kW / 8 = 812.5 W, or a
             published measured average such as Patterson et al.'s, as the profile's note says);
    given    [hardware] watts_per_chip, labelled with power_basis when the scenario states one.

power_fraction (default 1) is the average draw as a share of that rating (Epoch AI uses 0.7 of a
DGX H100's maximum). Watts charged = rating × power_fraction. This module sits below the energy
arithmetic (minigpt.scale.footprint) and above the profiles (minigpt.hardware.profiles).
"""

from dataclasses import dataclass

from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.hardware.profiles import Profile
from minigpt.scale.scenario import Scenario, training_work_given

FLOOR_ENERGY_OF_PEAK = {"fp32": "fp32", "tf32": "fp32", "fp16": "fp16", "int8": "int8"}
BASIS_FIGURE = {"chip": "power_watts", "system": "system_power_watts"}


@dataclass(frozen=True)
class Chip:
    """The hardware side of a scenario: one chip's figures and how many there are."""

    profile: Profile
    dtype: str  # which peak: fp16 by default
    peak: float | None  # FLOP/s
    achieved: float | None  # FLOP/s per chip in training (given; see training for implied)
    rating: float | None  # W per chip before power_fraction (None: not needed, not given)
    basis: str  # "chip", "system", or "given" / "given (system)": where rating came from
    power_source: str  # the profile's source of the rating, or the scenario's field
    power_fraction: float  # average draw / rating
    bandwidth: float | None  # bytes/s
    chips: int | None

    @property
    def watts(self) -> float | None:
        """W per chip charged: the rating × power_fraction."""
        return None if self.rating is None else self.rating * self.power_fraction

    def power_text(self) -> str:
        """'812.5 W per chip (system basis) × power_fraction 0.7 = 568.75 W'."""
        if self.rating is None:
            return f"power not given ({self.power_source})"
        frac = (f" × power_fraction {self.power_fraction:g} = {self.watts:g} W"
                if self.power_fraction != 1 else "")
        return f"{self.rating:g} W per chip ({self.basis} basis){frac}"

    def describe(self) -> str:
        """'10,000 v100-sxm2 at 24.6 TFLOP/s each (19.7% of fp16 peak), 330 W per chip (...)'."""
        n = f"{self.chips:,} " if self.chips else ""
        rate = f" at {self.achieved / 1e12:.3g} TFLOP/s each" if self.achieved else ""
        mfu = f" ({100 * self.achieved / self.peak:.1f}% of {self.dtype} peak)" if (
            self.achieved and self.peak) else ""
        return f"{n}{self.profile.name}{rate}{mfu}, {self.power_text()}"

    def to_json(self) -> dict:
        """The estimate's hardware keys: the description, dtype, power and its basis, W charged."""
        return {"hardware": self.describe(), "dtype": self.dtype, "power": self.power_text(),
                "power_basis": self.basis, "watts_per_chip": self.watts}


def _rating(scn: Scenario, prof: Profile, need: bool) -> tuple[float | None, str, str]:
    """(W per chip, basis, where from): watts_per_chip if given, else the basis's profile figure."""
    hw = scn.values["hardware"]
    basis = hw.get("power_basis")
    if "watts_per_chip" in hw:
        label = f"given, {basis}" if basis else "given"
        return hw["watts_per_chip"], label, scn.where("hardware", "watts_per_chip")
    basis = basis or "chip"
    figure = BASIS_FIGURE[basis]
    watts = getattr(prof, figure)
    if watts is None and not need:
        return None, basis, f"{prof.name} has no {figure}; not needed for a stated Wh per query"
    if watts is None:
        note = prof.notes.get(figure, "")
        raise ConfigError(f"{scn.where('hardware', 'power_basis')}: [hardware] power_basis = "
                          f"{basis!r}: {prof.name} has no {figure}" + (f" ({note})" if note else "")
                          + "; give watts_per_chip")
    return watts, basis, f"{prof.name} {figure} ({prof.sources.get(figure, '')})"


def chip_of(scn: Scenario) -> Chip:
    """The scenario's chip; its power is required unless nothing needs it: a stated Wh per query
    (beside which a model's roofline Wh is then left out), no throughput form and no training work
    to cost."""
    hw = scn.values["hardware"]
    try:
        prof = profiles.load_profile(hw["profile"])
    except ConfigError as e:
        raise ConfigError(f"{scn.where('hardware', 'profile')}: [hardware] profile: {e}") from None
    dtype = hw.get("dtype", "fp16")
    peak = prof.peak_flops.get(dtype)
    achieved = hw.get("achieved_flops_per_chip")
    for section, key in (("hardware", "mfu"), ("inference", "mfu")):
        if scn.get(section, key) is not None and peak is None:
            raise ConfigError(f"{scn.where(section, key)}: [{section}] mfu: {prof.name} has no "
                              f"{dtype} peak; give achieved_flops_per_chip or another dtype")
    if "mfu" in hw:
        achieved = hw["mfu"] * peak
    if achieved and peak and achieved > peak:
        raise ConfigError(f"{scn.where('hardware', 'achieved_flops_per_chip')}: [hardware] "
                          f"achieved_flops_per_chip {achieved:.3g} exceeds {prof.name}'s {dtype} "
                          f"peak {peak:.3g}")
    serves = scn.has("inference") and scn.get("inference", "wh_per_query") is None
    from_speed = scn.get("inference", "tokens_per_s") is not None  # even beside a stated figure
    rating, basis, source = _rating(scn, prof, training_work_given(scn) or serves or from_speed)
    bandwidth = hw.get("memory_bandwidth", prof.memory_bandwidth)  # bytes/s
    return Chip(prof, dtype, peak, achieved, rating, basis, source, hw.get("power_fraction", 1.0),
                bandwidth, hw.get("chips"))
