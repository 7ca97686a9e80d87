"""The projections' FLOPs (minigpt/scale/work.py) against two independent expectations: what the
meter counts when the model runs, and formulas written out here from the conventions in
docs/costs.md (a product (M, K) @ (K, N) is 2·M·N·K FLOPs; an elementwise pass its documented
FLOPs per element). work.py wraps the closed form: comparing the two compares it with itself.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.config import ModelConfig
from minigpt.counting.meter import METER
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.scale import work
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step


def hand_params(L, C, block, V) -> int:
    """wte V·C, wpe block·C; per block ln_1 and ln_2 (2C each), c_attn (3C² + 3C), attn.c_proj
    (C² + C), c_fc (4C² + 4C), mlp.c_proj (4C² + C): 12C² + 13C; ln_f 2C."""
    return V * C + block * C + L * (12 * C * C + 13 * C) + 2 * C


def hand_forward_flops(L, C, H, V, B, T, pos0=0, last_only=False, loss=False) -> int:
    """A forward of T new tokens of B sequences after pos0 cached positions."""
    N, Tk = B * T, pos0 + T  # new tokens; keys the last query sees
    head_rows = B if last_only else N
    return (2 * N * 12 * C * C * L  # c_attn 3C², attn.c_proj C², c_fc 4C², mlp.c_proj 4C²
            + 2 * 2 * B * T * Tk * C * L  # Q·Kᵀ and att·V, 2·B·H·T·Tk·hs each (H·hs = C)
            + 2 * head_rows * C * V  # the LM head
            + N * C  # embedding: wte[idx] + wpe, one add
            + 7 * N * C * (2 * L + 1)  # LayerNorm: ln_1, ln_2 per block and ln_f
            + 9 * N * C * L  # bias adds: 3C + C + 4C + C per token per block
            + 8 * 4 * N * C * L  # GELU on the 4C-wide hidden layer
            + 2 * N * C * L  # two residual adds per block
            + 7 * B * H * T * Tk * L  # causal softmax, per score (the full T x Tk block)
            + (5 * N * V if loss else 0))  # cross-entropy, per logit


def hand_training_step_flops(L, C, H, block, V, B, T) -> int:
    """The forward with its loss; the backward, each product twice (the input's gradient and the
    weight's; for attention grad_q, grad_k, grad_att, grad_v); clipping and AdamW on every
    parameter."""
    N = B * T
    products = 2 * N * 12 * C * C * L + 2 * 2 * B * T * T * C * L + 2 * N * C * V
    backward = (2 * products
                + N * V  # cross-entropy gradient, per logit
                + 2 * N * C  # embedding: the table's and the positions' gradients
                + 11 * N * C * (2 * L + 1)  # LayerNorm gradients
                + 9 * N * C * L  # bias gradients
                + 11 * 4 * N * C * L  # GELU gradient
                + 2 * N * C * L  # residual gradients
                + 5 * B * H * T * T * L)  # softmax gradient, per score
    optimizer = (2 + 1 + 14) * hand_params(L, C, block, V)  # clip norm, clip scale, AdamW
    return hand_forward_flops(L, C, H, V, B, T, loss=True) + backward + optimizer


def _flops(records) -> int:
    return sum(r.flops for r in records.values())


def _arch(cfg: ModelConfig) -> work.Arch:
    return work.Arch(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size)


configs = st.builds(
    lambda L, H, hs, block, V: ModelConfig(n_layer=L, n_head=H, n_embd=H * hs, block_size=block,
                                           vocab_size=V),
    st.integers(1, 4), st.integers(1, 4), st.integers(1, 8), st.integers(2, 24), st.integers(2, 60))


@settings(max_examples=60, deadline=None)
@given(cfg=configs, batch=st.integers(1, 3), data=st.data())
def test_projection_flops_equal_the_meter_and_the_hand_formula(cfg, batch, data):
    """A training step, a prefill and a decode step at a random position."""
    a = _arch(cfg)
    L, C, H, block, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size
    T = data.draw(st.integers(1, block), label="T")
    pos = data.draw(st.integers(0, block - 1), label="position")
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    idx = np.random.default_rng(1).integers(0, V, (batch, block))

    METER.reset()
    training_step(model, AdamW(model.params), [(idx[:, :T], idx[:, :T])], lr=1e-3)
    hand = hand_training_step_flops(L, C, H, block, V, batch, T)
    assert _flops(METER.records) == hand == work.training_step_flops(a, batch, T)

    METER.reset()
    with METER.in_phase("prefill"):
        model.logits(idx[:, :T], KVCache(cfg, batch), last_only=True)
    hand = hand_forward_flops(L, C, H, V, batch, T, last_only=True)
    assert _flops(METER.records) == hand == work.forward_flops(a, batch, T, last_only=True)

    kv = KVCache(cfg, batch)
    if pos:
        model.logits(idx[:, :pos], kv, last_only=True)
    METER.reset()
    with METER.in_phase("decode"):
        model.logits(idx[:, pos:pos + 1], kv)
    hand = hand_forward_flops(L, C, H, V, batch, 1, pos0=pos)
    assert _flops(METER.records) == hand == work.forward_flops(a, batch, 1, pos0=pos)

    assert model.params.data.size == hand_params(L, C, block, V)
    assert work.arch_params(a) == (hand_params(L, C, block, V),) * 2


def test_projection_flops_equal_the_hand_formula_at_gpt3_size():
    cfg = ModelConfig(n_layer=96, n_head=96, n_embd=12288, block_size=2048, vocab_size=50257)
    assert work.training_step_flops(_arch(cfg), 1, 2048) == hand_training_step_flops(
        96, 12288, 96, 2048, 50257, 1, 2048)
    assert work.arch_params(_arch(cfg)) == (hand_params(96, 12288, 2048, 50257),) * 2
    assert hand_params(96, 12288, 2048, 50257) == pytest.approx(175e9, rel=0.01)
