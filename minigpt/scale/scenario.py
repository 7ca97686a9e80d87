"""Scaling scenarios: a TOML file naming a model, a workload and hardware, read and checked here.

Published estimates state their inputs in different terms; a scenario takes each in its own.

    name = "gpt3-175b"            # optional; description = "..." too
    [model]      n_layer, n_embd, n_head, block_size, vocab_size   (an architecture), and/or
                 params (a stated parameter count), active_params; d_head (shown, not used);
                 n_experts, experts_per_token, moe_every (mixture of experts: the same
                 closed form as the trained MoE of minigpt/nn/moe.py, under balanced routing).
                 Optional for training: [training] flops alone is enough
    [training]   the work, in any of these terms:
                 flops                    a published total (used instead of the computed one)
                 tokens                   with [model]: FLOPs by our closed form (or 6ND)
                 chip_hours               accelerator-hours (LLaMA, BLOOM style), or
                 days                     wall-clock days, with [hardware] chips
                 batch_tokens, gradient_bytes: the data-parallel gradient allreduce
                 (minigpt/scale/communication.py; needs tokens and [hardware] chips)
                 With FLOPs, give a rate ([hardware] achieved_flops_per_chip or mfu) OR a duration
                 (chip_hours, days): the other is derived (implied FLOP/s per chip and MFU).
                 energy_mwh               a published training energy (MWh drawn, after PUE): the
                                          break-even uses it; alone, it is the whole [training]
    [inference]  prompt_tokens, output_tokens, batch, weight_bits, kv_bits, chips,
                 queries_per_day, mfu (serving utilisation of peak: a compute-bound estimate,
                 FLOPs per query / (peak × mfu); without it, the roofline), wh_per_query (a stated
                 figure, used instead of either; then the workload keys are optional);
                 tokens_per_s, latency_s (observed speed and time to first token: the throughput
                 form, Jegham et al. 2025, with [hardware] accelerator_utilization, host_watts,
                 host_utilization; needs output_tokens, no model);
                 accelerator_share, host_share, idle_share (shares of the total per-query energy,
                 as Google 2025 reports them; overhead is the rest, and must agree with
                 1 - 1/PUE where [hardware] pue is given, within the rounding of the figures)
    [hardware]   profile, chips, achieved_flops_per_chip | mfu, dtype, memory_bandwidth,
                 watts_per_chip (W per accelerator), power_basis ("chip": the accelerator's rated
                 power, the default; "system": the whole system's power per accelerator, e.g.
                 DGX A100 6.5 kW / 8; with watts_per_chip it labels the given figure),
                 power_fraction (average draw as a share of that rating, default 1),
                 pue, carbon_kg_per_kwh (gross), carbon_net_kg_per_kwh (net of carbon-free
                 energy purchases), water_onsite_l_per_kwh (litres per kWh of IT energy, before
                 PUE: the WUE; water_l_per_kwh is an alias), water_offsite_l_per_kwh (litres per
                 kWh drawn, after PUE: the generation's water), household_kwh_per_year,
                 interconnect (nvlink | pcie | infiniband: which profile link the allreduce
                 crosses; default the slowest), interconnect_bandwidth (bytes/s each way);
                 accelerator_utilization (share of the accelerators' power drawn, default 1),
                 host_watts (the host's power beside the accelerators: CPU, DRAM, network),
                 host_utilization (its share drawn, default 1): the throughput form's powers

minigpt/scale/scenarios/*.toml are the shipped scenarios (load them by name: "gpt3-175b"); their comments cite
every figure. `--set section.key=value` overrides a field. Anything wrong (an unknown key, with the
nearest one suggested; a negative number; a missing profile) raises ConfigError naming the file or
the --set and the field.
"""

import difflib
import math
import sys
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from minigpt.config import _parse_override  # the same section.key=value syntax as training configs
from minigpt.errors import ConfigError

