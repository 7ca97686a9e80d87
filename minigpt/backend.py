"""The array module: NumPy on the CPU, CuPy on an NVIDIA GPU, behind one switch.

Every other module asks this one for `xp` instead of importing numpy or cupy itself, so the same
model, trainer and meters run on either. CuPy is imported here and nowhere else, and only when a
GPU is asked for: the package imports and runs without it.
"""

import numpy as np

xp = np  # the active array module
device = "cpu"


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
