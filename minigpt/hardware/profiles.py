"""Hardware profiles and energy constants: TOML data files in which every figure carries its source.

A profile (minigpt/hardware/data/<name>.toml, $MINIGPT_HOME/hardware/<name>.toml, or any path)
holds a name, a description and one table per figure:

    name = "h100-sxm"
    description = "NVIDIA H100 SXM5 80 GB (Hopper), HBM3"

    [peak_flops.fp16]        # one table per dtype: fp32, tf32, fp16 (= bf16), int8; DENSE peaks
    value = 989.4e12         # SI base units: FLOP/s
    source = "where the figure was published"
    note = "optional: caveats, alternatives, the choice made"

    [memory_bandwidth]       # bytes/s      [memory_bytes]  bytes      [power_watts]  TDP/TGP, W
    [system_power_watts]     # optional: the whole system's power per accelerator, W (a server's
                             # maximum rating over its accelerators, e.g. DGX A100 6.5 kW / 8, or
                             # a published measured average where no rating is; the note says which)

    [interconnect.nvlink]    # optional: nvlink, pcie, infiniband; bytes/s EACH WAY per chip (a
    value = 450e9            # link sends this much while it receives as much; NVIDIA's headline
                             # NVLink figures count both directions and are twice these)

    [bandwidth.read.all_cores]   # optional: measured STREAM bandwidths, bytes/s (read, write,
    value = 33.0e9               # copy, triad; one_thread or all_cores), bytes read + written per
    source = "measured by ..."   # second; the note says how (minigpt.hardware.bandwidth). The
    note = "numba prange, ..."   # roofline holds each op against the kind its read/write mix fits
                                 # and falls back to memory_bandwidth where a kind is not given

A value may instead be the string "unknown" (nobody published it) or "unsupported" (the device has
no such format): both load as None, and `peak` / `require` refuse them with a message rather than
guessing. A number needs a source. A user directory, $MINIGPT_HOME/hardware (default
~/.minigpt/hardware, where `minigpt calibrate` saves local-cpu.toml), is searched after the
packaged profiles; a user file with a packaged name shadows it (Profile.path says which was read).

constants.toml beside the profiles has sourced defaults for energy estimates (PUE, grid carbon,
per-operation energies) as tables {value, unit, source, note, arithmetic}; `load_constants` returns
them by dotted name ("energy_per_op.fp32_mult"). Anything malformed raises ConfigError, one line
naming the file and the field.
"""

import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from minigpt.errors import ConfigError
from minigpt.units import rows_text

DTYPES = ("fp32", "tf32", "fp16", "int8")  # required in every profile
OPTIONAL_DTYPES = ("fp64",)  # measured by `minigpt calibrate`; "unknown" when absent
DTYPE_ALIASES = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "half": "fp16", "bf16": "fp16",
                 "bfloat16": "fp16"}
FIGURES = ("memory_bandwidth", "memory_bytes", "power_watts")
OPTIONAL_FIGURES = ("system_power_watts",)  # "unknown" when absent
PROFILE_KEYS = ("name", "description", "peak_flops") + FIGURES + OPTIONAL_FIGURES
LINKS = ("nvlink", "pcie", "infiniband")  # [interconnect.*], optional: absent = unknown
STREAM_KINDS = ("read", "write", "copy", "triad")  # [bandwidth.<kind>.<threading>], optional
THREADINGS = ("one_thread", "all_cores")
OPTIONAL_KEYS = ("interconnect", "bandwidth")
MISSING = ("unknown", "unsupported")
ENTRY_KEYS = ("value", "source", "note")
CONSTANT_KEYS = ("value", "unit", "source", "note", "arithmetic")
PACKAGED = Path(__file__).parent / "data"
CONSTANTS_FILE = "constants.toml"


@dataclass
class Profile:
    """One device. None means "unknown" or "unsupported" (see `missing`), never zero."""

    name: str
    description: str
    peak_flops: dict[str, float | None]
    memory_bandwidth: float | None
    memory_bytes: float | None
    power_watts: float | None
    interconnect: dict[str, float | None] = field(default_factory=dict)  # link -> bytes/s each way
    sources: dict[str, str] = field(default_factory=dict)  # "peak_flops.fp16" -> source
    notes: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # field -> "unknown" | "unsupported"
    path: Path | None = None
    system_power_watts: float | None = None  # whole system per accelerator, W (host share in)
    bandwidth: dict[str, float] = field(default_factory=dict)  # "read.all_cores" -> bytes/s, given only


