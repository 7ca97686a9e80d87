"""Tokenizers: bytes (token i is byte i, so any text encodes and decodes back exactly) and GPT-2's
byte-level BPE (minigpt/tokenizer_bpe.py); kind "none" marks a run imported without tokenizer
files (minigpt.interop.MissingTokenizer: token ids only, not a tokenizer).

Every kind has encode (str or bytes), encode_bytes, decode, decode_bytes, stream_decoder and
to_dict; from_dict rebuilds one from a checkpoint's meta.
"""

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


def from_dict(d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer description must be a table, not {type(d).__name__}")  # noqa: TRY004 - callers catch ValueError
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "none":
        from minigpt.interop import MissingTokenizer

        n = d.get("vocab_size")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"a run without a tokenizer needs vocab_size >= 1, got {n!r}")
        return MissingTokenizer(n)
    if kind == "bpe":
        from minigpt.tokenizer_bpe import BPETokenizer

        try:
            return BPETokenizer.from_parts(d["vocab"], d["merges"], "checkpoint tokenizer")
        except (KeyError, TypeError) as e:
            raise ValueError(f"BPE tokenizer entry lacks {e}") from None
    raise ValueError(f"unknown tokenizer kind {kind!r}")
