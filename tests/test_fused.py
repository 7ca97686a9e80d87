"""The fused kernels (minigpt/kernels/fused.py), through the layers that call them.

- Every layer pair of tests/test_gradients.py, run on the fused path, against central finite
  differences in float64, and the pairs that exist only there (the residual add inside ln_2,
  bias + GELU, a LayerNorm's backward added into the stream's gradient).
- The fused path against NumPy's (the reference), in float64 and float32: outputs, input and
  parameter gradients; a whole AdamW training run gives the same losses to rounding.
- The fused schedule's records: the closed form predicts them exactly where the shapes are
  unusual (mixture of experts, int8 inference), and they move fewer bytes than NumPy's.
"""

import numpy as np
import pytest
from test_gradients import (
    CASES,
    RTOL,
    Case,
    analytic_grads,
    atol_for,
    copies,
    make_case,
    numeric_grad,
)

from minigpt import kernels
from minigpt.config import ModelConfig
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn import layers as nn
from minigpt.nn import quant
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")

B, T, C = 2, 5, 8
FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


@pytest.fixture
def numba_path():
    kernels.use("numba")  # conftest puts NumPy's path back after the test
    assert nn.fused()


def case_residual_layernorm(rng):
    """ln(x + a), the sum written over a and kept as the stream; the stream's gradient is the
    incoming one plus the LayerNorm's (added into it in the same pass)."""
    arrays = {"x": rng.normal(0.5, 2.0, (B, T, C)), "a": rng.normal(0, 1.0, (B, T, C)),
              "w": rng.normal(1.0, 0.5, (C,)), "b": rng.normal(0.0, 0.5, (C,))}
    dstream = rng.normal(0, 1, (B, T, C))  # the gradient reaching the stream from above

    def forward(a):
        stream, out, cache = nn.residual_layernorm_forward(a["x"], a["a"], a["w"], a["b"])
        return out + stream * dstream, cache  # both outputs in the objective

    def backward(dout, cache, g):
        # d/d(stream) of the objective: dout * dstream, then the LayerNorm's dx added into it.
        dx = nn.layernorm_backward(dout.copy(), cache, g["w"], g["b"], into=dout * dstream)
        return {"x": dx, "a": dx.copy()}

    return Case(arrays, ("w", "b"), forward, backward)


def case_bias_gelu(rng):
    arrays = {"h": rng.normal(0, 2.0, (B * T, 4 * C)), "b": rng.normal(0, 1.0, (4 * C,))}

    def forward(a):
        return nn.bias_gelu_forward(a["h"], a["b"])

    def backward(dout, cache, g):
        return {"h": nn.bias_gelu_backward(dout, cache, g["b"])}

    return Case(arrays, ("b",), forward, backward)


FUSED_ONLY = {"residual_layernorm": case_residual_layernorm, "bias_gelu": case_bias_gelu}


def _check_fd(case, dout, name):
    grads, scale = analytic_grads(case, dout)
    assert set(grads) == set(case.arrays)
    atol = atol_for(scale)
    for key in case.arrays:
        numeric = numeric_grad(case, key, dout)
        assert np.abs(numeric).max() > 100 * atol, f"{key}: gradient too small to test"
        np.testing.assert_allclose(grads[key], numeric, rtol=RTOL, atol=atol, err_msg=f"{name}: d/d{key}")


@pytest.mark.parametrize("name", list(CASES))
def test_every_layer_on_the_fused_path_matches_finite_differences(name, numba_path):
    case, dout = make_case(name)
    _check_fd(case, dout, name)


@pytest.mark.parametrize("name", list(FUSED_ONLY))
def test_fused_only_pairs_match_finite_differences(name, numba_path):
    rng = np.random.default_rng(sum(map(ord, name)))
    case = FUSED_ONLY[name](rng)
    out, _ = case.forward(copies(case.arrays))
    _check_fd(case, rng.normal(0, 1, np.shape(out)), name)


