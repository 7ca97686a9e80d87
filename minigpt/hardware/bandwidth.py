"""Memory bandwidth measured the way programs use memory: STREAM's kinds of pass, on one thread and
on all cores, for `minigpt calibrate` and its cached quick measurement.

One bandwidth figure cannot serve every op. A decode step streams its weights in, reading; a copy
reads as much as it writes; a triad (a = b + s·c) reads twice what it writes. A memory system
moves these mixes at different rates, and one core alone often cannot fill it. So, like STREAM and
likwid-bench, this measures four kinds of pass (minigpt.kernels.stream), each on 1 thread and on
every core this process may use:

    kind    pass                 bytes counted per element (float64)
    read    s = sum(a)           8   (a read)
    write   a[:] = value         8   (a written)
    copy    dst[:] = src         16  (src read + dst written)
    triad   a[:] = b + s * c     24  (b and c read + a written)

Bytes are counted as the meter counts them: what the program reads plus what it writes. A cache
that reads a line before writing it (write-allocate) moves more than that; the figure is then
lower than the wires' rate, and it is the rate at which the meter's bytes can move, which is what
a ceiling on the meter's bytes needs. Each array is at least 4 times the last-level cache (and 256
MiB; the quick measurement 64 MiB), so the passes stream from memory, not from the cache. Each
figure is the best of several passes after a warm-up pass (page faults, compilation): the best
pass is the one least disturbed by other processes.

roofline.memory_ceiling picks, for each op, the kind whose read/write mix is nearest its own.
"""

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from minigpt.counting.meter import METER, matmul
from minigpt.hardware import blas
from minigpt.hardware.profiles import Profile
from minigpt.kernels import stream
from minigpt.units import rows_text

MiB = 1 << 20
KINDS = stream.KINDS
THREADINGS = ("one_thread", "all_cores")
WHAT = {"read": "sum of {mib} MiB", "write": "fill {mib} MiB",
        "copy": "{mib} MiB to {mib} MiB, read + write counted",
        "triad": "a = b + s·c over 3 x {mib} MiB, 2 reads + 1 write counted"}
FULL_MIB, QUICK_MIB = 256, 64  # the smallest array, full and quick measurement
LLC_MULTIPLE = 4  # each array at least this many times the last-level cache


class StreamFigure(NamedTuple):
    """One measured bandwidth: a kind of pass on some threads, and how it was measured."""

    kind: str  # read, write, copy or triad
    threads: int
    bytes_per_s: float  # bytes counted (read + written) per second, best pass
    array_mib: int  # each array's size
    repeats: int  # passes timed (the best is kept)
    path: str  # "numba prange" or "numpy, Python threads"
    llc_mib: float | None  # the last-level cache the size was chosen against
    recorded: str = ""  # the method as a profile recorded it, for a figure read back from one

    @property
    def threading(self) -> str:
        return "one_thread" if self.threads == 1 else "all_cores"

    @property
    def key(self) -> str:
        """The profile's name for it: "read.all_cores"."""
        return f"{self.kind}.{self.threading}"

    def method(self) -> str:
        """How it was measured, in one line (the profile's note)."""
        if self.recorded:
            return self.recorded
        llc = f"{self.llc_mib:g} MiB" if self.llc_mib else "not reported"
        threads = "1 thread" if self.threads == 1 else f"{self.threads} threads (all cores)"
        return (f"{self.path}, {threads}: {WHAT[self.kind].format(mib=self.array_mib)}, float64; "
                f"bytes read + written per second, best of {self.repeats} passes "
                f"(last-level cache {llc})")


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu") -> int | None:
    """The last-level cache over all its instances (Linux sysfs), bytes; None where not reported."""
    units = {"K": 1 << 10, "M": MiB, "G": 1 << 30}
    level, found = 0, {}
    for index in Path(root).glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            lv = int((index / "level").read_text())
            size = (index / "size").read_text().strip()  # "32768K"
            shared = (index / "shared_cpu_list").read_text().strip()
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except (OSError, ValueError):
            continue
        if lv > level:
            level, found = lv, {}
        if lv == level:
            found[shared] = nbytes  # one entry per cache instance
    return sum(found.values()) or None


