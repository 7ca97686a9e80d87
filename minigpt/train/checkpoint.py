"""Checkpoints: one .npz of plain arrays plus a JSON header, written atomically, read without pickle.

Arrays: "params" (the flat parameter buffer), and for training checkpoints "adam_m", "adam_v".
"meta" is UTF-8 JSON stored as uint8: format, config, tokenizer, parameter layout, step, RNG
states: everything resuming needs. Loading checks all of it and names what is wrong.
"""

import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from minigpt.errors import CheckpointError

FORMAT = "minigpt-checkpoint-v1"
FILENAME = "ckpt.npz"


def resolve(path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def save(path, meta: dict, arrays: dict) -> None:
    """Write arrays and meta to path through a temporary file and a rename: a crash mid-write
    leaves the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), dtype=np.uint8)}
    payload.update(arrays)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path) -> tuple[dict, dict]:
    """(meta, arrays) from a checkpoint file or run folder; CheckpointError on anything wrong."""
    path = resolve(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a minigpt checkpoint (not an .npz archive; truncated or foreign?)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
        reason = "holds pickled objects" if "pickle" in str(e) else str(e).split("\n")[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a minigpt checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint header: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint (format {found!r})")
    _check_arrays(path, meta, arrays)
    return meta, arrays


def _check_arrays(path, meta, arrays) -> None:
    try:
        size = sum(math.prod(shape) for _, shape in meta["layout"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: checkpoint header has no valid parameter layout") from None
    if "params" not in arrays:
        raise CheckpointError(f"{path}: checkpoint holds no 'params' array")
    for name in ("params", "adam_m", "adam_v"):
        a = arrays.get(name)
        if a is None:
            continue
        if a.shape != (size,):
            raise CheckpointError(f"{path}: '{name}' has shape {a.shape}, the layout needs ({size},)")
        if a.dtype not in (np.float32, np.float64):
            raise CheckpointError(f"{path}: '{name}' has dtype {a.dtype}, expected float32 or float64")