SCENARIO_DIR = Path(__file__).parent / "scenarios"
TOP_LEVEL = ("name", "description")
PUBLISHED = "published"  # [published]: the figures the scenario's source gives, to compare with
PUBLISHED_KEYS = ("train_flops_used", "chip_hours", "days", "flops_per_chip", "mfu",
                  "energy_it_mwh", "energy_mwh", "co2_tonnes", "co2_net_tonnes", "water_onsite_m3",
                  "water_offsite_m3", "water_m3", "flops_per_query", "wh_per_query",
                  "co2_g_per_query", "water_ml_per_query", "gwh_per_year", "breakeven_days")
ARCH = ("n_layer", "n_embd", "n_head", "block_size", "vocab_size")
PEAK_DTYPES = ("fp32", "tf32", "fp16", "int8")
POWER_BASES = ("chip", "system")
SHARES = ("accelerator_share", "host_share", "idle_share")  # Google 2025's order, overhead last
WORK = ("flops", "tokens", "chip_hours", "days")  # [training] keys that give the work
RATES = (("hardware", "achieved_flops_per_chip"), ("hardware", "mfu"))
DURATIONS = (("training", "chip_hours"), ("training", "days"))

# section -> key -> (type, rule): "int" / "num" / "str"; rule ">0", ">=0", "(0,1]", ">=1", "bits"
SCHEMA: dict[str, dict[str, tuple[str, str]]] = {
    "model": {**{k: ("int", ">0") for k in ARCH}, "d_head": ("int", ">0"),
              "n_experts": ("int", ">0"), "experts_per_token": ("int", ">0"),
              "moe_every": ("int", ">0"),
              "params": ("num", ">0"), "active_params": ("num", ">0")},
    "training": {"tokens": ("num", ">0"), "flops": ("num", ">0"), "chip_hours": ("num", ">0"),
                 "days": ("num", ">0"),
                 "batch_tokens": ("num", ">0"), "gradient_bytes": ("num", ">0"),
                 "energy_mwh": ("num", ">0")},
    "inference": {"prompt_tokens": ("int", ">=0"), "output_tokens": ("int", ">0"),
                  "batch": ("int", ">0"), "weight_bits": ("int", "bits"),
                  "kv_bits": ("int", "bits"),
                  "chips": ("int", ">0"), "queries_per_day": ("num", ">=0"),
                  "wh_per_query": ("num", ">0"), "mfu": ("num", "(0,1]"),
                  "tokens_per_s": ("num", ">0"), "latency_s": ("num", ">=0"),
                  **{k: ("num", "[0,1]") for k in SHARES}},
    "hardware": {"profile": ("str", ""), "chips": ("int", ">0"),
                 "achieved_flops_per_chip": ("num", ">0"), "mfu": ("num", "(0,1]"),
                 "dtype": ("str", "dtype"), "watts_per_chip": ("num", ">0"),
                 "memory_bandwidth": ("num", ">0"), "pue": ("num", ">=1"),
                 "carbon_kg_per_kwh": ("num", ">=0"), "water_l_per_kwh": ("num", ">=0"),
                 "household_kwh_per_year": ("num", ">0"), "power_basis": ("str", "basis"),
                 "power_fraction": ("num", "(0,1]"), "carbon_net_kg_per_kwh": ("num", ">=0"),
                 "water_onsite_l_per_kwh": ("num", ">=0"),
                 "water_offsite_l_per_kwh": ("num", ">=0"),
                 "interconnect": ("str", ""), "interconnect_bandwidth": ("num", ">0"),
                 "accelerator_utilization": ("num", "(0,1]"), "host_watts": ("num", ">=0"),
                 "host_utilization": ("num", "[0,1]")},
}
RULES = {">0": "must be > 0", ">=0": "must be >= 0", "(0,1]": "must be in (0, 1]",
         "[0,1]": "must be in [0, 1]",
         ">=1": "must be >= 1 (facility energy over IT energy)", "bits": "must be 1 to 32 bits"}


