"""Checkpoints: one .npz of plain arrays plus a JSON header, written atomically, read without pickle.

Arrays: "params" (the flat parameter buffer), and for training checkpoints "adam_m", "adam_v".
"meta" is UTF-8 JSON stored as uint8: format, config, tokenizer, parameter layout, step, RNG
states, and "sha256" (the hash of every array's bytes): everything resuming needs. Loading checks
all of it and names what is wrong.

Saving goes through safeio.atomic_write (temporary file, fsync, rename, fsync of the folder): a
full disk, Ctrl-C or kill -9 at any moment leaves the previous checkpoint or the new one, whole.
Loading reads each array's .npy header first and refuses what does not add up (a declared shape
larger than the bytes present, object arrays, unexpected dtypes) before allocating anything, then
checks the hashes: a flipped bit is reported by name and the checkpoint is not used. Checkpoints
written before hashes existed load with a note on stderr (the zip's own CRC-32 still guards them).
"""

import hashlib
import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from minigpt import safeio
from minigpt.counting import memory
from minigpt.errors import CheckpointError

FORMAT = "minigpt-checkpoint-v1"
INT8_FORMAT = "minigpt-int8-v1"  # written by `minigpt quantize`: see save_int8
FILENAME = "ckpt.npz"
MAX_MEMBERS = 10_000  # our checkpoints hold a few hundred arrays at most
DTYPE_KINDS = "biuf"  # bool, signed, unsigned, float: nothing else is ever written


def resolve(path) -> Path:
    """A run folder or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def save(path, meta: dict, arrays: dict, fmt: str = FORMAT) -> None:
    """Write arrays and meta to path through a temporary file and a rename: a crash mid-write
    leaves the previous checkpoint whole. FileSystemError (one line) when the disk is full or the
    folder cannot be written; the temporary file is removed."""
    path = Path(path)
    arrays = {k: np.ascontiguousarray(a) for k, a in arrays.items()}
    header = {"format": fmt, **meta, "sha256": {k: digest(a) for k, a in arrays.items()}}
    payload = {"meta": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    payload.update(arrays)
    safeio.atomic_write(path, lambda f: np.savez(f, **payload))


def load(path) -> tuple[dict, dict]:
    """(meta, arrays) from a checkpoint file or run folder; CheckpointError on anything wrong."""
    path = resolve(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        arrays = _read_arrays(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {safeio.reason(e)}") from None
    if "meta" not in arrays:
        raise CheckpointError(f"{path}: not a minigpt checkpoint (no 'meta' entry)")
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint header: {str(e)[:100]}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, INT8_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: not a minigpt checkpoint (format {str(found)[:60]!r})")
    if meta["format"] == INT8_FORMAT:
        _check_int8_arrays(path, meta, arrays)
    else:
        _check_arrays(path, meta, arrays)
    _verify_hashes(path, meta, arrays)  # after the shapes, which name a wrong array more exactly
    return meta, arrays


def _read_arrays(path: Path) -> dict:
    """Every member of the .npz, each header checked against the bytes present before reading."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a minigpt checkpoint (not an .npz archive; truncated or foreign?)")
    size = path.stat().st_size
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if len(members) > MAX_MEMBERS:
                raise CheckpointError(f"{path}: {len(members)} entries; not a minigpt checkpoint")
            _check_fits(path, sum(info.file_size for info in members))
            for info in members:
                name = info.filename.removesuffix(".npy")
                if not info.filename.endswith(".npy") or name in arrays:
                    raise CheckpointError(f"{path}: unexpected entry {info.filename[:80]!r}; not a minigpt checkpoint")
                if info.compress_size > size or (info.compress_type == zipfile.ZIP_STORED
                                                 and info.file_size != info.compress_size):
                    raise CheckpointError(f"{path}: entry {name!r} declares more bytes than the file holds (truncated?)")
                with z.open(info) as f:
                    arrays[name] = _read_npy(path, name, f, info.file_size)
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: too large to load into this machine's memory") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError,
            RuntimeError, UnicodeDecodeError, OverflowError, RecursionError, SyntaxError) as e:
        msg = str(e).split("\n")[0][:160]
        if "Bad CRC-32" in msg:
            raise CheckpointError(f"{path}: corrupt checkpoint: {msg} (a changed or flipped bit); not used") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {msg}") from None
    return arrays


def _check_fits(path, nbytes: int) -> None:
    """Refuse, before reading, arrays that cannot fit in the memory available now."""
    available, source = memory.available_bytes()
    if available is not None and nbytes > available:
        raise CheckpointError(f"{path}: its arrays take {memory.gib(nbytes)}, more than the "
                              f"{memory.gib(available)} of memory available ({source})")


