"""Fuzz targets shared by the hypothesis tests (tests/test_fuzz.py) and the atheris harnesses
(tests/fuzz/fuzz_*.py). Each takes raw bytes and either returns (a result) or raises a
MiniGPTError (one clear line); anything else escaping is a bug the fuzzer reports.
"""

import inspect
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from minigpt import api, config
from minigpt.errors import MiniGPTError
from minigpt.nn.params import init, layout
from minigpt.scale import scenario
from minigpt.tokenizers import byte, from_dict
from minigpt.train import checkpoint

_folder: list[Path] = []  # where inputs are written as files: use_folder(), else a temporary one


def use_folder(path) -> None:
    _folder[:] = [Path(path)]


def _tmp() -> Path:
    if not _folder:
        _folder.append(Path(tempfile.mkdtemp(prefix="minigpt-fuzz-")))
    return _folder[0]


def _file(name: str, data: bytes) -> Path:
    path = _tmp() / name
    path.write_bytes(data)
    return path


def _expect(call):
    """call() must return, or raise a MiniGPTError whose message is one line."""
    try:
        return call()
    except MiniGPTError as e:
        assert "\n" not in str(e).strip(), f"a multi-line error: {e!r}"
        return e


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")  # what the command line hands over


# --------------------------------------------------------------------------- the targets


def config_file(data: bytes):
    """A training config file of these bytes."""
    return _expect(lambda: config.load(_file("config.toml", data)))


def set_overrides(data: bytes):
    """--set arguments (one per line of the input) on the default config."""
    return _expect(lambda: config.load(None, _text(data).split("\n")[:8]))


def scenario_file(data: bytes):
    """A scale scenario file of these bytes."""
    return _expect(lambda: scenario.load(_file("scenario.toml", data)))


def tokenizer_classes() -> list:
    """Every tokenizer class in minigpt's tokenizer modules (minigpt.tokenizers.byte and any minigpt
    module whose name mentions "token" or "bpe"): a class with kind, encode, decode and to_dict.
    Kind "none" (MissingTokenizer) is left out: it stands in for a tokenizer a run lacks and refuses
    every text by design, so it has no round trip to fuzz (tests/test_interop.py covers it)."""
    import importlib
    import pkgutil

    import minigpt

    names = [m.name for m in pkgutil.walk_packages(minigpt.__path__, "minigpt.")
             if "token" in m.name.rsplit(".", 1)[-1] or "bpe" in m.name.rsplit(".", 1)[-1]]
    found = {}
    for name in sorted(set(names) | {byte.__name__}):
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if (cls.__module__ == name and getattr(cls, "kind", "none") != "none"
                    and all(hasattr(cls, a) for a in ("encode", "decode", "to_dict"))):
                found[f"{name}.{cls.__name__}"] = cls
    return list(found.values())


def tokenizer_kinds() -> list:
    """One instance of every tokenizer class: built with no arguments, or by the class's
    example() (a small instance, for kinds that need a vocabulary). Classes with neither are
    listed by untested_tokenizer_classes()."""
    found = []
    for cls in tokenizer_classes():
        if hasattr(cls, "example"):
            found.append(cls.example())
            continue
        try:
            found.append(cls())
        except TypeError:
            pass
    return found


def untested_tokenizer_classes() -> list[str]:
    made = {type(t) for t in tokenizer_kinds()}
    return [c.__name__ for c in tokenizer_classes() if c not in made]


