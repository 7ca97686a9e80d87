"""Text generation: prefill the prompt into a KV cache, then decode one token at a time.

Sampling follows the usual order: temperature, then top-k, then top-p (nucleus); temperature 0
is greedy. The prefill runs under the meter's "prefill" phase and each new token under "decode".
When the cache is full it is rebuilt by another prefill, of the last block_size // 2 tokens.
`generate` returns the new ids with the generation's own counts of that schedule (Generation).
`generate_batch` decodes several sequences together (several prompts, or several samples of one):
each keeps its own KV cache, and every decode step is one `GPT.decode_step` over all of them.
"""

from dataclasses import dataclass

import numpy as np

from minigpt import backend
from minigpt.counting.meter import METER
from minigpt.nn.model import KVCache


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None) -> int:
    """One token id from next-token logits (V,), on the host in float64.

    Without top-k or top-p, a NumPy Generator draws from the softmax by fast_softmax_draw (its
    exponentials in float32: a tenth of the time); any other rng (the tests' recorders) is handed
    the float64 probabilities through choice."""
    logits = backend.to_host(logits)
    if temperature == 0:
        return int(np.argmax(logits))
    if (top_k is None and (top_p is None or top_p >= 1.0)
            and isinstance(rng, np.random.Generator)):
        return fast_softmax_draw(logits, temperature, rng)
    z = np.asarray(logits, dtype=np.float64) / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        p[nucleus_dropped(p, top_p)] = 0.0  # the most likely token always stays
        p /= p.sum()
    return draw(rng, p)


NUCLEUS_CANDIDATES = 64  # tokens nucleus_dropped sorts first; more only if their mass falls short


def nucleus_dropped(p, top_p: float):
    """Which ids top-p drops from probabilities p (V,), a boolean mask: in order of p, likeliest first and ties by
    the lower id (a stable sort of -p), every token whose mass ahead reaches top_p.

    A full stable sort of GPT-2's 50,257 probabilities took 4.7 ms a token, twice a 4-bit decode
    step. The nucleus is nearly always a few dozen tokens, so this sorts only the candidates:
    every token at least as likely as the NUCLEUS_CANDIDATES-th likeliest (ties all in, so the
    order among them is the full sort's), and is done if their mass reaches top_p; else sixteen
    times as many, and past an eighth of the vocabulary the full sort (a nearly flat distribution,
    an untrained model's, keeps most tokens: then this costs the sort and about 0.2 ms more). The
    mass ahead is the same running sum over the same tokens in the same order, so the tokens
    dropped are exactly the full sort's (tests/test_sampling.py; bench/sampling.py times it)."""
    V = p.size
    k = NUCLEUS_CANDIDATES
    while 8 * k <= V:
        least = np.partition(p, V - k)[V - k]  # the k-th likeliest's probability
        ids = np.flatnonzero(p >= least)  # ascending ids: a stable sort keeps ties in id order
        order = ids[np.argsort(-p[ids], kind="stable")]
        before = np.cumsum(p[order]) - p[order]  # probability mass ahead of each candidate
        if before[-1] >= top_p:  # the nucleus ends among the candidates: every other id goes too
            dropped = np.ones(V, dtype=bool)
            dropped[order[before < top_p]] = False
            return dropped
        k *= 16
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    dropped = np.zeros(V, dtype=bool)
    dropped[order[before >= top_p]] = True
    return dropped


def fast_softmax_draw(logits, temperature: float, rng: np.random.Generator) -> int:
    """A token drawn from softmax(logits / temperature), the exponentials taken in float32.

    A server samples every sequence of every decode step, and over GPT-2's 50,257 tokens this
    NumPy's float64 exp (not vectorised) took 0.32 ms, float32's 0.02 ms. Each weight
    exp((z - max z) / t) is then within a few float32 ulps (about 1e-6 relative) of the float64
    one, and draw sums them in float64."""
    z = np.asarray(logits, dtype=np.float32)
    w = np.exp((z - z.max()) / np.float32(temperature))
    return draw(rng, w)


