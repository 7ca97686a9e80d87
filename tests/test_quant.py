"""Int8 inference: exact integer products, per-channel scales, round-trip bounds, the meters'
int8 counts against the closed-form model, int8 checkpoints and their bad-input cases."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import minigpt
from minigpt import config as config_mod
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.nn import quant
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import init
from minigpt.train import checkpoint
from tests.conftest import run_cli

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


# ----------------------------------------------------------------------------- exact products


@pytest.mark.parametrize("K", [1, 7, 1000, 1041, 4096])
@pytest.mark.parametrize("pattern", ["all_plus", "alternating", "random_extremes"])
def test_int8_product_is_exact(K, pattern):
    """+-127 everywhere (the largest sums there are), against an exact int64 reference."""
    rng = np.random.default_rng(K)
    if pattern == "all_plus":
        a, b = np.full((3, K), 127, np.int8), np.full((K, 5), 127, np.int8)
    elif pattern == "alternating":
        signs = np.where(np.arange(K) % 2 == 0, 127, -127).astype(np.int8)
        a, b = np.tile(signs, (3, 1)), np.tile(signs[:, None], (1, 5))
    else:
        a = rng.choice(np.array([-127, 127], np.int8), size=(3, K))
        b = rng.choice(np.array([-127, 127], np.int8), size=(K, 5))
    exact = a.astype(np.int64) @ b.astype(np.int64)
    got = METER.matmul_int8(a, b)
    assert np.array_equal(got, exact.astype(np.float64))
    assert np.abs(exact).max() < 2**31  # the int32 accumulator a real kernel has suffices


def test_float32_accumulation_is_not_exact_beyond_about_1000():
    """Why the int8 product is emulated in float64: float32 holds integers only up to 2**24."""
    rng = np.random.default_rng(0)
    K = 4096
    a = np.full((8, K), 127, np.int8)  # large sums of one sign: past 2**24 after ~1,040 terms
    b = rng.integers(100, 128, (K, 8)).astype(np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    assert np.abs(exact).max() > 2**24
    assert not np.array_equal(np.matmul(a.astype(np.float32), b.astype(np.float32)).astype(np.int64), exact)
    assert np.array_equal(METER.matmul_int8(a, b), exact)
    assert 127 * 127 * 1041 > 2**24 > 127 * 127 * 1040  # past K = 1,040 such terms


# ----------------------------------------------------------------------------- scales


def test_per_channel_scales_are_absmax_over_127():
    w = np.array([[1.0, -2.0, 0.0], [-0.5, 1.0, 0.0]], np.float32)  # (K=2, M=3)
    q, scale = quant.quantize(w, axis=0)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    np.testing.assert_allclose(scale, [1.0 / 127, 2.0 / 127, 1.0])  # a zero column gets scale 1
    assert q[0, 0] == 127 and q[0, 1] == -127 and (q[:, 2] == 0).all()
    _, s_rows = quant.quantize(w, axis=1)  # per row, as for the token table
    np.testing.assert_allclose(s_rows, [2.0 / 127, 1.0 / 127])


@settings(max_examples=50, deadline=None)
@example(np.array([[1.9], [0.95]], np.float32), 0)  # a tie: 0.95 / scale rounds to 63.50001
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)),
              elements=st.floats(-1e4, 1e4, width=32)), st.sampled_from([0, 1]))
def test_round_trip_error_is_at_most_half_a_step(w, axis):
    q, scale = quant.quantize(w, axis=axis)
    s = scale[None, :] if axis == 0 else scale[:, None]
    err = np.abs(w.astype(np.float64) - q.astype(np.float64) * s)
    # scale / 2, plus the float32 rounding of w / scale (relative 2**-24 of at most 127 steps)
    assert (err <= s * (0.5 + 127 * 2.0**-24)).all()
    assert (np.abs(q) <= 127).all()


# ----------------------------------------------------------------------------- model and meters


def _model():
    cfg = config_mod.ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=64)
    return GPT(cfg, init(cfg, np.random.default_rng(0))), cfg


@pytest.mark.parametrize("mode, emb, kv_int8", itertools.product(quant.MODES, (False, True), (False, True)))
def test_int8_counts_equal_the_closed_form(mode, emb, kv_int8):
    model, cfg = _model()
    qcfg = quant.QuantConfig(mode, emb, kv_int8)
    model.quant = quant.quantize_model(model.params, cfg, qcfg)
    idx = np.random.default_rng(1).integers(0, 64, (2, 12))
    kv = KVCache(cfg, 2, int8=kv_int8)
    METER.reset()
    with METER.in_phase("prefill"):
        model.logits(idx[:, :5], kv, last_only=True)
    predicted = cost_model.predict_forward(cfg, 2, 5, "prefill", quant=qcfg)
    for position in range(5, 8):
        with METER.in_phase("decode"):
            model.logits(idx[:, position : position + 1], kv)
    for position in range(5, 8):
        for k, r in cost_model.predict_decode(cfg, 2, position, quant=qcfg).items():
            p = predicted.setdefault(k, type(r)())
            for f in FIELDS:
                setattr(p, f, getattr(p, f) + getattr(r, f))
    assert predicted.keys() == METER.records.keys()
    for k, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(METER.records[k], f) for f in FIELDS], k
    int8_records = [k for k in METER.records if k.dtype in ("int8", "w8a32")]
    assert int8_records, "the int8 products are recorded at their own width"


def test_int8_logits_stay_close_and_outliers_go_through_float():
    model, cfg = _model()
    idx = np.random.default_rng(2).integers(0, 64, (2, 12))
    ref = model.logits(idx)
    for mode in quant.MODES:
        model.quant = quant.quantize_model(model.params, cfg, quant.QuantConfig(mode))
        assert np.abs(model.logits(idx) - ref).max() < 0.05 * np.abs(ref).max()
    model.quant = quant.quantize_model(model.params, cfg, quant.QuantConfig("w8a8", outlier_threshold=0.5))
    METER.reset()
    model.logits(idx)
    assert any(".outliers" in k.scope and k.kind == "matmul" and k.dtype == "float32"
               for k in METER.records)


# ----------------------------------------------------------------------------- checkpoints and CLI


@pytest.fixture
def int8_run(trained_run, tmp_path):
    out = tmp_path / "int8"
    r = run_cli("-m", "minigpt", "quantize", trained_run, "-o", out, "--mode", "w8a8")
    assert r.returncode == 0, r.stderr
    return out


def test_quantize_writes_an_int8_checkpoint_that_generates(int8_run, trained_run):
    meta, arrays = checkpoint.load(int8_run)
    assert meta["format"] == checkpoint.INT8_FORMAT
    assert arrays["int8/transformer.h.0.mlp.c_fc.weight"].dtype == np.int8
    m = minigpt.load(int8_run)
    assert m.gpt.quant is not None and m.gpt.quant.qcfg.mode == "w8a8"
    r = run_cli("generate.py", int8_run, "--prompt", "The fox", "--max-new-tokens", "20", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("The fox"), r.stderr
    r2 = run_cli("generate.py", trained_run, "--int8", "w8a8", "--kv-int8", "--prompt", "The fox",
                 "--max-new-tokens", "20", "--temperature", "0")
    assert r2.returncode == 0 and r2.stdout.startswith("The fox"), r2.stderr


def test_eval_reports_int8_quality(trained_run):
    r = run_cli("-m", "minigpt", "eval", trained_run, "--int8", "w8a32", "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("val_loss", "perplexity", "delta_loss", "kl_divergence", "top1_agreement",
                "weight_bytes", "bytes_per_token"):
        assert key in out
    assert 0.5 <= out["top1_agreement"] <= 1.0 and out["kl_divergence"] >= 0
    assert abs(out["perplexity"] - np.exp(out["val_loss"])) < 1e-6 * out["perplexity"]


def _damage(path, edit):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    edit(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("edit, words", [
    (lambda a: a.__setitem__("int8/transformer.h.0.mlp.c_fc.weight",
                             a["int8/transformer.h.0.mlp.c_fc.weight"].astype(np.int16)), "dtype int16"),
    (lambda a: a.pop("scale/transformer.h.0.attn.c_attn.weight"), "missing 'scale/"),
    (lambda a: a.__setitem__("scale/transformer.wte.weight", a["scale/transformer.wte.weight"][:-1]), "shape"),
])
def test_bad_int8_checkpoints_are_refused_in_one_line(int8_run, edit, words):
    _damage(int8_run / "ckpt.npz", edit)
    r = run_cli("generate.py", int8_run, "--prompt", "x", "--max-new-tokens", "2")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr
