"""Energy, in four layers, each shown where it can be given and each saying why where it cannot:

1. measured        RAPL / NVML energy counters (minigpt.hardware.counters), × PUE;
2. time × power    measured seconds × the profile's (or your) power per chip, × PUE;
3. roofline        Σ max(FLOPs / peak, bytes / bandwidth) on a profile (minigpt.hardware.roofline),
                   × power × PUE: the ideal machine at that power;
4. physics floor   FLOPs × pJ per FLOP + bytes × pJ per byte (Horowitz's 45 nm table in
                   profiles/constants.toml, or your own figures): the arithmetic and the memory
                   traffic alone, no PUE.

PUE, grid carbon (kgCO2e/kWh, gross; net when given), household electricity use and water (on-site
litres per kWh of IT energy and off-site litres per kWh drawn, Li et al. 2023's US averages) come
with sourced defaults from constants.toml. The power figure the middle two layers rest on is a
PowerFigure: watts, their basis (measured, given, profile, estimated or none) and its note.

    layers = run_layers(rows, seconds, profile="local-cpu", measured=m, watts=None)

rows are minigpt.counting.tables rows (tables.rows_from_records(METER.records)); m is a
counters.Measurement or None. A finished run's energy document (energy.json), which the end-of-run
report prints from, is minigpt.energy.run_energy.build's. This module imports no scale module
(energy sits below scale): the scaling estimates (minigpt.scale.footprint) use the same Settings;
the GPT-3 projection line of a run is minigpt.scale.projection.gpt3_projection_line.
"""

import enum
from dataclasses import dataclass, field

from minigpt.errors import ConfigError
from minigpt.hardware import calibrate, cpu_power, profiles, roofline
from minigpt.hardware.counters import NOT_MEASURED, Measurement
from minigpt.hardware.profiles import Profile
from minigpt.units import PJ, kwh, si

# a record's dtype -> the 45 nm per-FLOP energy used for its floor (float64 has no published
# figure: fp32's is used, a lower bound, since a 64-bit operation costs more than a 32-bit one;
# w8a32 and w16a32 are narrow weights widened into a float32 product, so float32 arithmetic;
# w4a8 multiplies int8 activations by 4-bit weights in integers: int8 arithmetic)
FLOP_ENERGY_OF_DTYPE = {"float32": "fp32", "float64": "fp32", "float16": "fp16",
                        "bfloat16": "fp16", "int8": "int8", "int32": "int8", "w8a32": "fp32",
                        "w16a32": "fp32", "w4a8": "int8"}


@dataclass
class Settings:
    """The parameters energy figures rest on, and where each came from ("default: <source>").

    Water comes in two terms, as Li et al. 2023 count it: on-site (the datacentre's cooling, litres
    per kWh of IT energy, before PUE: its WUE) and off-site (the generation's water, litres per kWh
    drawn, after PUE). Carbon is gross (the grid's mix) and, when given, net of carbon-free energy
    purchases (Patterson et al. 2021 report both)."""

    pue: float  # facility energy / IT energy
    carbon_kg_per_kwh: float  # kg CO2e per kWh drawn (gross)
    household_kwh_per_year: float  # kWh per US household per year
    water_onsite_l_per_kwh: float | None  # litres per kWh of IT energy; None: not estimated
    pj_per_flop: dict[str, float]  # "fp32" -> pJ per FLOP (the physics floor)
    pj_per_byte: float  # pJ per byte moved (floor; default DRAM, low end)
    pj_per_byte_sram: float  # pJ per byte from SRAM, shown beside the floor
    origins: dict[str, str] = field(default_factory=dict)
    water_offsite_l_per_kwh: float | None = None  # litres per kWh drawn (after PUE)
    carbon_net_kg_per_kwh: float | None = None  # kg CO2e per kWh net of clean-energy purchases

    @property
    def water_l_per_kwh(self) -> float | None:
        """The old name of the on-site term (kept as an alias)."""
        return self.water_onsite_l_per_kwh


