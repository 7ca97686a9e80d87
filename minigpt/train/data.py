"""Corpora -> token arrays -> batches.

The default corpus is one every machine has offline: the running Python's standard-library
sources (*.py files; test suites, site-packages and the generated data tables of encodings/ and
pydoc_data/ left out; in a fixed order shuffled by a hash of each path, so a byte cap samples the
whole library rather than its alphabetical start; up to [data] max_bytes). A config can instead name any text file or folder ([data] path). Folders and
the standard library split into train and validation by file, a single file by its last bytes.
"""

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minigpt.errors import DataError

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "dist-packages",
              "encodings", "pydoc_data"}  # the last two: generated tables and docs, not code


@dataclass
class Corpus:
    train: np.ndarray  # token ids, uint8 for the byte tokenizer, uint16 for GPT-2's BPE
    val: np.ndarray
    source: str  # what was read, for the log
    n_files: int
    val_bytes: int = 0  # bytes of text behind the validation tokens (for bits per byte)

    @property
    def val_bytes_per_token(self) -> float:
        return self.val_bytes / len(self.val) if len(self.val) else 1.0


@dataclass
class RawSplits:
    train: bytes
    val: bytes
    source: str
    n_files: int


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's own sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and not p.name.startswith("test_")
    ]
    files.sort(key=lambda p: (zlib.adler32(p.relative_to(root).as_posix().encode()), p.as_posix()))
    return root, files


def _is_val(rel: str, fraction: float) -> bool:
    """A file's split, fixed by a hash of its relative path (the same on every machine)."""
    return zlib.crc32(rel.encode()) / 2**32 < fraction


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"[data] path: cannot read {path}: {e.strerror or e}") from None


def load_corpus(dcfg, tokenizer, raw: "RawSplits | None" = None) -> Corpus:
    """The train and validation token arrays for a DataConfig (raw: splits already read)."""
    raw = raw or read_splits(dcfg)
    return Corpus(train=_encode(tokenizer, raw.train), val=_encode(tokenizer, raw.val),
                  source=raw.source, n_files=raw.n_files, val_bytes=len(raw.val))


def _encode(tokenizer, blob: bytes) -> np.ndarray:
    ids = tokenizer.encode_bytes(blob)
    if isinstance(ids, np.ndarray):
        return ids
    from minigpt.tokenizers.bpe import ids_array

    return ids_array(ids, tokenizer.vocab_size)


def read_splits(dcfg) -> RawSplits:
    """The corpus's bytes, split into training and validation text."""
    if dcfg.path:
        root = Path(dcfg.path).expanduser()
        if not root.exists():
            raise DataError(f"[data] path = {dcfg.path!r}: no such file or folder")
        if root.is_file():
            files = [root]
        else:
            files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        source = str(root)
    else:
        root, files = stdlib_files()
        source = f"Python standard library sources ({root})"
    if not files:
        raise DataError(f"[data] path = {str(root)!r}: the folder holds no files")

    train, val, total = [], [], 0
    for f in files:
        if total >= dcfg.max_bytes:
            break
        blob = _read(f)[: dcfg.max_bytes - total]
        total += len(blob)
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        (val if _is_val(rel, dcfg.val_fraction) else train).append(blob)
    if total == 0:
        raise DataError(f"[data] path = {str(root)!r}: the corpus is empty")
    if not train or not val:  # one file, or an unlucky split: split the bytes instead
        blob = b"".join(train + val)
        cut = int(len(blob) * (1 - dcfg.val_fraction))
        train, val = [blob[:cut]], [blob[cut:]]
    return RawSplits(b"".join(train), b"".join(val), source, len(files))


def check_length(corpus: Corpus, block_size: int) -> None:
    for name, arr in (("training", corpus.train), ("validation", corpus.val)):
        if len(arr) < block_size + 2:
            raise DataError(
                f"[data] {corpus.source}: the {name} split has {len(arr)} tokens, fewer than "
                f"block_size + 2 = {block_size + 2}"
            )


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator):
    """batch_size random windows: inputs x (B, T) and their next tokens y (B, T), as int64."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, block_size + 1)  # (n, T+1) view
    starts = rng.integers(0, len(windows), size=batch_size)
    chunk = windows[starts].astype(np.int64)  # (B, T+1)
    return chunk[:, :-1], chunk[:, 1:]


def make_tokenizer(cfg, raw: RawSplits, progress: bool = False):
    """The tokenizer a config asks for: bytes; GPT-2's BPE from [data] tokenizer_path; or a BPE
    learned from the training split ([data] vocab_size tokens, 0 = [model] vocab_size). Learning
    is deterministic, so a resumed run learns the same merges again."""
    from minigpt.errors import ConfigError
    from minigpt.tokenizers import ByteTokenizer

    d, m = cfg.data, cfg.model
    if d.tokenizer == "bytes":
        tok = ByteTokenizer()
    else:
        from minigpt.tokenizers.bpe import BPETokenizer

        if d.tokenizer_path:
            tok = BPETokenizer.load(Path(d.tokenizer_path).expanduser())
        else:
            tok = BPETokenizer.train(raw.train, d.vocab_size or m.vocab_size,
                                     progress=progress and len(raw.train) > 1 << 20)
    if tok.vocab_size > m.vocab_size:
        raise ConfigError(f"[model] vocab_size = {m.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}: the model needs a row for every token")
    return tok
