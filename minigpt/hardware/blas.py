"""How many threads NumPy's OpenBLAS uses, changed for a block of code.

A batch-1 decode step is a chain of matrix-vector products: each reads its weights once and is
bound by memory, not arithmetic. OpenBLAS splits each product across its threads and wakes them
per call; on a machine whose other cores are busy, that wake-up costs a scheduler slice (we
measured about 10-20 ms per call with 2 threads on our shared 2-core machine, against 0.1-0.3 ms
single-threaded), more than the whole product; on a quiet machine two threads read about twice
as fast as one. `with blas.threads(1):` runs a block on one thread (bench/decode.py measures both).

NumPy does not expose the setting; OpenBLAS does, as a C function of the library NumPy loaded,
found here through /proc/self/maps (Linux). Where it cannot be found (another BLAS, another OS)
the block runs unchanged and `threads` says so by yielding False.
"""

import ctypes
from contextlib import contextmanager
from functools import lru_cache

_NAMES = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")


@lru_cache(maxsize=1)
def _openblas():
    """(set_num_threads, get_num_threads) of the loaded OpenBLAS, or None."""
    import numpy  # noqa: F401 - loads the BLAS

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            getter = name.replace("set_", "get_")
            if hasattr(lib, name) and hasattr(lib, getter):
                return getattr(lib, name), getattr(lib, getter)
    return None


def current() -> int | None:
    """OpenBLAS's thread count now, or None where it cannot be read."""
    fns = _openblas()
    return int(fns[1]()) if fns else None


@contextmanager
def threads(n: int):
    """Run the block with n OpenBLAS threads (restored after); yields whether it took effect."""
    fns = _openblas()
    if fns is None or n < 1:
        yield False
        return
    set_, get = fns
    before = int(get())
    set_(n)
    try:
        yield True
    finally:
        set_(before)