BLOCK = 256  # weights a block of draw's two-level search


def draw(rng, w) -> int:
    """An index drawn with probability w[i] / sum(w), w (V,) non-negative, not all zero.

    A NumPy Generator takes one uniform u and returns the first index whose cumulative weight
    exceeds u times the total, as choice does; an index of zero weight is never returned. The
    search is two-level: a cumulative sum over blocks of BLOCK weights finds the block, then one
    inside it (a whole float64 cumsum over 50,257 weights took 0.15 ms, more than this). Any
    other rng (the tests' recorders) is asked through choice with the normalised w."""
    if not isinstance(rng, np.random.Generator):
        w = np.asarray(w, dtype=np.float64)
        return int(rng.choice(w.size, p=w / w.sum()))
    n = w.size
    blocks = np.zeros(-(-n // BLOCK) * BLOCK)
    blocks[:n] = w
    blocks = blocks.reshape(-1, BLOCK)
    ends = np.cumsum(blocks.sum(axis=1))  # the cumulative weight at each block's end
    target = rng.random() * ends[-1]
    b = int(ends.searchsorted(target, side="right"))
    if b < len(ends):
        inside = np.cumsum(blocks[b]) + (ends[b - 1] if b else 0.0)
        j = int(inside.searchsorted(target, side="right"))
        if j < BLOCK:  # (past the block's end only by the two sums' rounding)
            return b * BLOCK + j
        return b * BLOCK + int(np.flatnonzero(blocks[b])[-1])
    return int(np.flatnonzero(blocks.reshape(-1))[-1])  # u * total rounded up to the total


@dataclass(frozen=True)
class Generation:
    """A generation's new token ids and its schedule: the first new token, and the first after each
    rebuild, come from a prefill's logits; every other one from a decode step of one token."""

    tokens: np.ndarray  # (max_new_tokens,) int64, the new ids
    prefill_tokens: int  # tokens the prefills read: the prompt, then block_size // 2 per rebuild
    decode_steps: int  # forward passes of one token each
    rebuilds: int  # times the full cache was rebuilt by a prefill

    @property
    def prefills(self) -> int:
        """Forward passes over many tokens: the prompt's and one per rebuild."""
        return 1 + self.rebuilds

    def to_json(self) -> dict:
        return {"tokens": self.tokens.tolist(), "prefill_tokens": self.prefill_tokens,
                "decode_steps": self.decode_steps, "rebuilds": self.rebuilds}


def generate(model, prompt, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
             seed=None, on_token=None, kv_int8: bool = False,
             n_tokens: int | None = None) -> Generation:
    """New token ids after prompt (1-D ids, at most block_size of them), batch 1, KV-cached, with
    the counts of the prefills and decode steps that made them.

    on_token(id) is called as each token is chosen (for streaming). When the cache is full, it is
    rebuilt from the last block_size // 2 tokens, so generation can run past the context.
    kv_int8: keep the KV cache in int8. n_tokens: sample only ids below it (the tokenizer's
    vocabulary, when the model has spare rows beyond it)."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    ids = [int(t) for t in prompt]
    assert 0 < len(ids) <= cfg.block_size, "the caller trims the prompt to block_size"
    dtype = model.params.data.dtype
    kv = KVCache(cfg, 1, dtype, int8=kv_int8)
    with METER.in_phase("prefill"):
        logits = model.logits(backend.asarray(np.array([ids])), kv, last_only=True)
    prefill_tokens, decode_steps, rebuilds = len(ids), 0, 0
    new = []
    for i in range(max_new_tokens):
        token = sample_next(logits[0, -1, :n_tokens], temperature, top_k, top_p, rng)
        new.append(token)
        ids.append(token)
        if on_token is not None:
            on_token(token)
        if i == max_new_tokens - 1:
            break
        if kv.length == kv.capacity:
            kv = KVCache(cfg, 1, dtype, int8=kv_int8)
            with METER.in_phase("prefill"):
                context = backend.asarray(np.array([ids[-(cfg.block_size // 2):]]))
                logits = model.logits(context, kv, last_only=True)
            prefill_tokens += context.shape[1]
            rebuilds += 1
        else:
            with METER.in_phase("decode"):
                logits = model.logits(backend.asarray(np.array([[token]])), kv)
            decode_steps += 1
    return Generation(np.array(new, dtype=np.int64), prefill_tokens, decode_steps, rebuilds)


def sequence_rng(seed, index: int):
    """The sampler of sequence `index` of a batch: seeded seed + index, so sequence 0 samples as
    `generate` with the same seed does; unseeded (fresh entropy) when seed is None."""
    return np.random.default_rng(None if seed is None else seed + index)


def generate_batch(model, prompts, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                   seed=None, on_token=None, kv_int8: bool = False,
                   n_tokens: int | None = None) -> list[Generation]:
    """`generate` for several sequences decoded together: prompts a list of 1-D id sequences
    (repeat one prompt for several samples of it), each at most block_size long; lengths may
    differ. Each sequence is prefilled on its own into its own KV cache; then each decode step
    runs one `model.decode_step` over every sequence, so each weight is read once a step for all
    of them. A sequence whose cache is full is rebuilt by a prefill of its last block_size // 2
    tokens, as in `generate`, and sits that step out.

    Sequence b samples from sequence_rng(seed, b); on_token(b, id) is called as each token is
    chosen. Returns one Generation per prompt, in order."""
    cfg = model.cfg
    dtype = model.params.data.dtype
    n = len(prompts)
    ids = [[int(t) for t in prompt] for prompt in prompts]
    for b, seq in enumerate(ids):
        assert 0 < len(seq) <= cfg.block_size, f"the caller trims prompt {b} to block_size"
    rngs = [sequence_rng(seed, b) for b in range(n)]
    caches = [KVCache(cfg, 1, dtype, int8=kv_int8) for _ in range(n)]
    rows: list = [None] * n  # each sequence's next-token logits (V,)
    with METER.in_phase("prefill"):
        for b in range(n):
            rows[b] = model.logits(backend.asarray(np.array([ids[b]])), caches[b], last_only=True)[0, -1]
    prefill_tokens = [len(seq) for seq in ids]
    decode_steps, rebuilds = [0] * n, [0] * n
    new: list[list[int]] = [[] for _ in range(n)]
    for i in range(max_new_tokens):
        tokens = []
        for b in range(n):
            token = sample_next(rows[b][:n_tokens], temperature, top_k, top_p, rngs[b])
            new[b].append(token)
            ids[b].append(token)
            tokens.append(token)
            if on_token is not None:
                on_token(b, token)
        if i == max_new_tokens - 1:
            break
        stepping = []
        for b in range(n):
            if caches[b].length < caches[b].capacity:
                stepping.append(b)
                continue
            caches[b] = KVCache(cfg, 1, dtype, int8=kv_int8)
            context = ids[b][-(cfg.block_size // 2):]
            with METER.in_phase("prefill"):
                rows[b] = model.logits(backend.asarray(np.array([context])), caches[b], last_only=True)[0, -1]
            prefill_tokens[b] += len(context)
            rebuilds[b] += 1
        if stepping:
            with METER.in_phase("decode"):
                logits = model.decode_step(np.array([tokens[b] for b in stepping]),
                                           [caches[b] for b in stepping])
            for row, b in enumerate(stepping):
                rows[b] = logits[row]
                decode_steps[b] += 1
    return [Generation(np.array(new[b], dtype=np.int64), prefill_tokens[b], decode_steps[b], rebuilds[b])
            for b in range(n)]
