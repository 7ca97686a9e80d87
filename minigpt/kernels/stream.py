"""STREAM-style memory kernels: read, write, copy and triad over float64 arrays, on 1 or n threads.

These are what `minigpt calibrate` times to measure memory bandwidth the way programs use memory
(minigpt.hardware.bandwidth). Each pass touches every element of its arrays once:

    read   s = sum(a)           reads a                       1 FLOP per element
    write  a[:] = value         writes a                      0 FLOPs
    copy   dst[:] = src         reads src, writes dst         0 FLOPs
    triad  a[:] = b + s * c     reads b and c, writes a       2 FLOPs per element

With Numba, each is one `prange` loop compiled once (cached on disk) and run on `threads` threads
(numba.set_num_threads, restored afterwards). Without it (or with the kernels switch on "numpy"),
the NumPy twin splits the arrays into `threads` contiguous parts and hands them to Python threads:
NumPy releases the GIL inside reductions, copies and ufunc loops, so the parts stream at once. The
NumPy triad runs in cache-sized blocks (s * c into a, then + b into a) so that a's second pass hits
the cache and the memory traffic stays one pass over each array, as in the compiled loop.

The kernels sit beside the meter, not above it: minigpt.hardware.bandwidth calls them through its
counted wrapper (kind "stream", op the kernel's name, the bytes above).
"""

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from minigpt import kernels

KINDS = ("read", "write", "copy", "triad")
# per element of the arrays: (FLOPs, arrays read, arrays written), what a counted wrapper records
WORK = {"read": (1, 1, 0), "write": (0, 0, 1), "copy": (0, 1, 1), "triad": (2, 2, 1)}
BLOCK = 1 << 15  # elements of the NumPy triad's cache-sized blocks: 256 KiB of float64

if kernels.AVAILABLE:
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _read_numba(a):  # fastmath lets the sum be split across vector lanes
        s = 0.0
        for i in numba.prange(a.size):
            s += a[i]
        return s

    @numba.njit(parallel=True, cache=True)
    def _write_numba(a, value):
        for i in numba.prange(a.size):
            a[i] = value

    @numba.njit(parallel=True, cache=True)
    def _copy_numba(dst, src):
        for i in numba.prange(dst.size):
            dst[i] = src[i]

    @numba.njit(parallel=True, cache=True)
    def _triad_numba(a, b, c, scalar):
        for i in numba.prange(a.size):
            a[i] = b[i] + scalar * c[i]


def max_threads() -> int:
    """The most threads a kernel may use: the cores this process may run on (and, with Numba,
    no more than its thread pool holds)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if kernels.numba_on():
        n = min(n, numba.config.NUMBA_NUM_THREADS)
    return max(1, n)


def path() -> str:
    """Which implementation runs: "numba prange" or "numpy, Python threads"."""
    return "numba prange" if kernels.numba_on() else "numpy, Python threads"


def _parts(n: int, threads: int) -> list[slice]:
    bounds = np.linspace(0, n, threads + 1).astype(int)
    return [slice(int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]


def _on_threads(work, n: int, threads: int) -> list:
    """work(part) for `threads` contiguous parts of range(n), each on its own Python thread."""
    if threads == 1:
        return [work(slice(0, n))]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, _parts(n, threads)))


def _numba_threads(threads: int, kernel, *args):
    outer = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(outer)


def _triad_numpy(a, b, c, scalar) -> None:
    for lo in range(0, a.size, BLOCK):
        part = slice(lo, lo + BLOCK)
        np.multiply(c[part], scalar, out=a[part])
        np.add(a[part], b[part], out=a[part])


def _check(threads: int, *arrays: np.ndarray) -> None:
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for x in arrays:
        if x.ndim != 1 or not x.flags.c_contiguous or x.size != arrays[0].size:
            raise ValueError("stream kernels take contiguous 1-D arrays of one size")


def read(a: np.ndarray, threads: int = 1) -> float:
    """sum(a) on `threads` threads: a pure read stream."""
    _check(threads, a)
    if kernels.numba_on():
        s = float(_numba_threads(threads, _read_numba, a))
    else:
        s = float(sum(_on_threads(lambda p: a[p].sum(), a.size, threads)))
    return s


def write(a: np.ndarray, value: float, threads: int = 1) -> None:
    """a[:] = value on `threads` threads: a pure write stream."""
    _check(threads, a)
    if kernels.numba_on():
        _numba_threads(threads, _write_numba, a, value)
    else:
        _on_threads(lambda p: a[p].fill(value), a.size, threads)


def copy(dst: np.ndarray, src: np.ndarray, threads: int = 1) -> None:
    """dst[:] = src on `threads` threads: one array read, one written."""
    _check(threads, dst, src)
    if kernels.numba_on():
        _numba_threads(threads, _copy_numba, dst, src)
    else:
        _on_threads(lambda p: np.copyto(dst[p], src[p]), dst.size, threads)


def triad(a: np.ndarray, b: np.ndarray, c: np.ndarray, scalar: float, threads: int = 1) -> None:
    """a[:] = b + scalar * c on `threads` threads: two arrays read, one written."""
    _check(threads, a, b, c)
    if kernels.numba_on():
        _numba_threads(threads, _triad_numba, a, b, c, scalar)
    else:
        _on_threads(lambda p: _triad_numpy(a[p], b[p], c[p], scalar), a.size, threads)
