"""GPT-2's byte-level BPE: load vocab.json + merges.txt, encode and decode exactly as GPT-2 does,
learn merges from a corpus, and write the same two files.

How GPT-2 tokenizes: the text is cut into pieces by a regular expression (contractions, runs of
letters or digits with an optional leading space, runs of other symbols, whitespace); each piece's
UTF-8 bytes are spelled with one printable Unicode character per byte (the byte-to-unicode table,
so that vocab.json holds only printable strings); then the pair of adjacent symbols whose merge
ranks first (the earliest line of merges.txt) is joined, again and again, until no listed pair is
left. Each final symbol is a key of vocab.json, whose value is the token id.

Bytes that are not valid UTF-8 take the same path: they are decoded with surrogateescape (each
becomes a lone surrogate the pattern treats as a symbol) and encoded back to the original bytes
before the byte-to-unicode step, so encode_bytes / decode_bytes round-trip any bytes.
"""

import codecs
import heapq
import json
from collections import Counter, defaultdict
from functools import lru_cache
from itertools import pairwise
from pathlib import Path

import numpy as np

from minigpt.errors import DataError

# GPT-2's pre-tokenisation pattern (needs the `regex` package for \p{L} and \p{N}).
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIAL = "<|endoftext|>"  # split out as one token when the vocabulary has it, as GPT-2 does


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable Latin-1 bytes stand for themselves, the other 68 bytes are given
    the characters 256, 257, ... in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # GPT-2's vocab lists the 256 byte symbols in this order: the kept bytes, then the others
    return {b: table[b] for b in keep + [b for b in range(256) if b not in keep]}


def _pattern():
    try:
        import regex
    except ImportError:  # pragma: no cover - regex is in the gpt2 and test extras
        raise DataError("GPT-2's BPE needs the `regex` package: pip install 'minigpt[gpt2]'") from None
    return regex.compile(PATTERN)


def _piece_bytes(piece: str) -> bytes:
    """A piece's bytes; lone surrogates from surrogateescape become their original bytes."""
    try:
        return piece.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:  # a surrogate that never was a byte (e.g. from a command line)
        return piece.encode("utf-8", errors="surrogatepass")


