"""The array module: NumPy on the CPU, CuPy on an NVIDIA GPU, behind one switch.

Every other module asks this one for `xp` instead of importing numpy or cupy itself, so the same
model, trainer and meters run on either. CuPy is imported here and nowhere else, and only when a
GPU is asked for: the package imports and runs without it.
"""

import numpy as np

xp = np  # the active array module
device = "cpu"

# Elementwise chains (GELU, softmax, LayerNorm) run block by block on the CPU: each block of rows
# stays in cache through all of a chain's passes instead of streaming the whole array from memory
# once per pass (GELU runs about 1.6x faster so; docs/benchmarks.md). Splitting the blocks among
# threads does not pay on a few cores: the passes are memory-bound, and BLAS's threads hold the rest.
BLOCK_BYTES = 256 << 10


def use(name: str) -> None:
    """Select the array module: "cpu" (NumPy) or "cuda" (CuPy)."""
    global xp, device
    if name == "cpu":
        xp, device = np, "cpu"
    elif name == "cuda":
        try:
            import cupy
        except ImportError as e:
            from minigpt.errors import ConfigError

            raise ConfigError(
                f'device = "cuda" needs CuPy (pip install -e ".[gpu]"): {e}'
            ) from None
        xp, device = cupy, "cuda"
    else:
        from minigpt.errors import ConfigError

        raise ConfigError(f'device must be "cpu" or "cuda", not {name!r}')


def cupy():
    """The CuPy module, imported on first use (ImportError where it is not installed). For code that
    needs CuPy's own API (fused kernels, memory pools), so that no module but this one imports it."""
    import cupy as cp

    return cp


def nccl():
    """CuPy's NCCL bindings (cupy.cuda.nccl), for data-parallel training on GPUs (train/dist.py);
    ImportError where CuPy or its NCCL is missing."""
    from cupy.cuda import nccl as bindings

    return bindings


def to_host(a):
    """A NumPy copy (or the array itself) of an array from the active module."""
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return a
    return a.get()


def asarray(a, dtype=None):
    """An array of the active module from host data."""
    return xp.asarray(a, dtype=dtype)


def synchronize() -> None:
    """Wait for queued device work (a no-op on the CPU)."""
    if device == "cuda":
        xp.cuda.get_current_stream().synchronize()


def scatter_add(target, idx, values) -> None:
    """target[idx[i]] += values[i] for every i, repeated indices accumulating."""
    if device == "cuda":
        import cupyx

        cupyx.scatter_add(target, idx, values)
    else:
        xp.add.at(target, idx, values)


_memory_kept = False


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS.

    A training step allocates and frees tens of megabytes of activations. By default glibc hands
    big blocks (mmap) and, the top of the heap back to the kernel, so every step
    page-faults its way through fresh memory again: about a quarter of a tiny.toml step on our
    2-core machine. Raising the thresholds keeps those pages mapped; the resident size stays at the
    step's peak, which it reaches anyway. A no-op where the C library is not glibc, and after the
    first call.
    """
    global _memory_kept
    if _memory_kept:
        return
    _memory_kept = True
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks below 32 MiB (glibc's ceiling) come from the heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # which is trimmed only past 1 GiB of free top
    mallopt(M_TOP_PAD, 64 << 20)  # and grown 64 MiB at a time


def row_sum(a):
    """Sums over the last axis, kept as a length-1 axis: (..., n) -> (..., 1).

    On the CPU, for many rows, through einsum's one-operand loop (a reduction, not a product):
    the ufunc reduction adds each short row pairwise, which is slower on short rows (about 1.4x
    on rows of 256-384 and 3.5x on rows of 64 in float32; docs/benchmarks.md). For a few rows (a
    decode step's) einsum's own call costs more than that saves, and the reduction is called
    directly: a decode step makes a few hundred of these calls."""
    if device != "cpu":
        return a.sum(axis=-1, keepdims=True)
    if a.size > 4096:
        # Not a matrix product: one operand and no second factor, so einsum only adds along i
        # (the meter counts these additions in the caller's elementwise op, e.g. LayerNorm's).
        return xp.einsum("...i->...", a)[..., None]
    return xp.add.reduce(a, axis=-1, keepdims=True)  # ndarray.sum's Python wrapper, skipped


def row_max(a):
    """Maxima over the last axis, kept as a length-1 axis: (..., n) -> (..., 1)."""
    if device != "cpu":
        return a.max(axis=-1, keepdims=True)
    return xp.maximum.reduce(a, axis=-1, keepdims=True)  # as row_sum: ndarray.max's wrapper skipped


def row_mean(a):
    """Means over the last axis, kept as a length-1 axis (row_sum's, over the axis length)."""
    return row_sum(a) * (1.0 / a.shape[-1])


def map_rows(kernel, n_rows: int, row_bytes: int) -> list:
    """Run kernel(rows) over slices of range(n_rows) and return the results in order.

    On the CPU the slices are blocks of about BLOCK_BYTES per array (row_bytes: one row's bytes
    in the kernel's largest array); on a GPU the kernel sees all rows at once. Kernels write their
    outputs through the slice they are given and return any partial results the caller combines
    (column sums, for example)."""
    if device != "cpu" or n_rows * row_bytes <= BLOCK_BYTES:
        return [kernel(slice(0, n_rows))]
    return [kernel(r) for r in _row_blocks(n_rows, row_bytes)]


def by_rows(kernel, row_bytes: int, arrays: tuple, *args) -> None:
    """kernel(*row blocks of arrays, *args) over blocks of rows, as map_rows: every array in
    arrays has the same rows, and each block of them goes to the kernel together. An input that
    fits one block goes to the kernel as it is, with no slicing (a decode step's rows)."""
    n_rows = arrays[0].shape[0]
    if device != "cpu" or n_rows * row_bytes <= BLOCK_BYTES:
        kernel(*arrays, *args)
        return
    for r in _row_blocks(n_rows, row_bytes):
        kernel(*(a[r] for a in arrays), *args)


def _row_blocks(n_rows: int, row_bytes: int) -> list:
    """Slices of range(n_rows), about BLOCK_BYTES of rows each."""
    step = max(1, BLOCK_BYTES // max(1, row_bytes))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