def _run(case: Case, dout, dtype) -> tuple:
    arrays = {k: v.astype(dtype) for k, v in case.arrays.items()}
    out, cache = case.forward(arrays)
    out = np.array(out, copy=True)
    grads = {n: np.zeros_like(arrays[n]) for n in case.params}
    grads.update(case.backward(np.array(dout, dtype=dtype), cache, grads))
    return out, grads


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_path_equals_numpy_path(name, dtype):
    case, dout = make_case(name)
    kernels.use("numpy")
    ref_out, ref_grads = _run(case, dout, dtype)
    kernels.use("numba")
    out, grads = _run(case, dout, dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (2e-4, 2e-5)
    assert out.dtype == ref_out.dtype
    np.testing.assert_allclose(out, ref_out, rtol=rtol, atol=atol)
    assert set(grads) == set(ref_grads)
    for key in grads:
        assert grads[key].dtype == ref_grads[key].dtype, key
        np.testing.assert_allclose(grads[key], ref_grads[key], rtol=rtol, atol=atol, err_msg=key)


def test_residual_layernorm_equals_residual_then_layernorm(numba_path):
    rng = np.random.default_rng(3)
    x, a = rng.normal(0, 1, (B, T, C)), rng.normal(0, 1, (B, T, C))
    w, b = rng.normal(1, 0.3, C), rng.normal(0, 0.3, C)
    stream, out, _ = nn.residual_layernorm_forward(x, a.copy(), w, b)
    kernels.use("numpy")
    s = x + a
    ref, _ = nn.layernorm_forward(s, w, b)
    np.testing.assert_allclose(stream, s, rtol=1e-14)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def _train(path: str, steps: int, cfg, dtype="float32") -> list[float]:
    kernels.use(path)
    model = GPT(cfg, init(cfg, np.random.default_rng(0), dtype))
    model.grads = FlatBuffer(cfg, dtype)
    opt = AdamW(model.params)
    x, y = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 3, cfg.block_size))
    losses = []
    for _ in range(steps):  # one batch, learned by heart: the loss falls fast
        drop = np.random.default_rng(2) if cfg.dropout else None
        losses.append(training_step(model, opt, [(x, y)], lr=3e-3, rng=drop))
    return losses


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_losses_equal_numpy_path_to_rounding(dropout):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=dropout)
    ref, got = _train("numpy", 12, cfg), _train("numba", 12, cfg)
    assert ref[-1] < ref[0] - 0.05  # it learned: a run the comparison means something on
    np.testing.assert_allclose(got, ref, rtol=2e-5)


def _same(predicted: dict, measured: dict):
    assert predicted.keys() == measured.keys()
    for key, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(measured[key], f) for f in FIELDS], key


def test_fused_records_of_a_mixture_of_experts_step(numba_path):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=11, n_experts=3,
                      experts_per_token=2)
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    idx = np.random.default_rng(1).integers(0, 11, (2, 6))
    METER.reset()
    training_step(model, AdamW(model.params), [(idx, idx)], lr=1e-3)
    routing = [{i: r.computed for i, r in model.routing.items()}]
    _same(closed_form.predict_training_step(cfg, 2, 6, routing=routing, fused=True), METER.records)


@pytest.mark.parametrize("kv_int8", [False, True])
def test_fused_records_of_int8_prefill_and_decode(kv_int8, numba_path):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=11)
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    q = quant.QuantConfig(kv_int8=kv_int8)
    model.quant = quant.quantize_model(model.params, cfg, q)
    idx = np.random.default_rng(1).integers(0, 11, (1, 8))
    kv = KVCache(cfg, 1, int8=kv_int8)
    METER.reset()
    with METER.in_phase("prefill"):
        model.logits(idx[:, :5], kv, last_only=True)
    _same(closed_form.predict_forward(cfg, 1, 5, "prefill", quant=q, fused=True), METER.records)
    METER.reset()
    with METER.in_phase("decode"):
        model.logits(idx[:, 5:6], kv)
    _same(closed_form.predict_decode(cfg, 1, 5, quant=q, fused=True), METER.records)


def test_the_fused_schedule_moves_fewer_bytes_in_every_phase_it_changes():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)

    def moved(records, phase):
        return sum(r.bytes_read + r.bytes_written for k, r in records.items() if k.phase == phase)

    numpy_step = closed_form.predict_training_step(cfg, 3, 8)
    fused_step = closed_form.predict_training_step(cfg, 3, 8, fused=True)
    for phase in ("forward", "backward"):
        assert moved(fused_step, phase) < moved(numpy_step, phase), phase
    assert moved(fused_step, "optimizer") == moved(numpy_step, "optimizer")


