"""The meter and the closed-form cost model.

- No matrix product in the package escapes the meter (a walk over the source, and a count of
  every product actually executed, made by wrapping the array module).
- The closed-form model predicts every record exactly, on random configurations, for both
  schedules: NumPy's passes and the fused kernels' (`fused=True`, kernels.use("numba")).
- Training matmul FLOPs are 3x the forward's and equal (6 N_matmul + 12 L T C) per token.
"""

import ast
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt import backend, kernels
from minigpt import config as config_mod
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minigpt"
MATMUL_NAMES = {"matmul", "dot", "einsum", "tensordot", "inner", "vdot"}
FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
PATHS = ["numpy", "numba"] if kernels.AVAILABLE else ["numpy"]


def _use(path: str) -> bool:
    """Run the model on this kernels path (conftest puts NumPy's back after the test); True for
    the fused schedule."""
    kernels.use(path)
    return path == "numba"


def _imports_meter_matmul(tree) -> bool:
    return any(isinstance(n, ast.ImportFrom) and n.module == "minigpt.counting.meter"
               and any(a.name == "matmul" and a.asname is None for a in n.names) for n in ast.walk(tree))


def _one_operand_einsums(tree) -> set:
    """The .einsum attributes of calls like xp.einsum("...i->...", a): one operand, so a sum
    over an axis (backend.row_sum), not a product."""
    return {id(n.func) for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "einsum"
            and len(n.args) == 2 and isinstance(n.args[0], ast.Constant)
            and isinstance(n.args[0].value, str) and "," not in n.args[0].value}


def _products(source: str) -> list[int]:
    """Lines of source that multiply matrices other than through the meter: `@`, any
    .matmul/.dot/.einsum/... attribute (bar a one-operand einsum, which only sums), or such a
    name unless it is the meter's own matmul."""
    tree = ast.parse(source)
    counted_name = _imports_meter_matmul(tree)
    reductions = _one_operand_einsums(tree)
    lines = []
    for node in ast.walk(tree):
        if id(node) in reductions:
            continue
        operator = isinstance(node, ast.BinOp | ast.AugAssign) and isinstance(node.op, ast.MatMult)
        attribute = isinstance(node, ast.Attribute) and node.attr in MATMUL_NAMES
        name = isinstance(node, ast.Name) and node.id in MATMUL_NAMES
        imported = isinstance(node, ast.alias) and node.name in MATMUL_NAMES
        meters = counted_name and getattr(node, "id", getattr(node, "name", None)) == "matmul"
        if operator or attribute or ((name or imported) and not meters):
            lines.append(node.lineno)
    return lines


def test_no_matrix_product_outside_the_meter():
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}"
                 for path in sorted(PACKAGE.rglob("*.py")) if path.name != "meter.py"
                 for line in _products(path.read_text())]
    assert offenders == [], "matrix products outside minigpt/counting/meter.py: " + ", ".join(offenders)


@pytest.mark.parametrize("source", [
    "c = a @ b", "c @= b", "c = np.matmul(a, b)", "c = a.dot(b)", "c = xp.einsum('ij,jk', a, b)",
    "from numpy import matmul\nc = matmul(a, b)", "from numpy import tensordot",
    "c = xp.einsum('ij,jk->ik', a, b)", "c = xp.einsum('ij', a, b)", "c = xp.einsum(s, a)",
])
def test_the_source_walk_catches_every_form(source):
    assert _products(source)


def test_the_source_walk_allows_the_meters_matmul_and_sums():
    assert _products("from minigpt.counting.meter import matmul\nc = matmul(a, b)") == []
    assert _products("s = xp.einsum('...i->...', a)") == []


class CountingNumpy:
    """numpy, except that matmul counts its calls and FLOPs (independently of the meter)."""

    def __init__(self):
        self.calls = 0
        self.flops = 0

    def __getattr__(self, name):
        return getattr(np, name)

    def matmul(self, a, b, **kwargs):
        out = np.matmul(a, b, **kwargs)
        m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
        self.calls += 1
        self.flops += 2 * (out.size // (m * n)) * m * n * k
        return out


def _model(cfg, seed=0, dtype="float32"):
    model = GPT(cfg, init(cfg, np.random.default_rng(seed), dtype))
    model.grads = FlatBuffer(cfg, dtype)
    return model


def _training_step(model, idx, targets, rng=None):
    training_step(model, AdamW(model.params), [(idx, targets)], lr=1e-3, rng=rng)


def _metered_matmuls():
    recs = [r for k, r in METER.records.items() if k.kind == "matmul"]
    return sum(r.calls for r in recs), sum(r.flops for r in recs)


def test_every_executed_matmul_is_recorded(monkeypatch):
    spy = CountingNumpy()
    monkeypatch.setattr(backend, "xp", spy)
    cfg = config_mod.ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=12, vocab_size=50, dropout=0.1)
    model = _model(cfg)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 50, (3, 12)), rng.integers(0, 50, (3, 12))
    METER.reset()
    _training_step(model, idx, targets, rng)
    kv = KVCache(cfg, 1)
    with METER.in_phase("prefill"):
        model.logits(idx[:1, :7], kv, last_only=True)
    with METER.in_phase("decode"):
        model.logits(idx[:1, 7:8], kv)
    assert spy.calls > 0
    assert _metered_matmuls() == (spy.calls, spy.flops)
    assert {k.phase for k in METER.records if k.kind == "matmul"} == {"forward", "backward", "prefill", "decode"}


