"""Byte-level tokenizer: token i is byte i, so any text encodes and decodes back exactly."""

import codecs

import numpy as np


class ByteTokenizer:
    kind = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text (UTF-8; lone surrogates from the command line pass through) or bytes -> uint8 ids."""
        if isinstance(text, str):
            text = text.encode("utf-8", errors="surrogateescape")
        return np.frombuffer(text, dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8)).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """A callable (ids, final=False) -> text that holds back an incomplete UTF-8 sequence until
        it completes; final=True flushes what is left."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: dec.decode(bytes(np.asarray(ids, dtype=np.uint8)), final)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size}


def from_dict(d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer description must be a table, not {type(d).__name__}")  # noqa: TRY004 - callers catch ValueError
    if d.get("kind") != "byte":
        raise ValueError(f"unknown tokenizer kind {d.get('kind')!r}")
    return ByteTokenizer()