def test_fusion_compare_reports_both_schedules_and_leaves_the_run_alone(tmp_path, numba_path):
    from minigpt.report import html
    from minigpt.train import fusion

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    model.grads.data[:] = 0.25
    params = model.params.data.copy()
    x = np.random.default_rng(1).integers(0, 20, (3, 8))
    METER.reset()
    METER.records = before = {"kept": "as it was"}
    doc = fusion.compare(model, x, x, steps=5, grad_accum=2, dtype="float32", repeats=1)
    assert METER.records is before and kernels.active() == "numba"
    assert np.all(model.grads.data == 0.25) and np.array_equal(model.params.data, params)
    moved = {f: sum(r.bytes_read + r.bytes_written
                    for r in closed_form.predict_training_step(cfg, 3, 8, 2, fused=f).values())
             for f in (False, True)}
    assert (doc["bytes_per_step_numpy"], doc["bytes_per_step_fused"]) == (moved[False], moved[True])
    assert doc["bytes_saved"] == 5 * (moved[False] - moved[True]) > 0
    assert doc["micro_batches"] == 10 and doc["elementwise_s_per_micro_batch_fused"] > 0
    assert "less" in fusion.lines(doc)[0]
    assert html._fusion_section(tmp_path).startswith('<p class="missing">')
    fusion.save(tmp_path, doc)
    section = html._fusion_section(tmp_path)
    assert "fused kernels" in section and "NumPy" in section
    kernels.use("numpy")
    assert fusion.compare(model, x, x, 5, 2, "float32") is None  # nothing to say on NumPy's path


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_adamw_in_one_pass_equals_numpy_passes(dtype):
    """Five steps from the same state: parameters and both moments agree, and the decay reaches
    the matrices only (the fused loop's n_decay boundary)."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    rng = np.random.default_rng(5)
    grads = [rng.normal(0, 1, FlatBuffer(cfg).size).astype(dtype) for _ in range(5)]
    out = {}
    for path in ("numpy", "numba"):
        kernels.use(path)
        params = init(cfg, np.random.default_rng(0), dtype)
        params.data += 0.5  # decay shows on every element (biases and LN weights stay undecayed)
        opt = AdamW(params, weight_decay=0.3)
        for i, g in enumerate(grads):
            opt.step(g.copy(), lr=1e-2 * (i + 1))
        out[path] = (params.data, opt.m, opt.v)
    rtol = 1e-12 if dtype == "float64" else 1e-5
    for ref, got in zip(out["numpy"], out["numba"]):
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * 1e-2)
    kernels.use("numba")
    params = init(cfg, np.random.default_rng(0), dtype)
    params.data[:] = 1.0
    AdamW(params, weight_decay=0.5).step(np.zeros_like(params.data), lr=0.1)
    n = params.n_decay
    np.testing.assert_allclose(params.data[:n], 0.95, rtol=1e-6)  # decayed, no gradient
    np.testing.assert_array_equal(params.data[n:], 1.0)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_packed_weights_prefill_and_decode_under_the_fused_schedule(bits, numba_path):
    """A packed model's prompt (many tokens: block_forward's MLP, which the fused schedule would
    otherwise take through a float product) runs its own products, NumPy's passes around them,
    and counts what the closed form predicts; its logits equal NumPy's path's."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=40)
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    q = quant.QuantConfig(bits=bits, group_size=16)
    model.quant = quant.quantize_model(model.params, cfg, q)
    idx = np.random.default_rng(1).integers(0, 40, (1, 8))
    kv = KVCache(cfg, 1)
    METER.reset()
    with METER.in_phase("prefill"):
        fused_logits = model.logits(idx[:, :5], kv, last_only=True)
    _same(closed_form.predict_forward(cfg, 1, 5, "prefill", quant=q, fused=True), METER.records)
    METER.reset()
    with METER.in_phase("decode"):
        model.logits(idx[:, 5:6], kv)
    _same(closed_form.predict_decode(cfg, 1, 5, quant=q, fused=True), METER.records)
    kernels.use("numpy")
    reference = model.logits(idx[:, :5], KVCache(cfg, 1), last_only=True)
    np.testing.assert_allclose(fused_logits, reference, rtol=1e-4, atol=1e-5)