@dataclass(frozen=True)
class Constant:
    """One sourced default; value None means unknown (the quantity is then not estimated)."""

    value: float | None
    unit: str
    source: str = ""
    note: str = ""
    arithmetic: str = ""


def user_dir() -> Path:
    """$MINIGPT_HOME/hardware, MINIGPT_HOME defaulting to ~/.minigpt."""
    return Path(os.environ.get("MINIGPT_HOME") or "~/.minigpt").expanduser() / "hardware"


def _read_toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def _entry(path: Path, key: str, raw, allowed: tuple[str, ...]) -> float | None:
    """Check one {value, source, ...} table: its value as a float, None if unknown/unsupported."""
    where = f"{path}: {key}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table with value and source ([{key}] value = ..., "
                          f"source = \"...\"), got {raw!r}")
    extra = sorted(set(raw) - set(allowed))
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown field (expected {', '.join(allowed)})")
    if "value" not in raw:
        raise ConfigError(f"{where}: missing required field 'value'")
    for k in allowed[1:]:
        if not isinstance(raw.get(k, ""), str):
            raise ConfigError(f"{where}.{k}: must be a string, got {raw[k]!r}")
    value = raw["value"]
    if isinstance(value, str):
        if value not in MISSING:
            raise ConfigError(f"{where}.value: must be a number, \"unknown\" or \"unsupported\", "
                              f"got {value!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.value: must be a number, got {value!r}")
    if value <= 0:
        raise ConfigError(f"{where}.value: must be positive, got {value!r}")
    if not raw.get("source", "").strip():
        raise ConfigError(f"{where}: missing required field 'source' (where was it published?)")
    return float(value)


def _unknown_key(path: Path, key: str, expected) -> ConfigError:
    hint = difflib.get_close_matches(key, expected, n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"{path}: {key}: unknown field (expected {', '.join(expected)}){did}")


def profile_from_dict(d: dict, path: Path) -> Profile:
    """A parsed profile file -> Profile, validated; errors name `path` and the field."""
    for key in d:
        if key not in PROFILE_KEYS + OPTIONAL_KEYS:
            raise _unknown_key(path, key, PROFILE_KEYS + OPTIONAL_KEYS)
    for key in PROFILE_KEYS:
        if key not in d and key not in OPTIONAL_FIGURES:
            raise ConfigError(f"{path}: missing required field '{key}'")
    for key in ("name", "description"):
        if not isinstance(d[key], str) or not d[key].strip():
            raise ConfigError(f"{path}: {key}: must be a non-empty string")
    peaks = d["peak_flops"]
    if not isinstance(peaks, dict):
        raise ConfigError(f"{path}: peak_flops: expected tables [peak_flops.fp32] ... "
                          f"[peak_flops.int8]")
    for dtype in peaks:
        if dtype not in DTYPES + OPTIONAL_DTYPES:
            raise ConfigError(f"{path}: peak_flops.{dtype}: unknown dtype (expected one of "
                              f"{', '.join(DTYPES + OPTIONAL_DTYPES)}; bf16 goes under fp16)")
    raws = {}
    for dtype in DTYPES:
        if dtype not in peaks:
            raise ConfigError(f"{path}: missing required field 'peak_flops.{dtype}' "
                              f"(write value = \"unknown\" when no figure is published)")
        raws[f"peak_flops.{dtype}"] = peaks[dtype]
    for dtype in OPTIONAL_DTYPES:
        raws[f"peak_flops.{dtype}"] = peaks.get(dtype, {"value": "unknown"})
    raws.update({key: d[key] for key in FIGURES})
    raws.update({key: d.get(key, {"value": "unknown"}) for key in OPTIONAL_FIGURES})
    raws.update(_interconnect_raws(d.get("interconnect", {}), path))
    raws.update(_bandwidth_raws(d.get("bandwidth", {}), path))
    values, sources, notes, missing = {}, {}, {}, {}
    for key, raw in raws.items():
        values[key] = _entry(path, key, raw, ENTRY_KEYS)
        if raw.get("source"):
            sources[key] = raw["source"]
        if raw.get("note"):
            notes[key] = raw["note"]
        if values[key] is None:
            missing[key] = raw["value"]
    return Profile(name=d["name"], description=d["description"],
                   peak_flops={t: values[f"peak_flops.{t}"] for t in DTYPES + OPTIONAL_DTYPES},
                   memory_bandwidth=values["memory_bandwidth"], memory_bytes=values["memory_bytes"],
                   power_watts=values["power_watts"], sources=sources, notes=notes,
                   missing=missing, path=path, system_power_watts=values["system_power_watts"],
                   interconnect={k: values[f"interconnect.{k}"] for k in LINKS},
                   bandwidth={k.split(".", 1)[1]: v for k, v in values.items()
                              if k.startswith("bandwidth.") and v is not None})


