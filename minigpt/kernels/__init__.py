"""Compiled CPU kernels for what NumPy lacks, built with Numba when it is importable.

NumPy stays the reference path: every kernel here has a NumPy twin it is tested equal to, and a
machine without Numba (or `--kernels numpy`, or MINIGPT_KERNELS=numpy) runs the NumPy path with the
same results. `active()` says which path runs; `use(name)` chooses one.
"""

import importlib.util
import os

from minigpt.errors import ConfigError

# The kernels run each product on an OpenMP team (Numba's "omp" threading layer). Between two
# products the main thread does the step's Python and NumPy work for a fraction of a millisecond;
# by default OpenMP's idle workers spin through that gap, taking the core the main thread (or,
# on a shared machine, another process) needs, and a product then waits for a worker the kernel
# scheduler has pushed aside. Passive waiting puts idle workers to sleep at once. Read once, when
# the OpenMP runtime loads (the first parallel kernel call), so it is set here; an OMP_WAIT_POLICY
# already in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
# But not at once: GNU OpenMP's workers spin this many rounds first (about 100 microseconds; it
# overrides the passive policy's 0). A decode step with packed weights runs some fifty parallel
# products, most a few microseconds apart, and waking a sleeping worker for one cost about 25
# microseconds: a 4-bit GPT-2 decode ran at 168 tokens/s, 230 with the workers kept awake 20
# microseconds. The longest gap, a layer's attention between its two projections, takes 30-60
# microseconds, and bridging it too took each c_proj from 41 to 18 microseconds (docs/benchmarks.md).
# Training's gaps are longer and its kernels run on one thread.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

CHOICES = ("numpy", "numba")
AVAILABLE = importlib.util.find_spec("numba") is not None


def _default() -> str:
    name = os.environ.get("MINIGPT_KERNELS", "numba" if AVAILABLE else "numpy")
    return name if name in CHOICES and (name != "numba" or AVAILABLE) else "numpy"


_active = _default()


def use(name: str) -> None:
    """Run the `name` path ("numpy" or "numba") from now on."""
    global _active
    if name not in CHOICES:
        raise ConfigError(f"--kernels: {name!r} is not one of {', '.join(CHOICES)}")
    if name == "numba" and not AVAILABLE:
        raise ConfigError("--kernels numba: Numba is not installed (pip install numba)")
    _active = name


def active() -> str:
    """The kernels path in use: "numba" or "numpy"."""
    return _active


def numba_on() -> bool:
    return _active == "numba"


def fused_threads_here() -> None:
    """Give the calling thread the fused kernels' thread count (kernels/fused.py: one, unless
    NUMBA_NUM_THREADS is set). Numba's count is per thread and a new thread starts at every core:
    a thread that runs the model (the server's engine, a streamed generation) calls this first,
    or each decode step's LayerNorms and GELUs wake a second OpenMP thread beside OpenBLAS's (the
    server's one-client tokens/s fell by a fifth to two fifths, its CPU time per token doubled)."""
    if AVAILABLE and "NUMBA_NUM_THREADS" not in os.environ:
        import numba

        numba.set_num_threads(1)