@dataclass
class Scenario:
    """A checked scenario: values by section, and where each one came from (file or --set)."""

    name: str
    description: str = ""
    path: Path | None = None
    values: dict[str, dict] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)  # "hardware.mfu" -> "--set ..."
    published: dict[str, float] = field(default_factory=dict)  # output key -> the source's figure
    published_source: str = ""

    def get(self, section: str, key: str, default=None):
        return self.values.get(section, {}).get(key, default)

    def has(self, section: str) -> bool:
        return bool(self.values.get(section))

    def where(self, section: str, key: str | None = None) -> str:
        """The file or --set that gave a field (the file, for a missing one)."""
        return self.origins.get(f"{section}.{key}", str(self.path or "scenario"))


def _nearest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(where: str, section: str, key: str, value):
    """Type and range of one field; integral floats (300e9 written for an int) become ints."""
    if section not in SCHEMA:
        raise ConfigError(f"{where}: unknown section [{section}]{_nearest(section, SCHEMA)}")
    if key not in SCHEMA[section]:
        raise ConfigError(f"{where}: unknown key {key!r} in [{section}]"
                          f"{_nearest(key, SCHEMA[section])}")
    kind, rule = SCHEMA[section][key]
    label = f"{where}: [{section}] {key}"
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{label}: expected a non-empty string, got {value!r}")
        if rule == "dtype" and value not in PEAK_DTYPES:
            raise ConfigError(f"{label}: must be one of {', '.join(PEAK_DTYPES)}, not {value!r}"
                              f"{_nearest(value, PEAK_DTYPES)}")
        if rule == "basis" and value not in POWER_BASES:
            raise ConfigError(f"{label}: must be \"chip\" (the accelerator's rated power) or "
                              f"\"system\" (the whole system's power per accelerator), not "
                              f"{value!r}{_nearest(value, POWER_BASES)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"{label}: expected a number, got {value!r}")
    if kind == "int":
        if value != int(value):
            raise ConfigError(f"{label}: expected a whole number, got {value!r}")
        value = int(value)
    ok = {">0": value > 0, ">=0": value >= 0, "(0,1]": 0 < value <= 1, "[0,1]": 0 <= value <= 1,
          ">=1": value >= 1, "bits": 1 <= value <= 32}[rule]
    if not ok or math.isinf(value):
        raise ConfigError(f"{label}: {RULES[rule]}, got {value!r}")
    return value


def _require(scn: Scenario, section: str, keys) -> None:
    for key in keys:
        if scn.get(section, key) is None:
            raise ConfigError(f"{scn.where(section)}: [{section}] missing required field {key!r}")


def _validate_model(scn: Scenario) -> None:
    m = scn.values.get("model", {})
    if not m:  # training in its own terms (flops, chip_hours, days) needs no model
        if scn.has("inference") and scn.get("inference", "wh_per_query") is None and (
                scn.get("inference", "tokens_per_s") is None):
            raise ConfigError(f"{scn.where('inference')}: [inference] needs a [model] (params or "
                              f"an architecture: {', '.join(ARCH)}), a stated wh_per_query, or "
                              f"tokens_per_s (the throughput form)")
        return
    arch = [k for k in ARCH if k in m]
    if not arch and "params" not in m:
        raise ConfigError(f"{scn.where('model')}: [model] needs an architecture "
                          f"({', '.join(ARCH)}) or params = <count>")
    if arch:
        _require(scn, "model", ARCH)
    moe = "n_experts" in m or "experts_per_token" in m
    if moe:
        _require(scn, "model", ("n_experts", "experts_per_token"))
        if m["experts_per_token"] > m["n_experts"]:
            raise ConfigError(f"{scn.where('model', 'experts_per_token')}: [model] "
                              f"experts_per_token = {m['experts_per_token']} exceeds n_experts = "
                              f"{m['n_experts']}")
    if "params" in m and "active_params" not in m and moe:
        raise ConfigError(f"{scn.where('model', 'params')}: [model] a stated params count of a "
                          f"mixture of experts needs active_params too")
    if "active_params" in m and m["active_params"] > m.get("params", float("inf")):
        raise ConfigError(f"{scn.where('model', 'active_params')}: [model] active_params exceeds "
                          f"params")
    if "active_params" in m and "params" not in m:
        raise ConfigError(f"{scn.where('model', 'active_params')}: [model] active_params needs "
                          f"params (the total)")


def flops_known(scn: Scenario) -> bool:
    """Can the training FLOPs be had: published, or tokens with a model to count them?"""
    return scn.get("training", "flops") is not None or (
        scn.get("training", "tokens") is not None and scn.has("model"))


def training_work_given(scn: Scenario) -> bool:
    """Does [training] give the work (flops, tokens, chip_hours, days), not only energy_mwh?"""
    return any(scn.get("training", k) is not None for k in WORK)


def _validate_training(scn: Scenario) -> None:
    hw, where = scn.values.get("hardware", {}), scn.where("training")
    if not training_work_given(scn) and scn.get("training", "energy_mwh") is not None:
        return  # a published energy alone: nothing to compute the run from
    rate = next((k for s, k in RATES if k in hw), None)
    given = [k for s, k in DURATIONS if scn.get(s, k) is not None]
    if len(given) == 2:
        raise ConfigError(f"{scn.where('training', 'days')}: [training] give chip_hours or days, "
                          f"not both")
    if "days" in given and "chips" not in hw:
        raise ConfigError(f"{scn.where('training', 'days')}: [training] days needs [hardware] "
                          f"chips (chip-hours = chips × days × 24)")
    if given and rate:
        raise ConfigError(f"{scn.where('hardware', rate)}: [hardware] {rate}: the run's "
                          f"{given[0]} is given, so the rate is implied by FLOPs / chip-hours; "
                          f"give a rate or a duration, not both")
    if given:
        return
    if not flops_known(scn):
        raise ConfigError(f"{where}: [training] needs the work: flops, tokens with a [model], "
                          f"chip_hours, or days with [hardware] chips (or energy_mwh alone)")
    if not rate:
        raise ConfigError(f"{scn.where('hardware')}: [hardware] training needs "
                          f"achieved_flops_per_chip or mfu (the share of peak reached), or "
                          f"[training] chip_hours or days")


THROUGHPUT_ONLY = (("inference", "latency_s"), ("hardware", "accelerator_utilization"),
                   ("hardware", "host_watts"), ("hardware", "host_utilization"))


def _validate_throughput(scn: Scenario) -> None:
    """The throughput form's keys mean nothing without tokens_per_s; the host is counted once."""
    if scn.get("inference", "tokens_per_s") is None:
        for section, key in THROUGHPUT_ONLY:
            if scn.get(section, key) is not None:
                raise ConfigError(f"{scn.where(section, key)}: [{section}] {key} belongs to the "
                                  f"throughput form: give [inference] tokens_per_s too")
        return
    if scn.get("inference", "output_tokens") is None:
        raise ConfigError(f"{scn.where('inference', 'tokens_per_s')}: [inference] tokens_per_s "
                          f"needs output_tokens (seconds = output_tokens / tokens_per_s + "
                          f"latency_s)")
    hw = scn.values.get("hardware", {})
    if "host_utilization" in hw and "host_watts" not in hw:
        raise ConfigError(f"{scn.where('hardware', 'host_utilization')}: [hardware] "
                          f"host_utilization needs host_watts")
    if "host_watts" in hw and hw.get("power_basis") == "system":
        raise ConfigError(f"{scn.where('hardware', 'host_watts')}: [hardware] host_watts with "
                          f"power_basis = \"system\" counts the host twice (the system's power "
                          f"per accelerator includes it): give the accelerator's own watts")


PUBLISHED_ROUNDING = 0.005  # shares in whole per cent, PUEs to two decimals: ± half the last unit


def rounding(value: float) -> float:
    """Half a unit in the last decimal place of a published share or PUE: 0.58 -> 0.005, 1.125 ->
    0.0005; at most PUBLISHED_ROUNDING (TOML reads 0.10 as 0.1, losing the written zero); 0 for a
    whole number (a share of 0 or 1 is exact)."""
    if value == int(value):
        return 0.0
    written = 0.5 * 10.0 ** Decimal(repr(float(value))).as_tuple().exponent
    return min(written, PUBLISHED_ROUNDING)


def overhead_tolerance(shares, pue: float | None) -> float:
    """How far the shares' rest may sit from 1 - 1/PUE: the rounding of each share, plus the PUE's
    carried through d(1 - 1/PUE) / dPUE = 1 / PUE²."""
    pue_part = rounding(pue) / pue ** 2 if pue is not None else 0.0
    return sum(rounding(x) for x in shares) + pue_part


def overhead_share(scn: Scenario) -> float | None:
    """The share of a query's energy outside the IT equipment: 1 - the three shares (None: not
    given)."""
    shares = [scn.get("inference", k) for k in SHARES]
    return None if None in shares else 1 - sum(shares)


def _validate_shares(scn: Scenario) -> None:
    """All three shares or none; they leave a rest of at least 0 (the overhead), and that rest
    agrees with the PUE, where one is given, within the rounding of the figures written."""
    given = [k for k in SHARES if scn.get("inference", k) is not None]
    if not given:
        return
    if len(given) < len(SHARES):
        missing = [k for k in SHARES if k not in given]
        raise ConfigError(f"{scn.where('inference', given[0])}: [inference] {given[0]} needs "
                          f"{' and '.join(missing)} too (overhead is the rest of the three)")
    rest = overhead_share(scn)
    shares = [scn.get("inference", k) for k in SHARES]
    if rest < -overhead_tolerance(shares, None):
        raise ConfigError(f"{scn.where('inference', given[-1])}: [inference] "
                          f"{' + '.join(SHARES)} = {1 - rest:.4g} exceeds 1")
    pue = scn.get("hardware", "pue")
    if pue is None:
        return
    outside = 1 - 1 / pue  # the overhead's share of the energy drawn
    tolerance = overhead_tolerance(shares, pue)
    if abs(max(rest, 0.0) - outside) > tolerance:
        origins = [scn.where("hardware", "pue")] + [scn.where("inference", k) for k in SHARES]
        where = next((o for o in origins if o.startswith("--set")), origins[-1])  # a --set first
        raise ConfigError(f"{where}: [inference] the shares leave "
                          f"{100 * rest:.3g}% for overhead, but [hardware] pue = {pue:g} means "
                          f"1 - 1/PUE = {100 * outside:.3g}% (more than the rounding of the "
                          f"figures, ±{100 * tolerance:.2g} points, apart)")


def validate(scn: Scenario) -> Scenario:
    """Checks that involve more than one field."""
    _validate_model(scn)
    if scn.has("training"):
        _validate_training(scn)
    if scn.has("inference") and scn.get("inference", "wh_per_query") is None:
        throughput = scn.get("inference", "tokens_per_s") is not None
        _require(scn, "inference", ("output_tokens",) if throughput else
                 ("prompt_tokens", "output_tokens"))
    _validate_throughput(scn)
    _validate_shares(scn)
    if scn.has("inference") and scn.get("inference", "output_tokens") is not None:
        block = scn.get("model", "block_size")
        used = scn.get("inference", "prompt_tokens", 0) + scn.get("inference", "output_tokens")
        if block is not None and used > block:
            raise ConfigError(f"{scn.where('inference', 'output_tokens')}: [inference] "
                              f"prompt_tokens + output_tokens = {used} exceeds block_size = "
                              f"{block}")
    _require(scn, "hardware", ("profile",))
    hw = scn.values["hardware"]
    if "achieved_flops_per_chip" in hw and "mfu" in hw:
        raise ConfigError(f"{scn.where('hardware', 'mfu')}: [hardware] give achieved_flops_per_chip"
                          f" or mfu, not both")
    if "water_l_per_kwh" in hw and "water_onsite_l_per_kwh" in hw:
        raise ConfigError(f"{scn.where('hardware', 'water_l_per_kwh')}: [hardware] "
                          f"water_l_per_kwh is another name for water_onsite_l_per_kwh: give one")
    return scn


def resolve(name_or_path: str | Path) -> Path:
    """A scenario file by path, or a shipped one by name ("gpt3-175b")."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SCENARIO_DIR / f"{name_or_path}.toml"
    if shipped.is_file():
        try:
            return shipped.relative_to(Path.cwd())  # shorter to read in reports
        except ValueError:
            return shipped
    names = sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")) if SCENARIO_DIR.is_dir() else []
    hint = _nearest(str(name_or_path), names)
    raise ConfigError(f"{name_or_path}: no such scenario file{hint}; shipped: "
                      f"{', '.join(names) or 'none found'} (in {SCENARIO_DIR})")


def from_dict(d: dict, where: str = "scenario", path: Path | None = None) -> Scenario:
    """A parsed scenario (sections of key = value) -> Scenario, each field checked."""
    scn = Scenario(name=str(d.get("name") or (path.stem if path else "scenario")), path=path)
    scn.description = str(d.get("description", ""))
    for section, table in d.items():
        if section == PUBLISHED:
            _published(scn, table, where)
            continue
        if section in TOP_LEVEL:
            if not isinstance(table, str):
                raise ConfigError(f"{where}: {section}: expected a string, got {table!r}")
            continue
        if not isinstance(table, dict):
            hint = "" if section in SCHEMA else _nearest(section, [*SCHEMA, *TOP_LEVEL])
            raise ConfigError(f"{where}: {section!r} must be a [section] table{hint}")
        for key, value in table.items():
            set_value(scn, section, key, value, where)
    return scn


def _published(scn: Scenario, table, where: str) -> None:
    """[published] source = "...", then output keys (energy_mwh = 1287, ...) with the source's
    figures: shown beside ours in the report and checked by the tests (within 2%)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: published must be a [published] table")
    for key, value in table.items():
        label = f"{where}: [published] {key}"
        if key == "source":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{label}: expected a non-empty string")
            scn.published_source = value
        elif key not in PUBLISHED_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} in [published]"
                              f"{_nearest(key, PUBLISHED_KEYS)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{label}: expected a positive number, got {value!r}")
        else:
            scn.published[key] = float(value)
    if scn.published and not scn.published_source:
        raise ConfigError(f"{where}: [published] missing required field 'source'")