def _interconnect_raws(table, path: Path) -> dict:
    """[interconnect.nvlink] ... as {"interconnect.nvlink": raw}; a link not given is unknown."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: interconnect: expected tables [interconnect.nvlink] ... "
                          f"[interconnect.infiniband]")
    for link in table:
        if link not in LINKS:
            raise _unknown_key(path, f"interconnect.{link}", [f"interconnect.{k}" for k in LINKS])
    return {f"interconnect.{k}": table.get(k, {"value": "unknown"}) for k in LINKS}


def _bandwidth_raws(table, path: Path) -> dict:
    """[bandwidth.read.all_cores] ... as {"bandwidth.read.all_cores": raw}; only those given."""
    where = f"expected tables [bandwidth.<{'|'.join(STREAM_KINDS)}>.<{'|'.join(THREADINGS)}>]"
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: bandwidth: {where}")
    out = {}
    for kind, sub in table.items():
        if kind not in STREAM_KINDS:
            raise _unknown_key(path, f"bandwidth.{kind}", [f"bandwidth.{k}" for k in STREAM_KINDS])
        if not isinstance(sub, dict) or "value" in sub:
            raise ConfigError(f"{path}: bandwidth.{kind}: {where}")
        for threading, raw in sub.items():
            if threading not in THREADINGS:
                raise _unknown_key(path, f"bandwidth.{kind}.{threading}",
                                   [f"bandwidth.{kind}.{t}" for t in THREADINGS])
            out[f"bandwidth.{kind}.{threading}"] = raw
    return out


class StreamBandwidth(NamedTuple):
    """A profile's best measured bandwidth for one kind of pass, and how it was measured."""

    kind: str  # read, write, copy, triad
    value: float  # bytes/s
    key: str  # "read.all_cores": which threading gave the best figure
    note: str  # the method, as the profile states it


def stream_bandwidth(profile: Profile, kind: str) -> StreamBandwidth | None:
    """The best of a kind's measured figures (one thread or all cores); None where not given."""
    if kind not in STREAM_KINDS:
        raise ConfigError(f"{profile.name}: no bandwidth kind {kind!r} (expected "
                          f"{', '.join(STREAM_KINDS)})")
    given = [(v, f"{kind}.{t}") for t in THREADINGS if (v := profile.bandwidth.get(f"{kind}.{t}"))]
    if not given:
        return None
    value, key = max(given)
    return StreamBandwidth(kind, value, key, profile.notes.get(f"bandwidth.{key}", ""))


def link_bandwidth(profile: Profile, link: str) -> float:
    """A link's bytes/s each way (nvlink, pcie, infiniband); ConfigError when unknown."""
    if link not in LINKS:
        raise ConfigError(f"{profile.name}: no interconnect {link!r} (expected "
                          f"{', '.join(LINKS)})")
    value = profile.interconnect.get(link)
    if value is None:
        raise ConfigError(f"{profile.name}: interconnect.{link} "
                          f"{_why(profile, f'interconnect.{link}')}")
    return value


def _profile_paths() -> dict[str, Path]:
    """name -> file: the packaged profiles, then the user's directory (same name shadows)."""
    found: dict[str, Path] = {}
    for folder in (PACKAGED, user_dir()):
        if folder.is_dir():
            for p in sorted(folder.glob("*.toml")):
                if p.name not in (CONSTANTS_FILE, "cpu_power.toml"):  # data, not profiles
                    found[p.stem] = p
    return found


