"""`minigpt calibrate`: measure this machine's matmul FLOP/s and memory bandwidth, and save them as
the local hardware profile ($MINIGPT_HOME/hardware/local-cpu.toml), so utilisation and roofline
figures for the CPU rest on measurement, not on a guess.

Micro-benchmarks, best of several runs each (the best run is the one least disturbed):
- matmul: an n x n x n product in float32 and in float64, through NumPy (the BLAS the model uses);
- bandwidth: copying a 256 MiB array, counting the bytes read and the bytes written (the profile's
  memory_bandwidth);
- the STREAM bandwidths the roofline holds each op against: read, write, copy and triad, on one
  thread and on all cores (minigpt.hardware.bandwidth), and, in the full measurement, a BLAS
  matrix-vector product over 512 MiB of weights for comparison.

Every run needs a roofline, calibrated or not: `quick_profile()` makes the quick version (1024^3
products, a 64 MiB copy: a few seconds) once per machine and caches it as a profile file under
$MINIGPT_HOME/cache/ keyed by the CPU model and the BLAS environment variables, so a run without
`minigpt calibrate` still gets roofline and MFU figures ("quick measurement", said where used).
`local_profile()` is the careful local-cpu profile where one exists, else that quick one.

The quick figures cannot silently lie: each is the best of several tries; a record beside the
cache (roofline-<key>.json) says when they were taken and under what load (the 1-minute load
average), and `suspect_note()` says so when that load was high; `check_run(rows)` compares a
finished run's fastest records with the figures, and a run faster than the cache replaces the
cached figure (recording what raised it), where a calibrated profile is only flagged. `minigpt
calibrate --check` compares the figures in use with a fresh quick measurement.
"""

import datetime
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minigpt import safeio
from minigpt.counting import tables
from minigpt.counting.meter import METER, matmul
from minigpt.errors import ConfigError
from minigpt.hardware import bandwidth, profiles


def matmul_flops(dtype="float32", n=2048, repeats=5) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) product; 2 n^3 FLOPs each."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    best = float("inf")
    with METER.paused():  # the model's own product path, left out of the records
        matmul(a, b)  # warm up the BLAS threads
        for _ in range(repeats):
            t0 = time.perf_counter()
            matmul(a, b)
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def copy_bandwidth(nbytes=256 << 20, repeats=5) -> float:
    """Best bytes/s of copying nbytes: each copy reads nbytes and writes nbytes."""
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment() -> str:
    blas = {k: v for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                           "OMP_NUM_THREADS") if (v := os.environ.get(k))}
    return ", ".join(f"{k}={v}" for k, v in blas.items()) or "no BLAS variables set"


class MachineFigures(NamedTuple):
    """What `measure` found: the figures a local-cpu or quick-cpu profile file is written from."""

    fp32: float  # FLOP/s of the float32 product
    fp64: float  # FLOP/s of the float64 product
    bandwidth: float  # bytes/s of the copy, bytes read + bytes written
    n: int  # the float32 product's size, n x n x n
    copy_mib: int  # the copied array, MiB
    stream: tuple[bandwidth.StreamFigure, ...] = ()  # read/write/copy/triad, 1 thread, all cores
    matvec: float | None = None  # bytes/s of a BLAS product over MATVEC_MIB of weights

    def to_json(self) -> dict:
        return self._asdict()


class LocalProfile(NamedTuple):
    """This machine's profile and a note saying which one it is."""

    profile: profiles.Profile
    note: str  # "local-cpu profile", or the quick measurement's QUICK_NOTE


class LocalPeak(NamedTuple):
    """This machine's float32 matmul peak and where it came from."""

    flops: float | None  # FLOP/s; None when not measured and not asked to measure
    where: str  # "(local-cpu profile)", "(<QUICK_NOTE>)", or ""


QUICK_TRIES = 3
MATVEC_MIB = 512  # the full measurement's matrix-vector product, MiB of float32 weights