# each setting -> its default in constants.toml
DEFAULTS = {"pue": "pue", "carbon_kg_per_kwh": "carbon_kg_per_kwh",
            "carbon_net_kg_per_kwh": "carbon_net_kg_per_kwh",
            "household_kwh_per_year": "household_kwh_per_year",
            "water_onsite_l_per_kwh": "water_onsite_l_per_kwh",
            "water_offsite_l_per_kwh": "water_offsite_l_per_kwh",
            "pj_per_byte": "energy_per_byte.dram_read_low"}


def settings(pue: float | None = None, carbon_kg_per_kwh: float | None = None,
             water_l_per_kwh: float | None = None, household_kwh_per_year: float | None = None,
             pj_per_flop: float | None = None, pj_per_byte: float | None = None,
             given_by: str = "given", *, water_onsite_l_per_kwh: float | None = None,
             water_offsite_l_per_kwh: float | None = None,
             carbon_net_kg_per_kwh: float | None = None) -> Settings:
    """Settings from constants.toml, each given argument replacing its default (and noted).
    water_l_per_kwh is the old name of water_onsite_l_per_kwh (give one of them)."""
    if water_l_per_kwh is not None and water_onsite_l_per_kwh is not None:
        raise ConfigError(f"{given_by}: water_l_per_kwh is another name for "
                          f"water_onsite_l_per_kwh: give one of them")
    onsite = water_onsite_l_per_kwh if water_onsite_l_per_kwh is not None else water_l_per_kwh
    c = profiles.load_constants()
    given = {"pue": pue, "carbon_kg_per_kwh": carbon_kg_per_kwh,
             "carbon_net_kg_per_kwh": carbon_net_kg_per_kwh,
             "water_onsite_l_per_kwh": onsite, "water_offsite_l_per_kwh": water_offsite_l_per_kwh,
             "household_kwh_per_year": household_kwh_per_year, "pj_per_byte": pj_per_byte,
             "pj_per_flop": pj_per_flop}
    for name, value in given.items():
        if value is not None and not value >= 0:
            raise ConfigError(f"{given_by}: {name} must be >= 0, got {value!r}")
    if pue is not None and pue < 1:
        raise ConfigError(f"{given_by}: pue must be >= 1 (facility over IT energy), got {pue!r}")
    values = {k: c[name].value if given[k] is None else given[k] for k, name in DEFAULTS.items()}
    flop = {k: c[f"energy_per_flop.{k}"].value if pj_per_flop is None else pj_per_flop
            for k in ("fp32", "fp16", "int8")}
    s = Settings(**values, pj_per_flop=flop,
                 pj_per_byte_sram=c["energy_per_byte.sram_read"].value)
    for name, const in {**DEFAULTS, "pj_per_flop": "energy_per_flop.fp32"}.items():
        src = c[const].source or c[const].note
        s.origins[name] = given_by if given[name] is not None else f"default: {src}"
    s.origins["water_l_per_kwh"] = s.origins["water_onsite_l_per_kwh"]
    return s


# ---- what the joules drawn mean: carbon, water, households ----------------------------------

def co2_kg(joules: float, s: Settings) -> float:
    return kwh(joules) * s.carbon_kg_per_kwh


def water_litres(joules: float, s: Settings) -> float | None:
    """On-site and off-site water of `joules` drawn (after PUE): IT energy × WUE + drawn × EWIF;
    None when neither term is known."""
    terms = [(kwh(joules) / s.pue, s.water_onsite_l_per_kwh),
             (kwh(joules), s.water_offsite_l_per_kwh)]
    known = [k * w for k, w in terms if w is not None]
    return sum(known) if known else None


def household_years(joules: float, s: Settings) -> float:
    return kwh(joules) / s.household_kwh_per_year


# ---- the four layers ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    """One way to put a number on the energy: joules (None when it cannot), and how or why not."""

    name: str
    joules: float | None
    basis: str