def array_mib(quick: bool = False, llc: int | None = None) -> int:
    """Each array's size in MiB: at least LLC_MULTIPLE x the last-level cache, and 256 (quick: 64)."""
    llc = last_level_cache_bytes() if llc is None else llc
    floor = QUICK_MIB if quick else FULL_MIB
    return max(floor, -(-LLC_MULTIPLE * (llc or 0) // MiB))


def run_pass(kind: str, a: np.ndarray, b: np.ndarray, c: np.ndarray, threads: int) -> None:
    """One pass of a kind over arrays of one size (read: a; write: a; copy: a into b; triad:
    b + s·c into a), counted through the meter (kind "stream", op the pass's kind) with the
    FLOPs, bytes read and bytes written of stream.WORK, unless the meter is paused."""
    t0 = METER.clock()
    if kind == "read":
        stream.read(a, threads)
    elif kind == "write":
        stream.write(a, 2.0, threads)
    elif kind == "copy":
        stream.copy(b, a, threads)
    elif kind == "triad":
        stream.triad(a, b, c, 3.0, threads)
    else:
        raise ValueError(f"no stream pass {kind!r} (expected {', '.join(KINDS)})")
    if METER.enabled:
        flops, reads, writes = stream.WORK[kind]
        METER.add(kind="stream", op=kind, dtype=a.dtype, flops=flops * a.size,
                  bytes_read=reads * a.nbytes, bytes_written=writes * a.nbytes,
                  seconds=METER.clock() - t0)


def measure_stream(quick: bool = False, repeats: int | None = None,
                   mib: int | None = None) -> tuple[StreamFigure, ...]:
    """Every kind on 1 thread and on all cores (one figure each where only 1 core is usable)."""
    repeats = repeats or (3 if quick else 5)
    llc = last_level_cache_bytes()
    mib = mib or array_mib(quick, llc)
    n = mib * MiB // 8
    a, b, c = np.ones(n), np.ones(n), np.ones(n)  # touched here: no page faults in the timing
    counts = sorted({1, stream.max_threads()})
    out = []
    with METER.paused():
        for kind in KINDS:
            for threads in counts:
                run_pass(kind, a, b, c, threads)  # warm up (Numba compiles on the first call)
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    run_pass(kind, a, b, c, threads)
                    best = min(best, time.perf_counter() - t0)
                moved = sum(stream.WORK[kind][1:]) * a.nbytes  # bytes read + written
                out.append(StreamFigure(kind, threads, moved / best, mib,
                                        repeats, stream.path(), llc / MiB if llc else None))
    return tuple(out)


def matvec_bandwidth(nbytes: int = 512 * MiB, repeats: int = 3) -> float:
    """Bytes/s of a float32 BLAS matrix-vector product over `nbytes` of weights (what a decode step
    does per weight matrix), weights + vector read and result written, best of `repeats`."""
    cols = 4096
    w = np.ones((nbytes // (4 * cols), cols), dtype=np.float32)  # (K, N)
    x = np.ones((1, w.shape[0]), dtype=np.float32)  # (1, K)
    best = float("inf")
    with METER.paused():
        out = matmul(x, w)  # warm up: the BLAS threads start
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = matmul(x, w)
            best = min(best, time.perf_counter() - t0)
    return (w.nbytes + x.nbytes + out.nbytes) / best


def profile_entries(figures, source: str) -> str:
    """The profile file's [bandwidth.<kind>.<threading>] tables, each with its method as the note."""
    lines = []
    for f in figures:
        lines += [f"[bandwidth.{f.key}]", f"value = {f.bytes_per_s!r}", f'source = "{source}"',
                  f'note = "{f.method()}"', ""]
    return "\n".join(lines)


def figures_from_profile(prof: Profile, cores: int) -> tuple[StreamFigure, ...]:
    """The STREAM figures a profile holds, read back with their recorded methods (so a profile
    rewritten from them keeps them as they were measured)."""
    out = []
    for key, value in prof.bandwidth.items():
        kind, threading = key.split(".")
        out.append(StreamFigure(kind, 1 if threading == "one_thread" else cores, value, 0, 0, "",
                                None, prof.notes.get(f"bandwidth.{key}", "")))
    return tuple(out)


def table_lines(figures, matvec: tuple[int, float] | None = None) -> list[str]:
    """The calibrate table: one row per figure (GB/s and how), and the BLAS product's if given
    as (MiB of weights, bytes/s)."""
    rows = []
    for f in figures:
        what = f"{f.kind} ({WHAT[f.kind].format(mib=f.array_mib)})"
        threads = "1 thread" if f.threads == 1 else f"{f.threads} threads"
        rows.append((f"{what}, {threads}", f"{f.bytes_per_s / 1e9:.1f}", f.path))
    if matvec:
        rows.append((f"BLAS matrix-vector product over {matvec[0]} MiB of float32 weights",
                     f"{matvec[1] / 1e9:.1f}", _blas_threads()))
    return rows_text(("bandwidth", "GB/s", "how"), rows, align="<><")


def _blas_threads() -> str:
    n = blas.current()
    return f"NumPy's BLAS, {n} thread{'s' if n != 1 else ''}" if n else "NumPy's BLAS"


def as_profile(figures: dict[str, float], notes: dict[str, str], name: str = "measured here") -> Profile:
    """A profile holding only STREAM figures ("read.all_cores" -> bytes/s, with their methods), for
    roofline.memory_ceiling on figures measured in-process (bench/decode.py)."""
    return Profile(name=name, description="STREAM bandwidths measured in this process",
                   peak_flops={}, memory_bandwidth=None, memory_bytes=None, power_watts=None,
                   bandwidth=dict(figures), notes={f"bandwidth.{k}": v for k, v in notes.items()})
