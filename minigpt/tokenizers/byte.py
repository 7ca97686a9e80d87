"""The tokenizers that need no vocabulary: bytes (token i is byte i, so any text encodes and decodes
back exactly), and kind "none", the stand-in for a run imported without tokenizer files (token ids
only, not a tokenizer)."""

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


class MissingTokenizer:
    """Stands in for the tokenizer of a run that has none (imported without vocab.json +
    merges.txt, or `minigpt init` of a BPE config with no tokenizer_path): token ids work, text
    does not (encode refuses in one line); decode shows ids as <id>. Kind "none" in a checkpoint."""

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
