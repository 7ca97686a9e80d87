"""An ESTIMATED power figure for a CPU run, for machines whose energy counters cannot be read.

The estimate is the CPU's rated power, found by its model string in profiles/cpu_power.toml (every
entry sourced), scaled by the share of the machine the run kept busy:

    watts = rated W × busy cores / logical cores,   busy cores = process CPU seconds / wall seconds

Where the model string matches no entry (a cloud VM that says only "Intel Xeon Processor"), the
file's [default] watts per logical core is used instead: watts = W per core × busy cores. Both
ignore idle power and turbo above the rated figure; they are estimates and say so:

    estimated: Intel Core i7-1365U, 15 W rated, 1.9 of 12 logical cores busy

    cpu_model()                 the model string (Linux /proc/cpuinfo, macOS sysctl, Windows)
    usage_now()                 (wall s, process CPU s) now, to difference around a run
    estimate(cpu_s, wall_s)     Estimate(watts, basis)
"""

import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from minigpt.errors import ConfigError

TABLE = Path(__file__).parent / "data" / "cpu_power.toml"


@dataclass(frozen=True)
class Estimate:
    """An estimated mean power (W) and the sentence that says how it was reached."""

    watts: float
    basis: str
    source: str


def cpu_model() -> str:
    """This machine's CPU model string, or "" when the system names none."""
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith(("model name", "Model", "Hardware")):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5, check=False)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or ""


def normalise(model: str) -> str:
    """"Intel(R) Core(TM) i7-1365U CPU @ 1.8GHz" -> "Intel Core i7-1365U @ 1.8GHz"."""
    text = re.sub(r"\((R|TM|r|tm)\)", "", model)
    text = re.sub(r"\bCPU\b", "", text)
    return re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=4)
def load_table(path: Path = TABLE) -> tuple[list[dict], dict]:
    """([{pattern, watts, what, source}], default) from the data file; ConfigError if malformed."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the CPU power table: {e}") from None
    entries = doc.get("cpu", [])
    for i, e in enumerate(entries):
        missing = {"pattern", "watts", "what", "source"} - set(e)
        if missing:
            raise ConfigError(f"{path}: [[cpu]] entry {i + 1} lacks {', '.join(sorted(missing))}")
        if not isinstance(e["watts"], (int, float)) or e["watts"] <= 0 or not e["source"]:
            raise ConfigError(f"{path}: [[cpu]] entry {i + 1} ({e['what']}): watts must be > 0 "
                              f"and source non-empty")
        try:
            re.compile(e["pattern"])
        except re.error as err:
            raise ConfigError(f"{path}: [[cpu]] entry {i + 1}: bad pattern: {err}") from None
    default = doc.get("default", {})
    if not default.get("watts_per_logical_core", 0) > 0 or not default.get("source"):
        raise ConfigError(f"{path}: [default] needs watts_per_logical_core > 0 and a source")
    return entries, default


def lookup(model: str, path: Path = TABLE) -> dict | None:
    """The first table entry whose pattern is found in the normalised model string, or None."""
    entries, _ = load_table(path)
    text = normalise(model)
    for e in entries:
        if re.search(e["pattern"], text, flags=re.IGNORECASE):
            return e
    return None


def logical_cores() -> int:
    return os.cpu_count() or 1


def usage_now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children), for differencing.
    This process's own through time.process_time (nanosecond clock: os.times ticks in 10 ms, which
    reads as no CPU at all over a generation of a few milliseconds); its children's through
    os.times, the only portable reader of theirs."""
    t = os.times()
    return time.perf_counter(), time.process_time() + t.children_user + t.children_system


def estimate(cpu_seconds: float, wall_seconds: float, model: str | None = None,
             cores: int | None = None, path: Path = TABLE) -> Estimate:
    """The rated-power estimate for a run that used cpu_seconds of CPU over wall_seconds."""
    model = cpu_model() if model is None else model
    cores = logical_cores() if cores is None else cores
    busy = min(cpu_seconds / wall_seconds, cores) if wall_seconds > 0 else 0.0  # cores
    busy_text = f"{busy:.2g} of {cores} logical cores busy"
    entry = lookup(model, path) if model else None
    if entry is not None:
        watts = entry["watts"] * busy / cores
        return Estimate(watts, f"estimated: {normalise(model)}, {entry['watts']:g} W rated, "
                               f"{busy_text}", entry["source"])
    _, default = load_table(path)
    per_core = default["watts_per_logical_core"]
    named = f"{normalise(model)} (not in the CPU table)" if model else "CPU model unknown"
    return Estimate(per_core * busy, f"estimated: {named}, {per_core:g} W per busy logical core "
                                     f"(default), {busy_text}", default["source"])
