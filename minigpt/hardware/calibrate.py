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
"""

import datetime
import hashlib
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


MATVEC_MIB = 512  # the full measurement's matrix-vector product, MiB of float32 weights


def measure(quick: bool = False) -> MachineFigures:
    """The measured figures: fp32 and fp64 matmul FLOP/s, copy bandwidth (bytes/s), the STREAM
    bandwidths, and (not quick) the BLAS matrix-vector product's bandwidth."""
    n, repeats = (1024, 3) if quick else (2048, 5)
    mib = 64 if quick else 256
    return MachineFigures(fp32=matmul_flops("float32", n, repeats),
                          fp64=matmul_flops("float64", n // 2 if quick else n, repeats),
                          bandwidth=copy_bandwidth(mib << 20, repeats), n=n, copy_mib=mib,
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
    text = profile_toml(measure(quick=True), QUICK_NAME, "minigpt's quick measurement (cached)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tables._atomic_write(path, text)
    return profiles.load_profile(path)


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
