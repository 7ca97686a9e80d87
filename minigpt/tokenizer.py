"""Tokenizers: bytes (token i is byte i, so any text encodes and decodes back exactly), GPT-2's
byte-level BPE (minigpt/tokenizer_bpe.py), and "none" for a run imported without tokenizer files.

Every kind has encode (str or bytes), encode_bytes, decode, decode_bytes, stream_decoder and
to_dict; from_dict rebuilds one from a checkpoint's meta.
"""

import codecs

import numpy as np

from minigpt.errors import DataError


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (UTF-8; lone surrogates from the command line pass through) or bytes -> uint8 ids."""
        if isinstance(text, str):
            text = text.encode("utf-8", errors="surrogateescape")
        return np.frombuffer(text, dtype=np.uint8).copy()

    encode_bytes = encode

    def decode_bytes(self, ids) -> bytes:
        return bytes(np.asarray(ids, dtype=np.uint8))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A callable (ids, final=False) -> text that holds back an incomplete UTF-8 sequence until
        it completes; final=True flushes what is left."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: dec.decode(self.decode_bytes(ids), final)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


class NoTokenizer:
    """A run with no tokenizer (imported without vocab.json + merges.txt, or `minigpt init` of a
    BPE config with no tokenizer_path): token ids work, text does not. decode shows ids as <id>."""

    kind = "none"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text) -> np.ndarray:
        raise DataError("this run has no tokenizer (no vocab.json + merges.txt were given): text "
                        "prompts cannot be encoded; pass token ids (generate --prompt-ids 1,2,3)")

    encode_bytes = encode

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode()

    def decode(self, ids) -> str:
        return "".join(f"<{int(i)}>" for i in ids)

    def stream_decoder(self):
        return lambda ids, final=False: self.decode(ids)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def from_dict(d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer description must be a table, not {type(d).__name__}")  # noqa: TRY004 - callers catch ValueError
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "none":
        return NoTokenizer(int(d.get("vocab_size", 0)))
    if kind == "bpe":
        from minigpt.tokenizer_bpe import BPETokenizer

        try:
            return BPETokenizer.from_parts(d["vocab"], d["merges"], "checkpoint tokenizer")
        except (KeyError, TypeError) as e:
            raise ValueError(f"BPE tokenizer entry lacks {e}") from None
    raise ValueError(f"unknown tokenizer kind {kind!r}")