def measure(quick: bool = False, tries: int | None = None) -> MachineFigures:
    """The measured figures: fp32 and fp64 matmul FLOP/s, copy bandwidth (bytes/s), the STREAM
    bandwidths, and (not quick) the BLAS matrix-vector product's bandwidth. Each is the
    best of `tries` short tries (default QUICK_TRIES quick, 3 careful, each try itself a best of a
    few runs), taken in sweeps (fp32, fp64, copy, fp32, ...) so that another process running for
    a moment spoils one try of each figure rather than all tries of one."""
    n, repeats = (1024, 1) if quick else (2048, 5)
    mib = 64 if quick else 256
    tries = tries or (QUICK_TRIES if quick else 3)
    fp32 = fp64 = copy_bw = 0.0
    for _ in range(tries):
        fp32 = max(fp32, matmul_flops("float32", n, repeats))
        fp64 = max(fp64, matmul_flops("float64", n // 2 if quick else n, repeats))
        copy_bw = max(copy_bw, copy_bandwidth(mib << 20, repeats))
    return MachineFigures(fp32=fp32, fp64=fp64, bandwidth=copy_bw, n=n, copy_mib=mib,
                          stream=bandwidth.measure_stream(quick),
                          matvec=None if quick else bandwidth.matvec_bandwidth(MATVEC_MIB << 20))


def profile_toml(m: MachineFigures, name: str = "local-cpu", how: str = "minigpt calibrate") -> str:
    """A hardware profile file (hardware.py's schema) for the measured figures."""
    today = datetime.date.today().isoformat()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    src = f"measured by {how} on {today} ({_environment()})"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    n = m.n

    def entry(table, value, source, note=""):
        lines = [f"[{table}]", f"value = {value!r}" if not isinstance(value, str) else f'value = "{value}"',
                 f'source = "{source}"']
        return "\n".join(lines + ([f'note = "{note}"'] if note else [])) + "\n"

    return "\n".join([
        f"# minigpt hardware profile of this machine, written by {how}.",
        "# Run it again after changing BLAS settings (OPENBLAS_CORETYPE changes the matmul peak).",
        f'name = "{name}"',
        f'description = "{_cpu_name()}, {cores} cores, NumPy {np.__version__}"',
        "",
        entry("peak_flops.fp32", m.fp32, src, f"best of a {n}x{n}x{n} float32 matmul"),
        entry("peak_flops.fp64", m.fp64, src, f"best of a {n}x{n}x{n} float64 matmul"),
        entry("peak_flops.tf32", "unsupported", "a CPU has no TF32 format"),
        entry("peak_flops.fp16", "unknown", "not measured: NumPy has no fast float16 matmul"),
        entry("peak_flops.int8", "unknown", "not measured: NumPy has no int8 matmul kernel"),
        entry("memory_bandwidth", m.bandwidth, src,
              f"copy of {m.copy_mib} MiB: bytes read + bytes written"),
        entry("memory_bytes", float(memory), "os.sysconf: physical pages x page size") if memory
        else entry("memory_bytes", "unknown", "not exposed"),
        entry("power_watts", "unknown", "not measured: give the CPU's rated power in your own profile"),
        bandwidth.profile_entries(m.stream, src),
    ])


def save(text: str) -> "os.PathLike":
    return safeio.write_text(profiles.user_dir() / "local-cpu.toml", text)  # one line on a fault


QUICK_NAME = "quick-cpu"
QUICK_NOTE = "quick measurement; `minigpt calibrate` measures carefully"


def cache_path() -> Path:
    """$MINIGPT_HOME/cache/roofline-<key>.toml, key = hash of the CPU model and BLAS variables."""
    key = hashlib.sha256(f"{_cpu_name()}|{_environment()}".encode()).hexdigest()[:12]
    return profiles.user_dir().parent / "cache" / f"roofline-{key}.toml"


def meta_path() -> Path:
    """The quick measurement's record beside it: when, under what load, and what raised it."""
    return cache_path().with_suffix(".json")


def cache_meta() -> dict:
    """{"measured_at", "load_average", "cores", "tries", "raised": [...]}, or {} when unknown."""
    try:
        d = json.loads(meta_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _write_quick(m: MachineFigures, meta: dict, how: str = "minigpt's quick measurement (cached)") -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tables._atomic_write(path, profile_toml(m, QUICK_NAME, how))
    tables._atomic_write(meta_path(), json.dumps(meta, indent=1) + "\n")


def _figures_of(prof: profiles.Profile) -> MachineFigures:
    return MachineFigures(fp32=profiles.peak(prof, "fp32"), fp64=profiles.peak(prof, "fp64"),
                          bandwidth=profiles.require(prof, "memory_bandwidth"), n=1024, copy_mib=64,
                          stream=bandwidth.figures_from_profile(prof, _cores()))


def higher_stream(old, fresh) -> tuple:
    """The STREAM figures keeping, for each kind and thread count, the higher of the two."""
    best = {f.key: f for f in old}
    for f in fresh:
        if f.key not in best or f.bytes_per_s > best[f.key].bytes_per_s:
            best[f.key] = f
    return tuple(best.values())


def measure_quick() -> tuple[MachineFigures, dict]:
    """A fresh quick measurement and its record (when, the 1-minute load before and after)."""
    before = _load_average()
    m = measure(quick=True)
    meta = {"measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average": [before, _load_average()], "cores": _cores(), "tries": QUICK_TRIES,
            "raised": []}
    return m, meta


def quick_profile() -> profiles.Profile:
    """The cached quick measurement of this machine as a profile, measured on first use."""
    path = cache_path()
    if path.is_file():
        try:
            cached = profiles.load_profile(path)
            if cached.bandwidth:  # a cache from before the STREAM figures is measured again
                return cached
        except ConfigError:  # a damaged cache is measured again, not trusted
            path.unlink(missing_ok=True)
    _write_quick(*measure_quick())
    return profiles.load_profile(path)


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def suspect_note(meta: dict | None = None) -> str:
    """Why the quick measurement may be too low, or "": taken while other work kept the cores
    busy (a 1-minute load average above half the cores before it started)."""
    meta = cache_meta() if meta is None else meta
    loads, cores = meta.get("load_average") or [0.0], meta.get("cores") or _cores()
    if max(loads) > 0.5 * cores:
        return (f"the quick measurement ({meta.get('measured_at', '?')}) was taken under load "
                f"(load average {max(loads):.2g} on {cores} cores): its peak may be low and "
                f"utilisation high; `minigpt calibrate --check` compares it with a fresh one")
    return ""


# A record's rate is trusted against the peak only when it is long enough to time well.
MIN_RECORD_SECONDS = 0.01  # s, summed over the record's calls
MIN_STREAM_BYTES = 32 << 20  # bytes per call: larger than the caches, so memory bandwidth


class RunCheck(NamedTuple):
    """What a run's records say about the machine figures: the best rates they reached, and the
    notes to print (a figure raised, or one that a calibrated profile should be measured again)."""

    matmul_flops: float  # FLOP/s, the fastest fp32 product record
    matmul_where: str  # its scope and op
    bandwidth: float  # bytes/s, the fastest large elementwise record
    bandwidth_where: str
    notes: list[str]


def best_rates(rows: list[dict]) -> RunCheck:
    """The fastest float32 product record and the fastest large elementwise record of a run."""
    flops, bw, fw, bww = 0.0, 0.0, "", ""
    for r in rows:
        if r["seconds"] < MIN_RECORD_SECONDS or not r["calls"]:
            continue
        if r["kind"] == "matmul" and r["dtype"] == "float32":
            if r["flops"] / r["seconds"] > flops:
                flops, fw = r["flops"] / r["seconds"], f"{r['scope']} {r['op']}"
        elif r["kind"] not in ("matmul", "allreduce"):
            nbytes = r["bytes_read"] + r["bytes_written"]
            if nbytes / r["calls"] >= MIN_STREAM_BYTES and nbytes / r["seconds"] > bw:
                bw, bww = nbytes / r["seconds"], f"{r['scope']} {r['kind']} {r['op']}"
    return RunCheck(flops, fw, bw, bww, [])


def check_run(rows: list[dict]) -> RunCheck:
    """Compare a run's fastest records with the machine figures it is reported against. A run
    faster than the cached quick measurement replaces that figure (the cache was measured low:
    under load, or on a bad moment), recording what raised it; faster than a calibrated local-cpu
    profile, it says to calibrate again (a profile the user wrote is not rewritten)."""
    got = best_rates(rows)
    try:
        calibrated = profiles.load_profile("local-cpu")
    except Exception:  # noqa: BLE001 - none, or unreadable: the quick one is used
        calibrated = None
    notes = []
    if calibrated is not None:
        for label, value, where, cached in (
                ("float32 matmul", got.matmul_flops, got.matmul_where, profiles.peak(calibrated, "fp32")),
                ("memory bandwidth", got.bandwidth, got.bandwidth_where,
                 profiles.require(calibrated, "memory_bandwidth"))):
            if value > cached:
                notes.append(f"suspect figure: this run's {where} reached {value / 1e9:.1f} G/s, above "
                             f"the local-cpu profile's {label} {cached / 1e9:.1f} G/s: run "
                             f"`minigpt calibrate` again")
        return got._replace(notes=notes)
    if not cache_path().is_file():
        return got._replace(notes=notes)
    m, meta = _figures_of(quick_profile()), cache_meta()
    raised = []
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if got.matmul_flops > m.fp32:
        raised.append({"figure": "fp32", "from": m.fp32, "to": got.matmul_flops, "at": now,
                       "by": got.matmul_where})
        m = m._replace(fp32=got.matmul_flops)
    if got.bandwidth > m.bandwidth:
        raised.append({"figure": "memory_bandwidth", "from": m.bandwidth, "to": got.bandwidth,
                       "at": now, "by": got.bandwidth_where})
        m = m._replace(bandwidth=got.bandwidth)
    if raised:
        meta["raised"] = meta.get("raised", []) + raised
        _write_quick(m, meta, "minigpt's quick measurement (cached), raised to a run's own rates")
        for r in raised:
            notes.append(f"suspect figure replaced: this run's {r['by']} reached "
                         f"{r['to'] / 1e9:.1f} G/s, above the cached quick measurement's "
                         f"{r['figure']} {r['from'] / 1e9:.1f} G/s; the cache now holds the run's figure")
    return got._replace(notes=notes)


def local_profile() -> LocalProfile:
    """The calibrated local-cpu profile, else the cached quick one; and a note saying which."""
    try:
        return LocalProfile(profiles.load_profile("local-cpu"), "local-cpu profile")
    except Exception:  # noqa: BLE001 - no profile, or an unreadable one: the quick one instead
        return LocalProfile(quick_profile(), QUICK_NOTE)


def local_peak(quick_if_missing: bool = True) -> LocalPeak:
    """This machine's float32 matmul peak: from local-cpu.toml, else the cached quick measurement."""
    try:
        return LocalPeak(profiles.peak(profiles.load_profile("local-cpu"), "fp32"),
                         "(local-cpu profile)")
    except Exception:  # noqa: BLE001 - no profile, or an unreadable one: measure instead
        if not quick_if_missing:
            return LocalPeak(None, "")
        return LocalPeak(profiles.peak(quick_profile(), "fp32"), f"({QUICK_NOTE})")
