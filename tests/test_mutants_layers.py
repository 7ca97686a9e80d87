"""The layers where mutation testing (bench/mutation.py layers) found them unchecked: default
arguments, the block-of-rows paths, numerical range, the exactness of counts, and the hand-off to
the CUDA kernels.

Each expectation is worked independently here: float64 formulas written out (softmax with its
causal mask, LayerNorm, log-sum-exp), the sum formula for the products a causal mask keeps, and
for the CUDA hand-off, that the kernel gets exactly the arguments the layer was given.
"""

import math

import numpy as np
import pytest

from minigpt import backend
from minigpt.config import ModelConfig
from minigpt.counting.meter import METER
from minigpt.nn import cuda_kernels
from minigpt.nn import layers as nn
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import init

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


def softmax64(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_softmax64(scores, scale, pos0):
    """Query pos0 + i sees keys 0 .. pos0 + i: the rest get probability 0."""
    T, Tk = scores.shape[-2:]
    visible = np.arange(Tk)[None, :] <= np.arange(T)[:, None] + pos0
    z = np.where(visible, scale * np.asarray(scores, dtype=np.float64), -np.inf)
    return softmax64(z)


def layernorm64(x, w, b, eps):
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


# ----------------------------------------------------------------------------- defaults


def test_embedding_starts_at_position_zero_by_default():
    rng = np.random.default_rng(0)
    wte, wpe = rng.normal(size=(7, 4)), rng.normal(size=(5, 4))
    idx = np.array([[3, 0, 6]])
    out, _ = nn.embedding_forward(idx, wte, wpe)
    np.testing.assert_array_equal(out[0], wte[[3, 0, 6]] + wpe[:3])


def test_layernorm_uses_the_eps_it_is_given():
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(2, 3, 6)), rng.normal(size=6), rng.normal(size=6)
    out, _ = nn.layernorm_forward(x, w, b, eps=0.5)  # eps as large as the variance: it shows
    np.testing.assert_allclose(out, layernorm64(x, w, b, 0.5), rtol=1e-12, atol=1e-12)


def test_causal_softmax_starts_at_position_zero_by_default():
    """Two queries, two keys, no cache: the first query sees only the first key."""
    scores = np.array([[[[0.3, -1.2], [0.5, 2.0]]]])
    att = nn.causal_softmax_forward(scores.copy(), 1.0)
    np.testing.assert_allclose(att[0, 0], [[1.0, 0.0], softmax64([0.5, 2.0])], rtol=1e-12)


@pytest.mark.parametrize(("pos0", "T"), [(0, 2), (3, 2), (0, 3), (4, 1)])
def test_causal_softmax_masks_every_key_a_query_cannot_see(pos0, T):
    """The mask is skipped only when every query sees every key (a single query at the end)."""
    scores = np.random.default_rng(2).normal(0, 2, (2, 3, T, pos0 + T))
    att = nn.causal_softmax_forward(scores.copy(), 0.7, pos0)
    np.testing.assert_allclose(att, causal_softmax64(scores, 0.7, pos0), rtol=1e-12, atol=1e-15)


def _attention_params(rng, C):
    return {"attn.c_attn.weight": rng.normal(0, 0.5, (C, 3 * C)), "attn.c_attn.bias": rng.normal(0, 0.5, 3 * C),
            "attn.c_proj.weight": rng.normal(0, 0.5, (C, C)), "attn.c_proj.bias": rng.normal(0, 0.5, C)}


