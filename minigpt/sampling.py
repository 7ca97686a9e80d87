"""Text generation: prefill the prompt into a KV cache, then decode one token at a time.

Sampling follows the usual order: temperature, then top-k, then top-p (nucleus); temperature 0
is greedy. The prefill runs under the meter's "prefill" phase and each new token under "decode".
When the cache is full it is rebuilt by another prefill, of the last block_size // 2 tokens.
`generate` returns the new ids with the generation's own counts of that schedule (Generation).
"""

from dataclasses import dataclass

import numpy as np

from minigpt import backend
from minigpt.counting.meter import METER
from minigpt.nn.model import KVCache


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, rng=None) -> int:
    """One token id from next-token logits (V,), on the host in float64."""
    z = np.asarray(backend.to_host(logits), dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(z))
    z = z / temperature
    if top_k is not None and 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # probability mass ahead of each token
        p[order[before >= top_p]] = 0.0  # the most likely token always stays
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


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