def measured_layer(measured: Measurement | None, s: Settings) -> Layer:
    """The counters' joules × PUE, or "not measured here" with each reader's reason."""
    if measured is None or not measured.measured:
        why = measured.describe().removeprefix("energy: ") if measured else NOT_MEASURED
        return Layer("measured", None, why)
    j = measured.total_joules * s.pue
    readers = ", ".join(n for n, v in measured.joules.items() if v is not None)
    return Layer("measured", j, f"{readers} counters, {measured.total_joules:.4g} J × PUE "
                                f"{s.pue:.2f} (CPU packages, DRAM where exposed, GPUs: not fans, disks, PSU)")


class PowerBasis(str, enum.Enum):
    """Where a run's power figure came from, best first (energy.json's watts_method). A str too,
    so `basis == "estimated"` reads as energy.json does."""

    MEASURED = "measured"  # the energy counters' mean power over the run
    GIVEN = "given"  # --watts
    PROFILE = "profile"  # the hardware profile's power_watts
    ESTIMATED = "estimated"  # the CPU's rated power × its busy share (hardware.cpu_power)
    NONE = "none"  # no figure: the note says why


@dataclass(frozen=True)
class PowerFigure:
    """The watts a run's time x power and roofline layers use, and where they came from.

    note is what the report prints beside the watts ("measured: rapl", "--watts", "profile
    h100-sxm", "estimated: <CPU>, 15 W rated, 1.9 of 12 logical cores busy"), or why there are
    none; source is where a profile or estimated figure was published ("" otherwise)."""

    watts: float | None  # W
    basis: PowerBasis
    note: str
    source: str = ""

    @property
    def text(self) -> str:
        """"<W> W (<note>)", or the note alone when there is no figure."""
        return self.note if self.watts is None else f"{self.watts:.3g} W ({self.note})"

    def to_json(self) -> dict:
        """energy.json's power fields."""
        return {"watts": self.watts, "watts_basis": self.note, "watts_source": self.source,
                "watts_method": self.basis.value}


def power_figure(profile: Profile | None, watts: float | None, measured: Measurement | None = None,
                 estimate: bool = True) -> PowerFigure:
    """The watts to use, best first: the counters' mean power, the given --watts, the profile's
    power figure, an estimate from the CPU's rated power and the run's CPU time
    (minigpt.hardware.cpu_power; `estimate`=False for a GPU run, and it needs the CPU seconds that
    `counters.measure` records); else none, and why."""
    if watts is not None and watts <= 0:
        raise ConfigError(f"--watts must be > 0, got {watts!r}")
    if measured is not None and measured.measured and measured.seconds > 0:
        readers = ", ".join(n for n, v in measured.joules.items() if v is not None)
        mean = measured.total_joules / measured.seconds  # W
        unused = f"; --watts {watts:g} not used" if watts is not None else ""
        return PowerFigure(mean, PowerBasis.MEASURED, f"measured: {readers}{unused}")
    if watts is not None:
        return PowerFigure(watts, PowerBasis.GIVEN, "--watts")
    if profile is not None and profile.power_watts is not None:
        return PowerFigure(profile.power_watts, PowerBasis.PROFILE, f"profile {profile.name}",
                           profile.sources.get("power_watts", ""))
    if estimate and measured is not None and measured.cpu_seconds is not None:
        est = cpu_power.estimate(measured.cpu_seconds, measured.seconds)
        return PowerFigure(est.watts, PowerBasis.ESTIMATED, est.basis, est.source)
    who = f"{profile.name} has none" if profile is not None else "no hardware profile"
    return PowerFigure(None, PowerBasis.NONE, f"needs a power figure ({who}: pass --watts or add "
                                              f"power_watts to your profile)")


def time_power_layer(seconds: float, watts: float | None, power_note: str, s: Settings) -> Layer:
    """seconds × watts × PUE; power_note says where the watts came from, or why there are none."""
    if watts is None:
        return Layer("time x power", None, power_note)
    return Layer("time x power", seconds * watts * s.pue,
                 f"{seconds:.4g} s × {power_note} × PUE {s.pue:.2f}")