class BPETokenizer:
    """vocab: {symbol string: id}; merges: [(left, right)] in rank order."""

    kind = "bpe"

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        self.vocab = vocab
        self.merges = merges
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.id_to_symbol = {i: s for s, i in vocab.items()}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.special_id = vocab.get(SPECIAL)
        self._regex = _pattern()
        self._cache: dict[str, list[int]] = {}
        missing = [c for c in self.byte_char.values() if c not in vocab]
        if missing:
            raise DataError(f"BPE vocabulary lacks {len(missing)} of the 256 byte symbols "
                            f"(e.g. {missing[0]!r}): some bytes could not be encoded")

    # ------------------------------------------------------------------------- encoding

    def _bpe(self, symbols: str) -> list[int]:
        """Ids of one piece already spelled in byte symbols, merged by rank."""
        hit = self._cache.get(symbols)
        if hit is not None:
            return hit
        word = list(symbols)
        ranks = self.ranks
        while len(word) > 1:
            best, best_rank = None, None
            for pair in pairwise(word):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = pair, r
            if best is None:
                break
            left, right = best
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        try:
            ids = [self.vocab[s] for s in word]
        except KeyError as e:
            raise DataError(f"BPE merges produce {e.args[0]!r}, which vocab.json lacks") from None
        if len(self._cache) < 200_000:
            self._cache[symbols] = ids
        return ids

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        chunks = text.split(SPECIAL) if self.special_id is not None else [text]
        for n, chunk in enumerate(chunks):
            if n:
                out.append(self.special_id)
            for piece in self._regex.findall(chunk):
                out.extend(self._bpe("".join(self.byte_char[b] for b in _piece_bytes(piece))))
        return out

    def encode(self, text: str | bytes) -> list[int]:
        """GPT-2's ids for text (bytes are read as UTF-8, invalid bytes kept: see encode_bytes)."""
        return self.encode_bytes(text) if isinstance(text, bytes) else self._encode_text(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids for any bytes; for valid UTF-8 the same as encode(data.decode())."""
        return self._encode_text(data.decode("utf-8", errors="surrogateescape"))

    def decode_bytes(self, ids) -> bytes:
        try:
            return bytes(self.char_byte[c] for i in ids for c in self.id_to_symbol[int(i)])
        except KeyError as e:
            raise DataError(f"token id {e.args[0]!r} is not in the BPE vocabulary") from None

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        """(ids, final=False) -> text, holding back an incomplete UTF-8 sequence (see ByteTokenizer)."""
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda ids, final=False: dec.decode(self.decode_bytes(ids), final)

    # ------------------------------------------------------------------------- files

    @classmethod
    def load(cls, folder) -> "BPETokenizer":
        """From a folder holding GPT-2's vocab.json and merges.txt."""
        folder = Path(folder)
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise DataError(f"{p}: no such file (a GPT-2 tokenizer is vocab.json + merges.txt)")
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{folder}: cannot read the tokenizer: {e}") from None
        return cls.from_parts(vocab, lines, str(folder))

    @classmethod
    def example(cls) -> "BPETokenizer":
        """A small tokenizer (300 tokens learned from a fixed sentence), for tests and fuzzing."""
        return cls.train("The quick brown fox jumps over the lazy dog; the dog sleeps. " * 8
                         + "def f(x):\n    return x + 1\n", 300)

    @classmethod
    def from_parts(cls, vocab, merge_lines, where: str = "tokenizer") -> "BPETokenizer":
        if not isinstance(vocab, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in vocab.items()):
            raise DataError(f"{where}: vocab.json must map token strings to ids >= 0")
        if not isinstance(merge_lines, list) or not all(isinstance(m, str) for m in merge_lines):
            raise DataError(f"{where}: merges must be lines of text")
        merges = []
        for n, line in enumerate(merge_lines, 1):
            if line.startswith("#version") or not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise DataError(f"{where}: merges.txt line {n}: expected two symbols, got {line!r}")
            merges.append((parts[0], parts[1]))
        try:
            return cls(vocab, merges)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None

    def merge_lines(self) -> list[str]:
        return [f"{a} {b}" for a, b in self.merges]

    def save(self, folder) -> None:
        """Write vocab.json and merges.txt (each atomically, through minigpt.safeio)."""
        from minigpt import safeio

        folder = safeio.make_dir(folder)
        vocab_text = json.dumps(self.vocab, ensure_ascii=False)
        merges_text = "#version: 0.2\n" + "".join(line + "\n" for line in self.merge_lines())
        for name, text in (("vocab.json", vocab_text), ("merges.txt", merges_text)):
            safeio.write_text(folder / name, text)

    def to_dict(self) -> dict:
        """The whole tokenizer, for a checkpoint's meta (so a run carries its tokenizer)."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "vocab": self.vocab,
                "merges": self.merge_lines()}

    # ------------------------------------------------------------------------- training

    @classmethod
    def train(cls, text: str | bytes, vocab_size: int, progress: bool = False) -> "BPETokenizer":
        """Learn vocab_size - 256 merges from text: the most frequent adjacent pair (ties: the
        smaller pair of ids) is merged, again and again, counted over unique pre-tokenised pieces
        with their multiplicities and updated incrementally after each merge."""
        if vocab_size < 256:
            raise DataError(f"a byte-level BPE needs vocab_size >= 256, got {vocab_size}")
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="surrogateescape")
        byte_char = bytes_to_unicode()
        symbols = list(byte_char.values())  # id -> symbol string; ids 0..255 are the bytes
        symbol_id = {s: i for i, s in enumerate(symbols)}
        byte_id = {b: i for i, b in enumerate(byte_char)}
        counts = Counter(_pattern().findall(text))
        words = [[byte_id[b] for b in _piece_bytes(p)] for p in counts]
        freq = list(counts.values())
        pairs: Counter = Counter()
        where: dict = defaultdict(set)  # pair -> indices of words holding it
        for w, (ids, f) in enumerate(zip(words, freq)):
            for pair in pairwise(ids):
                pairs[pair] += f
                where[pair].add(w)
        heap = [(-c, pair) for pair, c in pairs.items()]
        heapq.heapify(heap)
        merges = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=vocab_size - 256, desc="learning BPE merges", unit="merge")
        while len(symbols) < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -neg or neg == 0:
                continue  # a stale entry: its count has changed since it was pushed
            a, b = pair
            joined = symbols[a] + symbols[b]
            if joined in symbol_id:  # another merge order already made this string: reuse its id
                new = symbol_id[joined]
            else:
                new = symbol_id[joined] = len(symbols)
                symbols.append(joined)
                if bar is not None:
                    bar.update(1)
            merges.append((symbols[a], symbols[b]))
            changed = set()
            for w in list(where.pop(pair, ())):
                ids, f = words[w], freq[w]
                for p in pairwise(ids):  # take this word's pairs out ...
                    pairs[p] -= f
                    changed.add(p)
                out, i = [], 0
                while i < len(ids):
                    if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                        out.append(new)
                        i += 2
                    else:
                        out.append(ids[i])
                        i += 1
                words[w] = out
                for p in pairwise(out):  # ... and its new pairs back in
                    pairs[p] += f
                    where[p].add(w)
                    changed.add(p)
            pairs.pop(pair, None)
            for p in changed:
                c = pairs.get(p, 0)
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:
                    pairs.pop(p, None)
        if bar is not None:
            bar.close()
        return cls({s: i for i, s in enumerate(symbols)}, merges)


def ids_array(ids, vocab_size: int) -> np.ndarray:
    """Token ids as the smallest unsigned array that holds them (uint16 for GPT-2's 50257)."""
    return np.asarray(ids, dtype=np.uint16 if vocab_size <= 1 << 16 else np.uint32)