EITHER_OR = RATES + DURATIONS  # one of these fixes the others (with FLOPs)


def set_value(scn: Scenario, section: str, key: str, value, where: str) -> None:
    """Set one field; a --set of a rate (mfu, achieved_flops_per_chip) or a duration (chip_hours,
    days) drops the file's other rate and durations, and a --set of power_basis the file's
    watts_per_chip, so the override takes effect."""
    table = scn.values.setdefault(section, {})
    table[key] = _check(where, section, key, value)
    replaces = EITHER_OR if (section, key) in EITHER_OR else (
        (("hardware", "watts_per_chip"),) if (section, key) == ("hardware", "power_basis") else ())
    if replaces and where.startswith("--set"):
        for sec, other in replaces:
            if other != key and other in scn.values.get(sec, {}) and (
                    scn.where(sec, other) == str(scn.path)):
                del scn.values[sec][other]
                scn.origins.pop(f"{sec}.{other}")
    scn.origins[f"{section}.{key}"] = where


def load(name_or_path: str | Path, overrides=()) -> Scenario:
    """Read a scenario (a path or a shipped name) and apply 'section.key=value' overrides."""
    path = resolve(name_or_path)
    try:
        d = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    scn = from_dict(d, str(path), path)
    for text in overrides:
        section, key, value, where = _parse_override(text, example="hardware.mfu")
        set_value(scn, section, key, value, where)
    return validate(scn)
