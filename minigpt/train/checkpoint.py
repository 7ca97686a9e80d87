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
INT8_FORMAT = "minigpt-int8-v1"  # written by `minigpt quantize`: see save_int8
FILENAME = "ckpt.npz"


def resolve(path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def save(path, meta: dict, arrays: dict, fmt: str = FORMAT) -> None:
    """Write arrays and meta to path through a temporary file and a rename: a crash mid-write
    leaves the previous checkpoint whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": np.frombuffer(json.dumps({"format": fmt, **meta}).encode(), dtype=np.uint8)}
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
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, INT8_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a minigpt checkpoint (format {found!r})")
    if meta["format"] == INT8_FORMAT:
        _check_int8_arrays(path, meta, arrays)
    else:
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


# ----------------------------------------------------------------------------- int8 checkpoints
#
# An int8 checkpoint stores each quantized matrix as "int8/<name>" (int8, the layout's shape) and
# "scale/<name>" (float32, one per output channel: the last axis for linear weights, the rows for
# the token table), and every other parameter as "float/<name>" (float32). meta["quant"] holds the
# QuantConfig and meta["int8_names"] the quantized names.


def _int8_scale_shape(name, shape):
    return (shape[0],) if name == "transformer.wte.weight" else (shape[-1],)


def _check_int8_arrays(path, meta, arrays) -> None:
    try:
        layout = [(n, tuple(s)) for n, s in meta["layout"]]
        int8_names = set(meta["int8_names"])
        meta["quant"]["mode"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: int8 checkpoint header lacks layout, int8_names or quant") from None
    for name, shape in layout:
        if name in int8_names:
            want = [(f"int8/{name}", shape, np.int8), (f"scale/{name}", _int8_scale_shape(name, shape), np.float32)]
        else:
            want = [(f"float/{name}", shape, np.float32)]
        for key, wshape, wdtype in want:
            a = arrays.get(key)
            if a is None:
                raise CheckpointError(f"{path}: missing '{key}' (an int8 checkpoint needs every weight and its scales)")
            if a.dtype != wdtype:
                raise CheckpointError(f"{path}: '{key}' has dtype {a.dtype}, expected {np.dtype(wdtype).name}")
            if a.shape != wshape:
                raise CheckpointError(f"{path}: '{key}' has shape {a.shape}, expected {wshape}")


def save_int8(path, meta: dict, tables: dict, floats: dict) -> None:
    """tables: {name: (q int8, scale float32)}; floats: {name: float32 array} for the rest."""
    arrays = {}
    for name, (q, scale) in tables.items():
        arrays[f"int8/{name}"], arrays[f"scale/{name}"] = q, scale
    for name, a in floats.items():
        arrays[f"float/{name}"] = a
    save(path, {**meta, "int8_names": sorted(tables)}, arrays, fmt=INT8_FORMAT)
