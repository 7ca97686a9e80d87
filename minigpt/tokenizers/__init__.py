"""Tokenizers: bytes (token i is byte i, so any text encodes and decodes back exactly), GPT-2's
byte-level BPE, and kind "none" for a run imported without tokenizer files (token ids only).

Every kind has encode (str or bytes), encode_bytes, decode, decode_bytes, stream_decoder and
to_dict; from_dict rebuilds one from a checkpoint's meta. This is the public place for all three:
`from minigpt.tokenizers import BPETokenizer`.
"""

from minigpt.tokenizers.bpe import BPETokenizer
from minigpt.tokenizers.byte import ByteTokenizer, MissingTokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "MissingTokenizer", "from_dict"]


def from_dict(d: dict):
    if not isinstance(d, dict):
        raise ValueError(f"a tokenizer description must be a table, not {type(d).__name__}")  # noqa: TRY004 - callers catch ValueError
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "none":
        n = d.get("vocab_size")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"a run without a tokenizer needs vocab_size >= 1, got {n!r}")
        return MissingTokenizer(n)
    if kind == "bpe":
        try:
            return BPETokenizer.from_parts(d["vocab"], d["merges"], "checkpoint tokenizer")
        except (KeyError, TypeError) as e:
            raise ValueError(f"BPE tokenizer entry lacks {e}") from None
    raise ValueError(f"unknown tokenizer kind {kind!r}")