def roofline_layer(rows: list[dict], profile: Profile | None, watts: float | None, why: str,
                   s: Settings, seconds: float | None = None) -> Layer:
    """Ideal seconds on profile × watts × PUE; `why` is said when there is no profile or power."""
    if profile is None:
        return Layer("roofline", None, why)
    try:
        ideal = roofline.roofline_seconds(rows, profile)  # s
    except ConfigError as e:
        return Layer("roofline", None, f"needs {e}")
    share = f" ({100 * ideal / seconds:.3g}% of the measured time)" if seconds else ""
    where = f"ideal time on {profile.name} {ideal:.4g} s{share}"
    ceilings = f"; ceilings: {roofline.ceilings_used(rows, profile, values=False)}"
    if watts is None:
        return Layer("roofline", None, f"{why}; {where}{ceilings}")
    return Layer("roofline", ideal * watts * s.pue,
                 f"{where} × {watts:.3g} W × PUE {s.pue:.2f}{ceilings}")


def floor_joules(rows: list[dict], s: Settings, pj_per_byte: float | None = None) -> float:
    """Σ FLOPs × pJ per FLOP of the row's dtype + bytes × pJ per byte, in joules."""
    per_byte = s.pj_per_byte if pj_per_byte is None else pj_per_byte
    total = 0.0
    for r in rows:
        key = FLOP_ENERGY_OF_DTYPE.get(r["dtype"])
        if key is None:
            raise ConfigError(f"no per-operation energy for records of dtype {r['dtype']!r}")
        total += r["flops"] * s.pj_per_flop[key] + (r["bytes_read"] + r["bytes_written"]) * per_byte
    return total * PJ


def floor_layer(rows: list[dict], s: Settings) -> Layer:
    """The physics floor, with the SRAM-bytes variant beside it."""
    try:
        j = floor_joules(rows, s)
        sram = floor_joules(rows, s, s.pj_per_byte_sram)
    except ConfigError as e:
        return Layer("physics floor", None, str(e))
    f = s.pj_per_flop
    return Layer("physics floor", j,
                 f"45 nm (Horowitz 2014): {f['fp32']:g} pJ/FLOP fp32, {f['fp16']:g} fp16, bytes at "
                 f"{s.pj_per_byte:g} pJ/B (DRAM; {si(sram, 'J')} if every byte came from "
                 f"SRAM); no PUE")


def find_profile(profile: Profile | str | None) -> tuple[Profile | None, str]:
    """The profile (by name, by path, or as given) and "", or None and why there is none;
    "local-cpu" falls back to the cached quick measurement."""
    if profile is None or isinstance(profile, Profile):
        return profile, ""
    if str(profile) == "local-cpu":
        try:
            return calibrate.local_profile().profile, ""
        except (OSError, ConfigError) as e:  # an unwritable $MINIGPT_HOME, say
            return None, f"no local-cpu profile and no quick measurement: {e}"
    try:
        return profiles.load_profile(profile), ""
    except ConfigError as e:
        return None, f"no hardware profile: {e}"


def layers_of(rows: list[dict], seconds: float, prof: Profile | None, power: PowerFigure,
              measured: Measurement | None, s: Settings, no_profile: str = "") -> list[Layer]:
    """The four layers of a finished run's rows and measured seconds at `power`; prof is the
    roofline's profile, or None and no_profile says why (find_profile's reason)."""
    why = power.text
    if prof is None and power.watts is None:
        why = f"needs a power figure ({no_profile or 'no hardware profile'}; or pass --watts)"
    return [measured_layer(measured, s), time_power_layer(seconds, power.watts, why, s),
            roofline_layer(rows, prof, power.watts, why if prof else no_profile or why, s, seconds),
            floor_layer(rows, s)]


def run_layers(rows: list[dict], seconds: float, profile: Profile | str | None = "local-cpu",
               measured: Measurement | None = None, watts: float | None = None,
               s: Settings | None = None, estimate: bool = True) -> list[Layer]:
    """The four layers at the best power figure power_figure finds (`estimate`=False: never the
    CPU estimate, e.g. on a GPU). minigpt.energy.run_energy.build makes the same layers and the
    document a run stores and prints."""
    prof, no_profile = find_profile(profile)
    power = power_figure(prof, watts, measured, estimate)
    return layers_of(rows, seconds, prof, power, measured, s or settings(), no_profile)