def _read_npy(path, name, f, member_size: int) -> np.ndarray:
    """One .npy member: header first; the data only if its declared size is what is present."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f)
        else:
            raise CheckpointError(f"{path}: array {name!r}: unknown .npy version {version}")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - numpy's header parser raises many kinds (ValueError,
        # SyntaxError, tokenize.TokenError, ...) on a damaged header: all mean the same here
        reason = str(e).split("\n")[0][:100]
        raise CheckpointError(f"{path}: array {name!r} has a corrupt .npy header ({type(e).__name__}: "
                              f"{reason}); not used") from None
    if dtype.hasobject:
        raise CheckpointError(f"{path}: array {name!r} holds pickled objects; refused (never unpickled)")
    if dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise CheckpointError(f"{path}: array {name!r} has dtype {dtype}; a checkpoint holds numbers only")
    declared = math.prod(shape) * dtype.itemsize
    present = member_size - f.tell()
    if declared != present:
        raise CheckpointError(f"{path}: array {name!r} declares shape {shape} ({declared:,} bytes) but "
                              f"holds {present:,} bytes; corrupt or truncated, not used")
    buf = bytearray(declared)
    if f.readinto(buf) != declared or f.read(1):
        raise CheckpointError(f"{path}: array {name!r} is truncated")
    a = np.frombuffer(buf, dtype=dtype)
    return a.reshape(shape, order="F" if fortran else "C")


_warned_unverified: set = set()


def _verify_hashes(path, meta: dict, arrays: dict) -> None:
    hashes = meta.get("sha256")
    if hashes is None:
        if str(path) not in _warned_unverified:
            _warned_unverified.add(str(path))
            print(f"note: {path} was written before checkpoints carried content hashes; its arrays "
                  "are checked by the zip's CRC-32 only (resume and save to add hashes)", file=sys.stderr)
        return
    if not isinstance(hashes, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint header: 'sha256' is not a table")
    for name, a in arrays.items():
        if name not in hashes:
            raise CheckpointError(f"{path}: array {name!r} has no recorded hash; not used")
        if digest(a) != hashes[name]:
            raise CheckpointError(f"{path}: array {name!r} is corrupt (its sha256 differs from the one "
                                  "recorded when it was saved); not used")
    missing = sorted(set(hashes) - set(arrays))
    if missing:
        raise CheckpointError(f"{path}: missing array {str(missing[0])[:80]!r} (the header lists it)")


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


#
# With meta["quant"]["bits"] (16, 8 or 4: `minigpt quantize --bits`), each quantized matrix is
# stored as x @ w reads it, (K, M): the token table as the LM head's (C, V). "int8/<name>" then
# holds 8 bits: int8 (K, M) and "scale/<name>" (M,); 4 bits: uint8 (K / 2, M), two weights a byte
# (row 2i low nibble, 2i + 1 high, each biased by 8), and "scale/<name>" (K / G, M) for group size
# G = meta["quant"]["group_size"], float32 holding fp16 values (what the kernel reads); 16 bits: uint16 (K, M) fp16 or bf16 patterns (meta["quant"]
# ["storage16"]) and no scales.


def _int8_scale_shape(name, shape):
    return (shape[0],) if name == "transformer.wte.weight" else (shape[-1],)


def _packed_arrays(name, shape, quant: dict) -> list:
    """The (key, shape, dtype) a --bits checkpoint holds for quantized matrix `name`."""
    K, M = (shape[1], shape[0]) if name == "transformer.wte.weight" else shape
    bits = quant["bits"]
    if bits == 16:
        return [(f"int8/{name}", (K, M), np.uint16)]
    if bits == 8:
        return [(f"int8/{name}", (K, M), np.int8), (f"scale/{name}", (M,), np.float32)]
    G = int(quant["group_size"])
    if bits != 4 or G < 2 or G % 2 or K % G:
        raise ValueError(f"bits {bits} with group_size {G} for {K} inputs")
    return [(f"int8/{name}", (K // 2, M), np.uint8), (f"scale/{name}", (K // G, M), np.float32)]


def _check_int8_arrays(path, meta, arrays) -> None:
    try:
        layout = [(n, tuple(s)) for n, s in meta["layout"]]
        int8_names = set(meta["int8_names"])
        meta["quant"]["mode"]
        packed = meta["quant"].get("bits") is not None
        if packed:
            wants = {name: _packed_arrays(name, shape, meta["quant"]) for name, shape in layout
                     if name in int8_names}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CheckpointError(f"{path}: int8 checkpoint header lacks layout, int8_names or quant") from None
    for name, shape in layout:
        if name in int8_names and packed:
            want = wants[name]
        elif name in int8_names:
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
    """tables: {name: (q int8, scale float32)} (scale None: a 16-bit matrix, no scales);
    floats: {name: float32 array} for the rest."""
    arrays = {}
    for name, (q, scale) in tables.items():
        arrays[f"int8/{name}"] = q
        if scale is not None:
            arrays[f"scale/{name}"] = scale
    for name, a in floats.items():
        arrays[f"float/{name}"] = a
    save(path, {**meta, "int8_names": sorted(tables)}, arrays, fmt=INT8_FORMAT)
