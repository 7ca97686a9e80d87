"""Hand-written backward passes against central finite differences, in float64.

For every forward/backward pair of minigpt.nn.layers (and the transformer block of
minigpt.nn.model) we take the scalar objective

    f = sum(out * dout)        (dout: a fixed random array shaped like out)

so that d f / d out = dout, run the pair's backward on dout, and compare the gradient it returns
(inputs) or adds into zero-initialised arrays (parameters) with

    (f(a + h e_i) - f(a - h e_i)) / (2 h)

for *every* element i of every input and parameter. Shapes are tiny (B=2, T=5, C=8, n_head=2).

Tolerance. With h = 1e-6 the truncation error of central differences is O(h^2) ~ 1e-12, so the
error is dominated by rounding: f is a sum of terms of magnitude ~ scale = sum(|out * dout|), each
evaluation is off by a few ulps of that (we allow 10), and dividing by 2h amplifies it, giving

    atol = 10 * eps64 * scale / h        (about 2e-9 * scale)

on top of rtol = 1e-6 for the larger elements.

Also checked: backward *adds* into parameter gradients (two backward calls give twice the
gradient), forwards leave their inputs untouched, and the whole GPT (GPT.loss + GPT.backward,
2 layers) agrees with finite differences on every parameter element.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from minigpt import backend
from minigpt.config import ModelConfig
from minigpt.nn import layers as nn
from minigpt.nn.model import GPT, block_backward, block_forward
from minigpt.nn.params import FlatBuffer, init

H = 1e-6  # finite-difference step
RTOL = 1e-6
ULPS = 10  # rounding budget of one objective evaluation, in units of eps64 * scale

B, T, C, N_HEAD, V = 2, 5, 8, 2, 7
DROPOUT_SEED = 7


# ----------------------------------------------------------------------------- the harness


@dataclass
class Case:
    """One layer pair, ready to differentiate.

    arrays:   every float64 array we differentiate with respect to (inputs and parameters),
              keyed by the names the layer looks them up by.
    params:   which of those are parameters: backward adds into zero arrays of these names.
    forward:  arrays -> (out, cache).
    backward: (dout, cache, grads) -> {input name: gradient}; adds into grads[param name].
    fixed:    integer inputs and other constants (not differentiated), for information only.
    """

    arrays: dict[str, np.ndarray]
    params: tuple[str, ...]
    forward: Callable
    backward: Callable
    fixed: dict = field(default_factory=dict)


def objective(out, dout) -> float:
    return float(np.sum(out * dout))


def copies(arrays: dict) -> dict:
    """Fresh copies, so a forward that (wrongly) writes into its inputs cannot skew the FD."""
    return {k: v.copy() for k, v in arrays.items()}


def analytic_grads(case: Case, dout) -> tuple[dict, float]:
    """{name: gradient} from one forward and one backward, and the scale sum(|out * dout|)."""
    out, cache = case.forward(copies(case.arrays))
    grads = {name: np.zeros_like(case.arrays[name]) for name in case.params}
    dins = case.backward(np.array(dout, copy=True), cache, grads)
    return {**dins, **grads}, float(np.sum(np.abs(out * dout)))


def numeric_grad(case: Case, name: str, dout) -> np.ndarray:
    """Central differences of objective(forward(arrays)) with respect to arrays[name]."""
    a = case.arrays[name]
    grad = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        orig = a[i]
        a[i] = orig + H
        f_plus = objective(case.forward(copies(case.arrays))[0], dout)
        a[i] = orig - H
        f_minus = objective(case.forward(copies(case.arrays))[0], dout)
        a[i] = orig
        grad[i] = (f_plus - f_minus) / (2 * H)
    return grad


def atol_for(scale: float) -> float:
    return ULPS * np.finfo(np.float64).eps * scale / H


# ----------------------------------------------------------------------------- the cases
# Each builder takes a seeded Generator and returns a Case. Weights are drawn with std ~0.3-1, far
# larger than GPT-2's 0.02, so softmaxes are peaked and GELUs are in their curved region.


def _linear_params(rng, prefix, c_in, c_out, std=0.5):
    return {
        prefix + "weight": rng.normal(0, std, (c_in, c_out)),  # (C_in, C_out)
        prefix + "bias": rng.normal(0, std, (c_out,)),
    }


def case_embedding(rng, pos0=0):
    block = T + 2
    idx = rng.integers(0, V, (B, T))
    idx[0, :2] = idx[1, -1] = 3  # repeated tokens: the scatter-add must accumulate
    arrays = {"wte": rng.normal(0, 1, (V, C)), "wpe": rng.normal(0, 1, (block, C))}

    def forward(a):
        return nn.embedding_forward(idx, a["wte"], a["wpe"], pos0)  # (B, T, C)

    def backward(dout, cache, g):
        nn.embedding_backward(dout, cache, g["wte"], g["wpe"])
        return {}

    return Case(arrays, ("wte", "wpe"), forward, backward, {"idx": idx, "pos0": pos0})


def case_layernorm(rng):
    arrays = {
        "x": rng.normal(0.5, 2.0, (B, T, C)),
        "w": rng.normal(1.0, 0.5, (C,)),
        "b": rng.normal(0.0, 0.5, (C,)),
    }

    def forward(a):
        return nn.layernorm_forward(a["x"], a["w"], a["b"])  # (B, T, C)

    def backward(dout, cache, g):
        return {"x": nn.layernorm_backward(dout, cache, g["w"], g["b"])}

    return Case(arrays, ("w", "b"), forward, backward)


def case_linear(rng):
    oc = 12
    arrays = {"x": rng.normal(0, 1, (B, T, C)), **_linear_params(rng, "", C, oc)}

    def forward(a):
        return nn.linear_forward(a["x"], a["weight"], a["bias"])  # (B, T, oc)

    def backward(dout, cache, g):
        return {"x": nn.linear_backward(dout, cache, g["weight"], g["bias"])}

    return Case(arrays, ("weight", "bias"), forward, backward)


ATTN_PARAMS = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias")


def case_attention(rng, dropout=0.0):
    arrays = {
        "x": rng.normal(0, 1, (B, T, C)),
        **_linear_params(rng, "attn.c_attn.", C, 3 * C),  # q, k, v side by side: (C, 3C)
        **_linear_params(rng, "attn.c_proj.", C, C),
    }

    def forward(a):
        rng_drop = np.random.default_rng(DROPOUT_SEED) if dropout else None  # the same mask each time
        return nn.attention_forward(a["x"], a, N_HEAD, dropout=dropout, rng=rng_drop)  # (B, T, C)

    def backward(dout, cache, g):
        return {"x": nn.attention_backward(dout, cache, arrays, g)}

    return Case(arrays, ATTN_PARAMS, forward, backward, {"dropout": dropout})


def case_gelu(rng):
    arrays = {"x": rng.normal(0, 2.0, (B, T, 4 * C))}

    def forward(a):
        return nn.gelu_forward(a["x"])

    def backward(dout, cache, g):
        return {"x": nn.gelu_backward(dout, cache)}

    return Case(arrays, (), forward, backward)


def case_causal_softmax(rng, pos0=0):
    tk = pos0 + T  # keys: the pos0 cached positions and these T
    scale = 0.7
    arrays = {"scores": rng.normal(0, 2.0, (B, N_HEAD, T, tk))}  # (B, H, T, Tk)

    def forward(a):
        att = nn.causal_softmax_forward(a["scores"], scale, pos0)  # in place on its argument
        return att, att

    def backward(dout, att, g):
        return {"scores": nn.causal_softmax_backward(dout, att, scale)}

    return Case(arrays, (), forward, backward, {"pos0": pos0})


def case_cross_entropy(rng):
    targets = rng.integers(0, V, (B, T))
    arrays = {"logits": rng.normal(0, 2.0, (B, T, V))}  # (B, T, V)

    def forward(a):
        return nn.cross_entropy_forward(a["logits"], targets)  # a scalar

    def backward(dloss, cache, g):
        return {"logits": nn.cross_entropy_backward(cache, float(dloss))}

    return Case(arrays, (), forward, backward, {"targets": targets})


def case_residual(rng):
    """out = x + linear(x): the stream's and the branch's gradients meet in residual_backward."""
    arrays = {"x": rng.normal(0, 1, (B, T, C)), **_linear_params(rng, "", C, C)}

    def forward(a):
        branch, cache = nn.linear_forward(a["x"], a["weight"], a["bias"])
        x = a["x"].copy()
        out = nn.residual_forward(a["x"], branch)
        assert out is branch and np.array_equal(a["x"], x)  # the sum lands in branch; x is kept
        return out, cache

    def backward(dout, cache, g):
        dbranch = nn.linear_backward(dout, cache, g["weight"], g["bias"])  # branch's dx
        return {"x": nn.residual_backward(dout, dbranch)}  # stream's dx (= dout) + branch's

    return Case(arrays, ("weight", "bias"), forward, backward)


def case_dropout(rng):
    p = 0.3
    arrays = {"x": rng.normal(0, 1, (B, T, C))}

    def forward(a):
        return nn.dropout_forward(a["x"], p, np.random.default_rng(DROPOUT_SEED))  # same mask

    def backward(dout, mask, g):
        dropped = np.mean(mask == 0)
        assert 0.1 < dropped < 0.5, f"mask drops {dropped:.0%}, expected about {p:.0%}"
        np.testing.assert_allclose(mask[mask != 0], 1 / (1 - p))
        return {"x": nn.dropout_backward(dout, mask)}

    return Case(arrays, (), forward, backward, {"p": p})


MLP_PARAMS = ("mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def case_mlp(rng):
    arrays = {
        "x": rng.normal(0, 1, (B, T, C)),
        **_linear_params(rng, "mlp.c_fc.", C, 4 * C),  # (C, 4C)
        **_linear_params(rng, "mlp.c_proj.", 4 * C, C, std=0.3),  # (4C, C)
    }

    def forward(a):
        return nn.mlp_forward(a["x"], a)  # (B, T, C)

    def backward(dout, cache, g):
        return {"x": nn.mlp_backward(dout, cache, arrays, g)}

    return Case(arrays, MLP_PARAMS, forward, backward)


def case_block(rng):
    """A whole pre-LN transformer block (minigpt.nn.model), dropout off."""
    cfg = ModelConfig(n_layer=1, n_head=N_HEAD, n_embd=C, block_size=T, vocab_size=V)
    ln = {
        f"{n}.{k}": rng.normal(mu, 0.3, (C,))
        for n in ("ln_1", "ln_2")
        for k, mu in (("weight", 1.0), ("bias", 0.0))
    }
    arrays = {
        "x": rng.normal(0, 1, (B, T, C)),
        **ln,
        **_linear_params(rng, "attn.c_attn.", C, 3 * C),
        **_linear_params(rng, "attn.c_proj.", C, C),
        **_linear_params(rng, "mlp.c_fc.", C, 4 * C),
        **_linear_params(rng, "mlp.c_proj.", 4 * C, C, std=0.3),
    }

    def forward(a):
        return block_forward(a["x"], a, cfg)  # (B, T, C)

    def backward(dout, cache, g):
        return {"x": block_backward(dout, cache, arrays, g)}

    params = tuple(k for k in arrays if k != "x")
    return Case(arrays, params, forward, backward)


CASES = {
    "embedding": case_embedding,
    "embedding_pos0": lambda rng: case_embedding(rng, pos0=2),
    "layernorm": case_layernorm,
    "linear": case_linear,
    "attention": case_attention,
    "attention_dropout": lambda rng: case_attention(rng, dropout=0.25),
    "gelu": case_gelu,
    "causal_softmax": case_causal_softmax,
    "causal_softmax_pos0": lambda rng: case_causal_softmax(rng, pos0=3),
    "cross_entropy": case_cross_entropy,
    "residual": case_residual,
    "dropout": case_dropout,
    "mlp": case_mlp,
    "block": case_block,
}
WITH_PARAMS = [name for name in CASES if CASES[name](np.random.default_rng(0)).params]


def make_case(name: str) -> tuple[Case, np.ndarray]:
    """The case and its fixed random dout (shaped like the output)."""
    rng = np.random.default_rng(sum(map(ord, name)))
    case = CASES[name](rng)
    out, _ = case.forward(copies(case.arrays))
    dout = rng.normal(0, 1, np.shape(out))
    return case, dout


# ----------------------------------------------------------------------------- layer tests


@pytest.mark.parametrize("name", list(CASES))
def test_layer_gradient_matches_finite_differences(name):
    case, dout = make_case(name)
    grads, scale = analytic_grads(case, dout)
    assert set(grads) == set(case.arrays), f"backward returned {sorted(grads)}"
    atol = atol_for(scale)
    for key, a in case.arrays.items():
        analytic = grads[key]
        assert analytic.shape == a.shape and analytic.dtype == np.float64, key
        numeric = numeric_grad(case, key, dout)
        assert np.abs(numeric).max() > 100 * atol, f"{key}: gradient too small to test"
        np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=atol,
                                   err_msg=f"{name}: d/d{key}")


@pytest.mark.parametrize("name", [n for n in CASES if n not in ("causal_softmax", "causal_softmax_pos0")])
def test_forward_and_backward_leave_inputs_untouched(name):
    """Layers may work in place on their temporaries, never on what they were given
    (causal_softmax_forward is documented to work in place on its scores and is left out)."""
    case, dout = make_case(name)
    before = copies(case.arrays)
    _, cache = case.forward(case.arrays)
    grads = {n: np.zeros_like(case.arrays[n]) for n in case.params}
    case.backward(np.array(dout, copy=True), cache, grads)
    for key, a in case.arrays.items():
        np.testing.assert_array_equal(a, before[key], err_msg=f"{name} wrote into {key}")


@pytest.mark.parametrize("name", list(CASES))
def test_row_blocks_give_what_one_block_gives(name, monkeypatch):
    """The CPU runs elementwise chains block by block of rows (backend.by_rows, map_rows); the
    cases here fit one block, so run them again with blocks of a row or two."""
    case, dout = make_case(name)
    outs = []
    for block_bytes in (backend.BLOCK_BYTES, 64):
        monkeypatch.setattr(backend, "BLOCK_BYTES", block_bytes)
        out, cache = case.forward(copies(case.arrays))
        grads = {n: np.zeros_like(case.arrays[n]) for n in case.params}
        grads.update(case.backward(np.array(dout, copy=True), cache, grads))  # and the inputs'
        outs.append((np.array(out, copy=True), grads))
    (out1, g1), (out2, g2) = outs
    np.testing.assert_allclose(out2, out1, rtol=1e-12, atol=1e-14)
    assert set(g2) == set(g1) == set(case.arrays)
    for key in g1:
        np.testing.assert_allclose(g2[key], g1[key], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize("name", WITH_PARAMS)
def test_backward_adds_into_parameter_gradients(name):
    """Two backward calls on one cache leave twice the gradient; a nonzero start is kept."""
    case, dout = make_case(name)
    _, cache = case.forward(copies(case.arrays))
    once = {n: np.zeros_like(case.arrays[n]) for n in case.params}
    case.backward(np.array(dout, copy=True), cache, once)
    twice = {n: np.zeros_like(case.arrays[n]) for n in case.params}
    case.backward(np.array(dout, copy=True), cache, twice)
    case.backward(np.array(dout, copy=True), cache, twice)
    start = {n: np.full_like(case.arrays[n], 0.5) for n in case.params}
    case.backward(np.array(dout, copy=True), cache, start)
    for n in case.params:
        np.testing.assert_allclose(twice[n], 2 * once[n], rtol=1e-12, atol=1e-14, err_msg=n)
        np.testing.assert_allclose(start[n], 0.5 + once[n], rtol=1e-12, atol=1e-14, err_msg=n)


# ----------------------------------------------------------------------------- whole model

MODEL_CFG = {"n_layer": 2, "n_head": 2, "n_embd": 8, "block_size": 6, "vocab_size": 11}


def _model(variant: str) -> tuple[GPT, np.ndarray, np.ndarray, object]:
    """A float64 GPT, a batch (B=2, T=6) and the dropout seed (None: dropout off)."""
    rng = np.random.default_rng(1234)
    dropout = 0.2 if variant == "dropout" else 0.0
    cfg = ModelConfig(**MODEL_CFG, dropout=dropout)
    params = init(cfg, rng, "float64")
    if variant != "init":
        # GPT-2's init (std 0.02, zero biases, unit LN weights) is nearly linear; spread every
        # parameter so that nonlinear and bias paths carry real gradient.
        params.data += rng.normal(0, 0.3, params.data.shape)
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    targets = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    return GPT(cfg, params), idx, targets, (DROPOUT_SEED if dropout else None)


def _loss(model, idx, targets, seed):
    drop_rng = np.random.default_rng(seed) if seed is not None else None
    return model.loss(idx, targets, drop_rng)


@pytest.mark.parametrize("variant", ["init", "perturbed", "dropout"])
def test_model_gradient_matches_finite_differences(variant):
    """GPT.loss + GPT.backward against central differences on every parameter element."""
    model, idx, targets, seed = _model(variant)
    model.grads = FlatBuffer(model.cfg, "float64")
    loss, cache = _loss(model, idx, targets, seed)
    model.backward(cache)
    analytic = model.grads.data.copy()

    p = model.params.data  # the model reads views into this buffer
    numeric = FlatBuffer(model.cfg, "float64")  # same layout, so numeric[name] is a named view
    for i in range(p.size):
        orig = p[i]
        p[i] = orig + H
        f_plus = _loss(model, idx, targets, seed)[0]
        p[i] = orig - H
        f_minus = _loss(model, idx, targets, seed)[0]
        p[i] = orig
        numeric.data[i] = (f_plus - f_minus) / (2 * H)

    # The loss is a mean of per-position log-sum-exps of magnitude ~log V; rounding as above.
    atol = atol_for(abs(loss))
    for name, _ in model.params.layout:
        np.testing.assert_allclose(model.grads[name], numeric[name], rtol=RTOL, atol=atol,
                                   err_msg=f"{variant}: {name}")
    assert np.abs(analytic).max() > 1e3 * atol


def test_model_backward_accumulates():
    """Two loss/backward rounds without zeroing (gradient accumulation) give twice the gradient."""
    model, idx, targets, _ = _model("perturbed")
    model.grads = FlatBuffer(model.cfg, "float64")
    model.backward(_loss(model, idx, targets, None)[1])
    once = model.grads.data.copy()
    model.backward(_loss(model, idx, targets, None)[1])
    np.testing.assert_allclose(model.grads.data, 2 * once, rtol=1e-12, atol=1e-15)
    half = FlatBuffer(model.cfg, "float64")
    model.grads = half
    model.backward(_loss(model, idx, targets, None)[1], dloss=0.5)  # dloss scales the gradient
    np.testing.assert_allclose(half.data, 0.5 * once, rtol=1e-12, atol=1e-15)
