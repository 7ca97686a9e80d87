"""The int8 KV cache against float attention: cached attention, keys and values stored as int8
with one scale per vector, stays within a bound derived from the quantization step of the float64
attention computed here from the same inputs, at the prefill and at every decode step after it.

The bound, for one query q (one head, hs wide) and its visible keys k_j and values v_j:

    a vector x is stored as s * round(x / s) with s = max|x| / 127, so each element is off by at
    most s / 2 (rounding; |x / s| <= 127 never clips);
    scores: |q . k^_j - q . k_j| <= ||q||_1 * s_kj / 2, scaled by 1 / sqrt(hs):
        delta = max_j ||q||_1 * s_kj / (2 sqrt(hs));
    softmax: every score moves by at most delta, so every p^_j / p_j lies in [e^-2delta, e^2delta]
        and sum_j |p^_j - p_j| <= e^(2 delta) - 1;
    output: y^ - y = sum_j p^_j (v^_j - v_j) + sum_j (p^_j - p_j) v_j, so element d is off by
        at most max_j s_vj / 2 + (e^(2 delta) - 1) * max_j |v_jd|.

The keys and values here differ in size (c_attn's value columns are 4 times its query and key
columns), so a product rescaled by the wrong vector's scales lands far outside the bound.
"""

import math

import numpy as np

from minigpt.config import ModelConfig
from minigpt.nn import layers as nn
from minigpt.nn.model import KVCache

B, H, HS, T = 2, 4, 8, 12
C = H * HS
PREFILL = 5  # positions written by the first call; each later call decodes one more
FLOAT32_SLACK = 1e-5  # relative: float32 rounding of the model's products, far below the bound


def _products(a, b):
    """a (..., M, K) times b (..., K, N) by broadcasting, in float64 (the reference, unmetered)."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(axis=-2)


def _setup():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (C, 3 * C))
    w[:, 2 * C:] *= 4.0  # values 4 times the size of the keys
    p = {"attn.c_attn.weight": w.astype(np.float32),
         "attn.c_attn.bias": rng.normal(0, 0.1, 3 * C).astype(np.float32),
         "attn.c_proj.weight": np.eye(C, dtype=np.float32),  # identity: out is the heads' output
         "attn.c_proj.bias": np.zeros(C, dtype=np.float32)}
    x = rng.normal(0, 1, (B, T, C)).astype(np.float32)
    return x, p


def _reference(x, p):
    """Float64 causal attention over all T positions and the bound of each output element."""
    xd = x.astype(np.float64)
    qkv = _products(xd, p["attn.c_attn.weight"].astype(np.float64)) + p["attn.c_attn.bias"]
    q, k, v = qkv.reshape(B, T, 3, H, HS).transpose(2, 0, 3, 1, 4)  # each (B, H, T, hs)
    scores = _products(q, k.swapaxes(-1, -2)) / math.sqrt(HS)  # (B, H, T, T)
    visible = np.arange(T)[None, :] <= np.arange(T)[:, None]  # key j <= query i
    scores = np.where(visible, scores, -np.inf)
    att = np.exp(scores - scores.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    y = _products(att, v)  # (B, H, T, hs)

    s_k = np.abs(k).max(axis=-1) / 127  # (B, H, T): each key's quantization step
    s_v = np.abs(v).max(axis=-1) / 127
    q_l1 = np.abs(q).sum(axis=-1)  # (B, H, T)
    bound = np.empty_like(y)
    for i in range(T):  # query i sees keys 0..i
        delta = q_l1[:, :, i] * s_k[:, :, : i + 1].max(axis=-1) / (2 * math.sqrt(HS))  # (B, H)
        v_max = np.abs(v[:, :, : i + 1]).max(axis=2)  # (B, H, hs)
        bound[:, :, i] = (s_v[:, :, : i + 1].max(axis=-1)[..., None] / 2
                          + np.expm1(2 * delta)[..., None] * v_max
                          + FLOAT32_SLACK * v_max)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C), bound.transpose(0, 2, 1, 3).reshape(B, T, C)


def _int8_cached_attention(x, p):
    """The model's attention with an int8 cache: a prefill of PREFILL positions, then one
    position per call; the outputs of every call side by side (B, T, C)."""
    cfg = ModelConfig(n_layer=1, n_head=H, n_embd=C, block_size=T, vocab_size=8)
    kv = KVCache(cfg, B, "float32", int8=True)
    outs = []
    for t0, t1 in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, T)]:
        out, _ = nn.attention_forward(x[:, t0:t1], p, H, kv.layer(0))
        kv.length = t1  # what GPT.hidden does after every layer has appended
        outs.append(np.asarray(out, dtype=np.float64))
    return np.concatenate(outs, axis=1)


def test_int8_kv_cache_attention_is_within_the_quantization_bound_of_float_attention():
    x, p = _setup()
    y, bound = _reference(x, p)
    got = _int8_cached_attention(x, p)
    err = np.abs(got - y)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), (worst, err[worst], bound[worst])
    assert err.max() > 0  # the cache really is quantized


def test_the_bound_is_tight_enough_to_mean_something():
    """The bound is a few percent of the outputs: far below what a wrong scale would cost."""
    x, p = _setup()
    y, bound = _reference(x, p)
    assert bound.max() < 0.05 * np.abs(y).max()