def load_profile(name_or_path: str | Path) -> Profile:
    """A packaged or user profile by name ("h100-sxm"), or a profile file by path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith(".toml") or "/" in text or os.sep in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"{path}: hardware profile file not found")
        return profile_from_dict(_read_toml(path), path)
    paths = _profile_paths()
    if text not in paths:
        hint = [n for n in sorted(paths) if n.startswith(text)] or difflib.get_close_matches(
            text, list(paths), n=1)
        did = f" (did you mean {' or '.join(map(repr, hint))}?)" if hint else ""
        raise ConfigError(f"unknown hardware profile {text!r}{did}; known: "
                          f"{', '.join(sorted(paths))}, or a path to a .toml file")
    return profile_from_dict(_read_toml(paths[text]), paths[text])


def list_profiles() -> list[Profile]:
    """Every profile by name, packaged and the user's, sorted by name."""
    return [load_profile(path) for _, path in sorted(_profile_paths().items())]


def load_constants(path: str | Path | None = None) -> dict[str, Constant]:
    """constants.toml (or another file of that shape) -> {dotted name: Constant}."""
    path = Path(path) if path is not None else PACKAGED / CONSTANTS_FILE
    out: dict[str, Constant] = {}

    def walk(table: dict, prefix: str) -> None:
        for key, raw in table.items():
            name = prefix + key
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: {name}: expected a table with value, unit and source")
            if raw and all(isinstance(v, dict) for v in raw.values()):
                walk(raw, name + ".")  # a group, e.g. [energy_per_op.*]
                continue
            value = _entry(path, name, raw, CONSTANT_KEYS)
            if not raw.get("unit", "").strip():
                raise ConfigError(f"{path}: {name}: missing required field 'unit'")
            out[name] = Constant(value, raw["unit"], raw.get("source", ""), raw.get("note", ""),
                                 raw.get("arithmetic", ""))

    walk(_read_toml(path), "")
    return out


def _why(profile: Profile, key: str) -> str:
    state = profile.missing.get(key, "unknown")
    said = "is unknown" if state == "unknown" else "is not supported by this device"
    note = profile.notes.get(key)
    return said + (f" ({note})" if note else "")


def peak(profile: Profile, dtype: str) -> float:
    """Dense peak FLOP/s for a dtype ("fp32", "bf16", "float16"...); ConfigError when unknown."""
    key = DTYPE_ALIASES.get(dtype, dtype)
    if key not in DTYPES + OPTIONAL_DTYPES:
        raise ConfigError(f"{profile.name}: no peak for dtype {dtype!r} (profiles give "
                          f"{', '.join(DTYPES + OPTIONAL_DTYPES)})")
    value = profile.peak_flops.get(key)
    if value is None:
        raise ConfigError(f"{profile.name}: peak {key} FLOP/s {_why(profile, f'peak_flops.{key}')}")
    return value


def require(profile: Profile, figure: str) -> float:
    """memory_bandwidth, memory_bytes, power_watts or system_power_watts; ConfigError when
    unknown."""
    if figure not in FIGURES + OPTIONAL_FIGURES:
        raise ConfigError(f"{profile.name}: no figure {figure!r} (expected "
                          f"{', '.join(FIGURES + OPTIONAL_FIGURES)})")
    value = getattr(profile, figure)
    if value is None:
        raise ConfigError(f"{profile.name}: {figure} {_why(profile, figure)}")
    return value


def _num(value: float | None, scale: float) -> str:
    if value is None:
        return "?"
    x = value / scale
    return f"{x:.0f}" if x >= 1000 else f"{x:.4g}"


def format_profiles_table(profiles: list[Profile]) -> str:
    """The `minigpt hardware` listing: dense peaks, memory, bandwidth, power; "?" = unknown."""
    head = ("name", "fp32 TFLOP/s", "fp16 TFLOP/s", "int8 TOP/s", "memory GB", "bandwidth GB/s",
            "watts", "system W")
    rows = [(p.name, _num(p.peak_flops.get("fp32"), 1e12), _num(p.peak_flops.get("fp16"), 1e12),
             _num(p.peak_flops.get("int8"), 1e12), _num(p.memory_bytes, 1e9),
             _num(p.memory_bandwidth, 1e9), _num(p.power_watts, 1),
             _num(p.system_power_watts, 1)) for p in profiles]
    out = rows_text(head, rows)  # the name left, the figures right
    out.append("dense peaks (no 2:4 sparsity), fp16 = bf16; ? = unknown or unsupported; "
               "watts = rated TDP/TGP; system W = the whole system's power per accelerator")
    return "\n".join(out)
