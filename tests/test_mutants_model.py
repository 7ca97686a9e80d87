"""The model where mutation testing (bench/mutation.py model) found it unchecked: the gradient
buffer a first backward makes for itself, and the default weight of a MoE block's auxiliary loss.

The references: the gradient of a model whose buffer the test made (test_gradients checks that
one against finite differences), and block_backward with its documented weight written out.
"""

import numpy as np
import pytest

from minigpt.config import ModelConfig
from minigpt.nn.model import GPT, block_backward, block_forward
from minigpt.nn.params import FlatBuffer, init

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_first_backward_makes_gradients_shaped_and_typed_as_the_parameters(dtype):
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    fresh = GPT(CFG, init(CFG, np.random.default_rng(1), dtype))
    prepared = GPT(CFG, init(CFG, np.random.default_rng(1), dtype))
    prepared.grads = FlatBuffer(CFG, dtype)
    assert fresh.grads is None
    for model in (fresh, prepared):
        _, cache = model.loss(idx, targets)
        model.backward(cache)
    g = fresh.grads
    assert isinstance(g, FlatBuffer) and g.data.dtype == np.dtype(dtype)
    assert g.data.shape == fresh.params.data.shape
    np.testing.assert_array_equal(g.data, prepared.grads.data)
    assert np.any(g.data != 0)


def test_a_moe_blocks_aux_loss_has_weight_one_by_default():
    """daux weighs the load-balancing loss in the objective; without it the objective is the
    block's output plus the aux loss, unweighted: the same gradients as daux = 1, not as 2."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11, n_experts=3,
                      experts_per_token=2, aux_loss_coef=0.5)
    params = init(cfg, np.random.default_rng(2), "float64")
    p = params.block(0)
    rng = np.random.default_rng(3)
    x, dout = rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 6, 8))
    grads = {}
    for daux in (None, 1.0, 2.0):
        _, cache = block_forward(x.copy(), p, cfg)
        g = FlatBuffer(cfg, "float64")
        args = () if daux is None else (daux,)
        dx = block_backward(dout.copy(), cache, p, g.block(0), *args)
        grads[daux] = (dx, g.data.copy())
    for default, one in zip(grads[None], grads[1.0], strict=True):
        np.testing.assert_array_equal(default, one)
    assert not np.allclose(grads[None][1], grads[2.0][1])  # the weight shows in the router's gradient