def tokenizers(data: bytes):
    """Every tokenizer: encode any text and any bytes, decode any valid ids, stream-decode in
    pieces, rebuild from its own to_dict; and from_dict of arbitrary JSON."""
    text = data.decode("utf-8", errors="ignore")
    for tok in tokenizer_kinds():
        ids = np.asarray(tok.encode(text))
        assert ids.ndim == 1 and (len(ids) == 0 or (0 <= ids.min() and ids.max() < tok.vocab_size))
        assert tok.decode(ids) == text, tok.kind
        ids_b = np.asarray(tok.encode(data))
        assert tok.decode(ids_b) == data.decode("utf-8", errors="replace"), tok.kind
        some = np.frombuffer(data[: len(data) // 2 * 2], dtype=np.uint16) % tok.vocab_size
        whole = tok.decode(some)
        stream = tok.stream_decoder()
        pieces = "".join(stream(some[i : i + 3]) for i in range(0, len(some), 3)) + stream([], final=True)
        assert pieces == whole, tok.kind
        assert from_dict(tok.to_dict()).to_dict() == tok.to_dict()
    try:
        d = json.loads(data)
    except (ValueError, RecursionError):
        return None
    try:
        return from_dict(d)
    except (ValueError, MiniGPTError):  # from_dict's documented refusal
        return None


def checkpoint_file(data: bytes):
    """minigpt.load (the path every command reads checkpoints through) on a file of these bytes."""
    return _expect(lambda: api.load(_file("ckpt.npz", data)))


TARGETS = {"config": config_file, "set": set_overrides, "scenario": scenario_file,
           "tokenizer": tokenizers, "checkpoint": checkpoint_file}


# --------------------------------------------------------------------------- seeds


def tiny_checkpoint_bytes(**arrays_change) -> bytes:
    """A valid checkpoint of a tiny untrained model (the seed the mutations start from)."""
    cfg = config.load(None, ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.block_size=8"])
    params = init(cfg.model, np.random.default_rng(0))
    meta = {"config": cfg.to_dict(), "tokenizer": byte.ByteTokenizer().to_dict(),
            "layout": layout(cfg.model)}
    path = _tmp() / "seed.npz"
    checkpoint.save(path, meta, {"params": params.data, **arrays_change})
    return path.read_bytes()


def npz_bytes(arrays: dict) -> bytes:
    """np.savez of arrays (object arrays are pickled by np.savez: what a hostile file holds)."""
    path = _tmp() / "crafted.npz"
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path.read_bytes()


def huge_shape_npz(shape=(2**50,), dtype="<f4") -> bytes:
    """An .npz whose params.npy header declares `shape` (a petabyte by default) over 16 bytes."""
    import io
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(header, {"descr": dtype, "fortran_order": False, "shape": shape})
    member = header.getvalue() + b"\0" * 16
    meta = json.dumps({"format": checkpoint.FORMAT, "layout": [["w", list(shape)]]}).encode()
    meta_header = io.BytesIO()
    np.lib.format.write_array_header_2_0(meta_header, {"descr": "|u1", "fortran_order": False,
                                                       "shape": (len(meta),)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("meta.npy", meta_header.getvalue() + meta)
        z.writestr("params.npy", member)
    return buf.getvalue()


def seeds(target: str) -> list[bytes]:
    """Starting inputs for a target (atheris mutates them; hypothesis mixes them in)."""
    if target == "checkpoint":
        good = tiny_checkpoint_bytes()
        return [good, good[: len(good) // 2], huge_shape_npz(),
                npz_bytes({"meta": np.frombuffer(b"[" * 50000, dtype=np.uint8)}),
                npz_bytes({"params": np.array([object()], dtype=object)})]
    if target in ("config", "scenario"):
        folder = Path(__file__).resolve().parents[2] / "configs"
        files = [folder / "tiny.toml"] if target == "config" else sorted((folder / "scale").glob("*.toml"))
        return [p.read_bytes() for p in files[:3]] + [b"[model]\nn_layer = " + b"[" * 3000]
    if target == "set":
        return [b"train.max_steps=100", b"model.n_embd=[[1]]\ntrain.lr=abc", b"x"]
    return [b"hello \xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", b'{"kind": "byte"}']


def cleanup() -> None:
    """Remove the temporary folder (when use_folder was not called)."""
    if _folder and _folder[0].name.startswith("minigpt-fuzz-"):
        for p in _folder[0].iterdir():
            os.unlink(p)
        _folder[0].rmdir()
    _folder.clear()
