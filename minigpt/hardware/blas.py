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

Threads per process (`plan` and `apply`): N processes on one node, each with a thread per core,
run N x cores threads on the cores, and OpenBLAS's workers spin while they wait for each other
(docs/benchmarks.md: two MPI ranks on two cores ran at a third of one rank-per-core's speed). So
a training run gives each process cores / (processes on this node) threads, at least one, for
OpenBLAS and for Numba's threading layer, unless the user chose: MINIGPT_THREADS sets both; else
a library's own variable (OPENBLAS_NUM_THREADS, NUMBA_NUM_THREADS), else OMP_NUM_THREADS, is left
to rule that library. The cores are those this process may run on (its CPU affinity). A plan
whose threads x processes exceed the cores says so ("oversubscribed").
"""

import ctypes
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from minigpt.errors import ConfigError

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


# the variables each library reads for its thread count, most specific first
OWN_VARS = {"blas": ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"),
            "numba": ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Plan:
    """Threads per process for OpenBLAS and for Numba, and why."""

    blas: int
    numba: int
    cores: int  # usable by each process on this node
    processes: int  # on this node (MPI's local size; 1 without MPI)
    blas_from: str  # "" (chosen here) or the variable that chose it, as "NAME=value"
    numba_from: str

    @property
    def automatic(self) -> bool:
        return not (self.blas_from or self.numba_from)

    @property
    def oversubscribed(self) -> bool:
        return max(self.blas, self.numba) * self.processes > self.cores

    def line(self) -> str:
        """One line for the start of a run: the threads, the reason, and oversubscription."""
        each = "per rank" if self.processes > 1 else "per process"
        where = (f"{self.processes} ranks on this node" if self.processes > 1
                 else "1 process on this node")
        if self.blas == self.numba and self.blas_from == self.numba_from:
            text = f"threads: {self.blas} {each} (BLAS and Numba)"
            text += (f", from {self.blas_from}" if self.blas_from
                     else f": {self.cores} cores / {where}; MINIGPT_THREADS=n chooses")
        else:
            text = (f"threads: {self.blas} {each} for the BLAS ({self.blas_from or 'automatic'}), "
                    f"{self.numba} for Numba ({self.numba_from or 'automatic'})")
        if self.oversubscribed:
            busy = max(self.blas, self.numba) * self.processes
            text += f"; oversubscribed: {busy} threads on {self.cores} cores, so threads wait for cores"
            text += (" (more ranks than cores)" if self.processes > self.cores else
                     f" (MINIGPT_THREADS={self.cores // self.processes} would not)")
        return text


def _count(name: str, value: str) -> int | None:
    """A thread-count variable's number: OMP's "4,2" (nested levels) counts its first level."""
    first = value.split(",")[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def plan(processes: int, cores: int | None = None, environ=None) -> Plan:
    """Threads per process for `processes` processes on this node (see the module's docstring).
    MINIGPT_THREADS that is not a positive whole number is a ConfigError."""
    env = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else cores
    processes = max(1, processes)
    auto = max(1, cores // processes)
    ours = env.get("MINIGPT_THREADS", "").strip()
    if ours:
        if not (ours.isdigit() and int(ours) > 0):
            raise ConfigError(f"MINIGPT_THREADS = {ours!r}: threads per process must be a positive "
                              f"whole number")
        n = int(ours)
        return Plan(n, n, cores, processes, f"MINIGPT_THREADS={n}", f"MINIGPT_THREADS={n}")
    chosen = {}
    for lib, names in OWN_VARS.items():
        chosen[lib] = (auto, "")
        for name in names:
            n = _count(name, env.get(name, ""))
            if n is not None:
                chosen[lib] = (n, f"{name}={env[name]}")
                break
    return Plan(chosen["blas"][0], chosen["numba"][0], cores, processes, chosen["blas"][1],
                chosen["numba"][1])


def apply(p: Plan) -> bool:
    """Set this process's threads to the plan, before any product runs: OpenBLAS's count through
    its C function (NumPy has loaded it already; its idle workers sleep), and Numba's through
    NUMBA_NUM_THREADS before Numba is imported (numba.set_num_threads once it is, and the variable
    is then left as Numba read it). The thread variables not set are set to the plan, for any
    process this one starts (MINIGPT_THREADS sets them all). Returns whether OpenBLAS took the setting."""
    fns = _openblas()
    if fns is not None:
        fns[0](p.blas)
    wanted = {"OPENBLAS_NUM_THREADS": p.blas, "OMP_NUM_THREADS": p.blas, "NUMBA_NUM_THREADS": p.numba}
    numba_loaded = "numba" in sys.modules
    if numba_loaded:
        # Numba has read NUMBA_NUM_THREADS already (its thread pool's size) and reads it again
        # each time it compiles: a different value there then stops the compile with an error
        # (a fresh install's first kernel, in every rank). Its own call sets this process's count.
        del wanted["NUMBA_NUM_THREADS"]
    for name, n in wanted.items():
        if p.blas_from.startswith("MINIGPT_THREADS") or name not in os.environ:
            os.environ[name] = str(n)
    if numba_loaded:
        import numba

        numba.set_num_threads(max(1, min(p.numba, numba.config.NUMBA_NUM_THREADS)))
    return fns is not None and int(fns[1]()) == p.blas