def _assert_same(predicted: dict, measured: dict):
    assert predicted.keys() == measured.keys()
    for key, p in predicted.items():
        m = measured[key]
        assert [getattr(p, f) for f in FIELDS] == [getattr(m, f) for f in FIELDS], key


configs = st.builds(
    lambda L, H, hs, block, V, drop: config_mod.ModelConfig(
        n_layer=L, n_head=H, n_embd=H * hs, block_size=block, vocab_size=V, dropout=drop),
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 6), st.integers(2, 12),
    st.integers(2, 40), st.sampled_from([0.0, 0.1]),
)


def test_a_paused_meter_records_nothing_whichever_way_it_is_told():
    """matmul, op and add alike (add serves kernels that time themselves: nn/tiled.py,
    nn/lowbit.py, the batched attention of nn/decode.py)."""
    METER.reset()
    with METER.paused():
        METER.matmul(np.ones((2, 2)), np.ones((2, 2)))
        with METER.op(kind="bias", op="add") as c:
            c.count(elements=1, bytes_read=4, bytes_written=4, dtype=np.float32)
        METER.add(kind="matmul", op="x@w", dtype=np.float32, flops=8, bytes_read=4, bytes_written=4, seconds=0.0)
    assert METER.records == {}
    METER.add(kind="matmul", op="x@w", dtype=np.float32, flops=8, bytes_read=4, bytes_written=4, seconds=0.0)
    assert [r.flops for r in METER.records.values()] == [8]


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(cfg=configs, batch=st.integers(1, 3), data=st.data())
def test_prediction_equals_measurement_training(path, cfg, batch, data):
    fused = _use(path)
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, cfg.vocab_size, (batch, T)), rng.integers(0, cfg.vocab_size, (batch, T))
    METER.reset()
    _training_step(_model(cfg), idx, targets, rng if cfg.dropout > 0 else None)
    _assert_same(cost_model.predict_training_step(cfg, batch, T, fused=fused), METER.records)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=25, deadline=None)
@given(cfg=configs, batch=st.integers(1, 3), data=st.data())
def test_prediction_equals_measurement_prefill_and_decode(path, cfg, batch, data):
    fused = _use(path)
    P = data.draw(st.integers(1, cfg.block_size - 1), label="prompt")
    model = _model(cfg)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.block_size))
    kv = KVCache(cfg, batch)
    METER.reset()
    with METER.in_phase("prefill"):
        model.logits(idx[:, :P], kv, last_only=True)
    _assert_same(cost_model.predict_forward(cfg, batch, P, "prefill", fused=fused), METER.records)
    for position in range(P, cfg.block_size):
        METER.reset()
        with METER.in_phase("decode"):
            model.logits(idx[:, position : position + 1], kv)
        _assert_same(cost_model.predict_decode(cfg, batch, position, fused=fused), METER.records)


@pytest.mark.parametrize("path", PATHS)
def test_prediction_equals_measurement_float64(path):
    fused = _use(path)
    cfg = config_mod.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11)
    idx = np.random.default_rng(0).integers(0, 11, (2, 6))
    METER.reset()
    _training_step(_model(cfg, dtype="float64"), idx, idx)
    _assert_same(cost_model.predict_training_step(cfg, 2, 6, dtype="float64", fused=fused), METER.records)


def _matmul_flops(records, phases):
    return sum(r.flops for k, r in records.items() if k.kind == "matmul" and k.phase in phases)


def test_tiny_training_flops_are_three_forwards_and_6n_plus_12ltc():
    cfg = config_mod.load(pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.toml")
    m, B, T = cfg.model, cfg.train.batch_size, cfg.model.block_size
    idx = np.random.default_rng(0).integers(0, m.vocab_size, (B, T))
    METER.reset()
    _training_step(_model(m), idx, idx)
    measured = METER.records
    forward = _matmul_flops(measured, {"forward"})
    training = _matmul_flops(measured, {"forward", "backward", "optimizer"})
    assert training == 3 * forward
    n_matmul = 12 * m.n_layer * m.n_embd**2 + m.vocab_size * m.n_embd
    assert training == (6 * n_matmul + 12 * m.n_layer * T * m.n_embd) * B * T
    assert cost_model.predict_training_step(m, B, T).keys() == measured.keys()


def test_useful_flops_are_the_causal_half_plus_the_diagonal():
    cfg = config_mod.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=11)
    rec = cost_model.predict_forward(cfg, 1, 16)[("h0.attn.scores", "q@kT", "matmul", "forward", "float32")]
    assert rec.flops == 2 * 2 * 16 * 16 * 4
    assert rec.useful_flops == 2 * 2 * (16 * 17 // 2) * 4


@pytest.mark.parametrize("n_params_of", [cost_model.n_params])
def test_parameter_count_matches_the_layout(n_params_of):
    cfg = config_mod.ModelConfig(n_layer=3, n_head=2, n_embd=10, block_size=7, vocab_size=13)
    assert n_params_of(cfg) == FlatBuffer(cfg).size