def test_attention_has_no_dropout_by_default():
    """Called with neither dropout nor an rng, attention is the plain causal formula."""
    rng = np.random.default_rng(3)
    B, T, C, H = 2, 4, 6, 2
    hs = C // H
    x, p = rng.normal(size=(B, T, C)), _attention_params(rng, C)
    out, _ = nn.attention_forward(x, p, H)
    qkv = x @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]  # float64 reference
    q, k, v = (qkv[..., i * C : (i + 1) * C].reshape(B, T, H, hs).transpose(0, 2, 1, 3) for i in range(3))
    att = causal_softmax64(q @ k.transpose(0, 1, 3, 2), 1 / math.sqrt(hs), 0)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    np.testing.assert_allclose(out, y @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"], rtol=1e-10)


def test_cross_entropy_backward_is_for_the_mean_loss_by_default():
    """Uniform logits over V tokens: d(mean loss)/d(logits) = (1/V - onehot(target)) / N."""
    V, targets = 4, np.array([[1, 3, 0]])
    _, cache = nn.cross_entropy_forward(np.zeros((1, 3, V)), targets)
    expected = np.full((1, 3, V), 1 / V)
    expected[0, [0, 1, 2], [1, 3, 0]] -= 1.0
    np.testing.assert_allclose(nn.cross_entropy_backward(cache), expected / 3, rtol=1e-12)


# ----------------------------------------------------------------------------- numerical range


def test_softmax_of_large_scores_does_not_overflow():
    """float32 exp overflows past 88: the softmax must shift by the row's maximum first."""
    scores = (200.0 + np.random.default_rng(4).normal(0, 3, (1, 2, 3, 3))).astype(np.float32)
    att = nn.causal_softmax_forward(scores.copy(), 1.0)
    np.testing.assert_allclose(att, causal_softmax64(scores, 1.0, 0), rtol=1e-5, atol=1e-7)


def test_cross_entropy_shifts_each_row_by_its_own_maximum():
    """Rows hundreds apart in float32: a shared shift underflows the low row's exp to 0, and a
    shift the wrong way overflows the high row's; log-sum-exp per row in float64 is the reference."""
    logits = np.array([[[300.0, 301.0, 299.0], [-400.0, -401.0, -399.5]]], dtype=np.float32)
    targets = np.array([[1, 2]])
    loss, _ = nn.cross_entropy_forward(logits.copy(), targets)
    z = logits.astype(np.float64)[0]
    m = z.max(axis=-1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=-1))
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, (lse - z[[0, 1], [1, 2]]).mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- blocks of rows


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so inputs this small go through backend.by_rows and map_rows."""
    monkeypatch.setattr(backend, "BLOCK_BYTES", 64)


def test_layernorm_in_blocks_of_rows_is_layernorm(small_blocks):
    rng = np.random.default_rng(5)
    x, w, b = rng.normal(size=(3, 8, 32)), rng.normal(size=32), rng.normal(size=32)  # rows of 256 bytes
    out, cache = nn.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, layernorm64(x, w, b, nn.LAYERNORM_EPS), rtol=1e-10, atol=1e-12)
    dout = rng.normal(size=x.shape)
    dw, db = np.zeros(32), np.zeros(32)
    dx = nn.layernorm_backward(dout.copy(), cache, dw, db)
    # d/dx of a LayerNorm, written out: rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w
    xhat = (out - b) / w
    g = dout * w
    rstd = 1 / np.sqrt(x.var(axis=-1, keepdims=True) + nn.LAYERNORM_EPS)
    expected = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    np.testing.assert_allclose(dx, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(dw, (dout * xhat).sum(axis=(0, 1)), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(db, dout.sum(axis=(0, 1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 4, 9, 9), (3, 4, 2, 2)])  # rows of 648 and 32 bytes
def test_causal_softmax_in_blocks_of_rows_is_the_softmax_and_its_gradient(small_blocks, shape):
    rng = np.random.default_rng(6)
    scores, datt, scale = rng.normal(0, 2, shape), rng.normal(size=shape), 0.6
    att = nn.causal_softmax_forward(scores.copy(), scale)
    expected = causal_softmax64(scores, scale, 0)
    np.testing.assert_allclose(att, expected, rtol=1e-12, atol=1e-15)
    ds = nn.causal_softmax_backward(datt.copy(), att, scale)
    # d/dscores of softmax(scale * scores): scale * p * (d - sum(d * p)) per row
    want = scale * expected * (datt - (datt * expected).sum(axis=-1, keepdims=True))
    np.testing.assert_allclose(ds, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- counts


def test_useful_causal_flops_are_exact_integers_past_float_precision():
    """Query i of T sees i + 1 keys: sum = T (T + 1) / 2 visible pairs, 2 FLOPs each per head
    dimension. At T = 2^30 + 1 that sum needs 60 bits: a float would round it."""
    T = 2**30 + 1
    got = nn.useful_causal_flops(1, 1, T, 0, 1)
    assert type(got) is int
    assert got == T * (T + 1)
    assert nn.useful_causal_flops(2, 3, 4, 5, 6) == 2 * 2 * 3 * (4 * 5 + 4 * 5 // 2) * 6


def test_int8_kv_attention_counts_integers_in_the_models_dtype():
    """With an int8 KV cache the products still count whole FLOPs and bytes, and what the cache
    hands back is rescaled into the model's float32, not a wider type."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=16)
    model = GPT(cfg, init(cfg, np.random.default_rng(7)))
    idx = np.random.default_rng(8).integers(0, 16, (1, 5))
    kv = KVCache(cfg, 1, int8=True)
    METER.reset()
    with METER.in_phase("prefill"):
        logits = model.logits(idx[:, :4], kv)
    with METER.in_phase("decode"):
        model.logits(idx[:, 4:], kv)
    assert logits.dtype == np.float32
    assert {k.dtype for k in METER.records} <= {"float32", "int8", "w8a32"}
    for key, r in METER.records.items():
        assert all(type(getattr(r, f)) is int for f in FIELDS), key
    assert any(k.dtype == "w8a32" for k in METER.records)


# ----------------------------------------------------------------------------- CUDA hand-off


@pytest.mark.parametrize(("layer", "args"), [
    ("gelu_forward", ("x",)),
    ("gelu_backward", ("dout", "cache")),
    ("causal_softmax_forward", ("scores", "scale", "pos0")),
    ("causal_softmax_backward", ("datt", "att", "scale")),
])
def test_on_a_gpu_each_layer_hands_its_arguments_to_its_kernel(monkeypatch, layer, args):
    """The CUDA kernels compute the same functions (tests/test_backends.py on a GPU); here, on any
    machine, the layer must give its kernel exactly its own arguments and return its result."""
    seen = []

    def kernel(*a):
        seen.append(a)
        return "the kernel's result"

    monkeypatch.setattr(cuda_kernels, "active", lambda: True)
    monkeypatch.setattr(cuda_kernels, layer, kernel)
    given = tuple(object() for _ in args)
    assert getattr(nn, layer)(*given) == "the kernel's result"
    assert seen == [given]



def test_gelu_gradient_covers_every_row():
    """More rows than the hidden width (N = 48 > 4C = 8): each row's gradient is the derivative
    of 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi), written out in float64."""
    x = np.random.default_rng(10).normal(0, 1.5, (3, 16, 8))
    dout = np.random.default_rng(11).normal(size=x.shape)
    _, cache = nn.gelu_forward(x)
    dx = nn.gelu_backward(dout.copy(), cache)
    k = math.sqrt(2 / math.pi)
    th = np.tanh(k * (x + 0.044715 * x**3))
    want = dout * (0.5 * (1 + th) + 0.5 * x * (1 - th**2) * k * (1 + 3 * 0.044715 * x**2))
    np.testing.assert_allclose(dx, want, rtol=1e-10, atol=1e-12)
