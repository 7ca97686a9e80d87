"""Mixture of experts (minigpt/nn/moe.py): its backward, its equality with the dense MLP at one
expert, and its counts.

1. The MoE pair against central finite differences in float64 (tests/test_gradients.py's
   harness), with the load-balancing loss in the objective: the case's output is the layer's
   output with the auxiliary loss appended, so f = sum(out * dout) + aux * daux differentiates both.
   Dropless, top-1 and a capacity limit that drops assignments; and PyTorch autograd, where installed.
2. n_experts = 1 is the dense model: the config's dense layout; and moe.py's pair run with a single
   expert gives the dense MLP's output and gradients bit for bit, also inside a whole GPT.
3. Measured = predicted: the closed form, given the routing the model chose, equals the meter's
   records key by key for training steps, prefill and decode, on random small MoE configs.
"""

import json

import numpy as np
import pytest
from conftest import TINY, TINY_TOML, merge, run_cli, set_args, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gradients import RTOL, Case, analytic_grads, atol_for, copies, numeric_grad

from minigpt import api, config
from minigpt.config import ModelConfig
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError
from minigpt.nn import layers as nn
from minigpt.nn import moe, params, quant
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.scale import work
from minigpt.train import checkpoint
from minigpt.train.optim import AdamW
from minigpt.train.trainer import Trainer, accumulate, update

B, T, C = 2, 5, 8
FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


# ----------------------------------------------------------------------------- 1. gradients


def _moe_arrays(rng, E, router_std=1.0):
    arrays = {"x": rng.normal(0, 1, (B, T, C)), "mlp.router.weight": rng.normal(0, router_std, (C, E))}
    for e in range(E):
        x = f"mlp.experts.{e}."
        arrays |= {x + "c_fc.weight": rng.normal(0, 0.5, (C, 4 * C)), x + "c_fc.bias": rng.normal(0, 0.5, 4 * C),
                   x + "c_proj.weight": rng.normal(0, 0.3, (4 * C, C)), x + "c_proj.bias": rng.normal(0, 0.5, C)}
    return arrays


def case_moe(rng, E, k, capacity_factor=0.0, coef=0.5):
    cfg = ModelConfig(n_embd=C, n_experts=E, experts_per_token=k, capacity_factor=capacity_factor,
                      aux_loss_coef=coef)
    arrays = _moe_arrays(rng, E)

    def forward(a):
        out, cache = moe.moe_forward(a["x"], a, cfg)  # (B, T, C)
        return np.append(out.ravel(), cache.routing.aux_loss), cache  # (B*T*C + 1,)

    def backward(dout, cache, g):
        d = dout[:-1].reshape(B, T, C)
        return {"x": moe.moe_backward(d, cache, arrays, g, daux=float(dout[-1]))}

    return Case(arrays, tuple(k for k in arrays if k != "x"), forward, backward, {"cfg": cfg})


CASES = {
    "top2_of_3": lambda rng: case_moe(rng, 3, 2),
    "top1_of_3": lambda rng: case_moe(rng, 3, 1),
    "top2_of_4_capacity": lambda rng: case_moe(rng, 4, 2, capacity_factor=0.5),
}


def make_case(name):
    rng = np.random.default_rng(sum(map(ord, name)))
    case = CASES[name](rng)
    out, cache = case.forward(copies(case.arrays))
    return case, rng.normal(0, 1, out.shape), cache


@pytest.mark.parametrize("name", list(CASES))
def test_moe_gradient_matches_finite_differences(name):
    case, dout, cache = make_case(name)
    if "capacity" in name:
        assert cache.routing.dropped > 0  # the limit really drops assignments here
    grads, scale = analytic_grads(case, dout)
    atol = atol_for(scale)
    for key in case.arrays:
        numeric = numeric_grad(case, key, dout)
        assert np.abs(numeric).max() > 100 * atol, f"{key}: gradient too small to test"
        np.testing.assert_allclose(grads[key], numeric, rtol=RTOL, atol=atol, err_msg=f"{name}: d/d{key}")


def test_the_aux_loss_alone_trains_a_top1_router():
    """With k = 1 the renormalised gate is 1, so the router's gradient is the aux loss's alone."""
    case, dout, _ = make_case("top1_of_3")
    dout[:-1] = 0.0  # only the aux loss in the objective
    grads, _ = analytic_grads(case, dout)
    assert np.abs(grads["mlp.router.weight"]).max() > 0
    dout[-1] = 0.0
    assert np.abs(analytic_grads(case, dout)[0]["mlp.router.weight"]).max() == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_moe_backward_adds_and_leaves_inputs_untouched(name):
    case, dout, _ = make_case(name)
    before = copies(case.arrays)
    _, cache = case.forward(case.arrays)
    once = {n: np.zeros_like(case.arrays[n]) for n in case.params}
    case.backward(dout.copy(), cache, once)
    start = {n: np.full_like(case.arrays[n], 0.5) for n in case.params}
    case.backward(dout.copy(), cache, start)
    for n in case.params:
        np.testing.assert_allclose(start[n], 0.5 + once[n], rtol=1e-12, atol=1e-14, err_msg=n)
    for key, a in case.arrays.items():
        np.testing.assert_array_equal(a, before[key], err_msg=f"{name} wrote into {key}")


def _torch_moe(torch, a: dict, cfg, x, cap):
    """The layer written again in PyTorch from the definition (moe.py's docstring)."""
    F = torch.nn.functional
    N, E, k = x.shape[0] * x.shape[1], cfg.n_experts, cfg.experts_per_token
    x2 = x.reshape(N, -1)
    probs = torch.softmax(x2 @ a["mlp.router.weight"], dim=1)
    top_p, top_i = torch.topk(probs, k, dim=1)
    gates = top_p / top_p.sum(dim=1, keepdim=True)
    out = torch.zeros_like(x2)
    counts = torch.bincount(top_i.reshape(-1), minlength=E).to(x.dtype)
    for e in range(E):
        tok, slot = (top_i == e).nonzero(as_tuple=True)  # token order
        tok, slot = (tok[:cap], slot[:cap]) if cap is not None else (tok, slot)
        p = {n: a[f"mlp.experts.{e}.{n}"] for n in moe.MLP_NAMES}
        h = F.gelu(x2[tok] @ p["c_fc.weight"] + p["c_fc.bias"], approximate="tanh")
        y = h @ p["c_proj.weight"] + p["c_proj.bias"]
        out = out.index_add(0, tok, gates[tok, slot][:, None] * y)
    aux = cfg.aux_loss_coef * E * ((counts / (N * k)) * probs.mean(dim=0)).sum()
    return out.reshape(x.shape), aux


@pytest.mark.parametrize("name", list(CASES))
def test_moe_matches_pytorch_autograd(name):
    torch = pytest.importorskip("torch")
    case, dout, _ = make_case(name)
    cfg = case.fixed["cfg"]
    ours, _ = analytic_grads(case, dout)
    t = {n: torch.tensor(v, requires_grad=True) for n, v in case.arrays.items()}
    out, aux = _torch_moe(torch, t, cfg, t["x"], config.expert_capacity(cfg, B * T))
    mine, _ = case.forward(copies(case.arrays))
    np.testing.assert_allclose(np.append(out.detach().numpy().ravel(), aux.item()), mine, rtol=1e-12)
    ((out.reshape(-1) * torch.tensor(dout[:-1])).sum() + aux * float(dout[-1])).backward()
    for n, v in t.items():
        np.testing.assert_allclose(ours[n], v.grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=n)


@pytest.mark.parametrize("dloss", [1.0, 0.5])
def test_moe_gpt_gradient_is_that_of_loss_plus_aux_loss(dloss):
    """GPT.backward(dloss) differentiates dloss * (loss + aux_loss): checked by central differences
    on every router element and every 5th element of the rest (a whole-model MoE, a dense block
    below it, a capacity limit that drops)."""
    cfg = ModelConfig(n_layer=2, n_embd=8, n_head=2, block_size=6, vocab_size=11, n_experts=3,
                      experts_per_token=2, moe_every=2, capacity_factor=0.75, aux_loss_coef=0.3)
    rng = np.random.default_rng(11)
    model = GPT(cfg, init(cfg, rng, "float64"))
    model.params.data += rng.normal(0, 0.3, model.params.data.shape)
    model.grads = FlatBuffer(cfg, "float64")
    idx = rng.integers(0, 11, (2, 6))

    def objective():
        return dloss * (model.loss(idx, idx)[0] + model.aux_loss)

    model.backward(model.loss(idx, idx)[1], dloss)
    assert model.routing[1].dropped > 0 and 1 in model.routing and 0 not in model.routing
    p, g = model.params.data, model.grads.data
    router = model.params.layout.index(("transformer.h.1.mlp.router.weight", (8, 3)))
    start = sum(np.prod(s) for _, s in model.params.layout[:router])
    elements = sorted(set(range(0, p.size, 5)) | set(range(start, start + 24)))
    numeric = []
    for i in elements:
        orig = p[i]
        p[i] = orig + 1e-6
        f_plus = objective()
        p[i] = orig - 1e-6
        f_minus = objective()
        p[i] = orig
        numeric.append((f_plus - f_minus) / 2e-6)
    np.testing.assert_allclose(g[elements], numeric, rtol=RTOL, atol=atol_for(objective()))
    assert np.abs(g[start : start + 24]).max() > 1e-3


# ----------------------------------------------------------------------------- 2. one expert


def test_one_expert_is_the_dense_layout():
    dense = ModelConfig(n_layer=2, n_embd=8, n_head=2, block_size=6, vocab_size=11)
    assert params.layout(ModelConfig(**{**dense.__dict__, "n_experts": 1})) == params.layout(dense)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_moe_pair_with_one_expert_is_the_dense_mlp_exactly(dtype):
    rng = np.random.default_rng(5)
    a = {n: v.astype(dtype) for n, v in _moe_arrays(rng, 1).items()}
    dense = {f"mlp.{n}": a[f"mlp.experts.0.{n}"] for n in moe.MLP_NAMES}
    cfg = ModelConfig(n_embd=C, n_experts=1, experts_per_token=1, aux_loss_coef=0.5)
    out_d, cache_d = nn.mlp_forward(a["x"], dense)
    out_m, cache_m = moe.moe_forward(a["x"], a, cfg)
    np.testing.assert_array_equal(out_m, out_d)
    dout = rng.normal(0, 1, out_d.shape).astype(dtype)
    g_d = {n: np.zeros_like(v) for n, v in dense.items()}
    g_m = {n: np.zeros_like(v) for n, v in a.items()}
    dx_d = nn.mlp_backward(dout.copy(), cache_d, dense, g_d)
    dx_m = moe.moe_backward(dout.copy(), cache_m, a, g_m)
    np.testing.assert_array_equal(dx_m, dx_d)
    for n in moe.MLP_NAMES:
        np.testing.assert_array_equal(g_m[f"mlp.experts.0.{n}"], g_d[f"mlp.{n}"], err_msg=n)
    assert not g_m["mlp.router.weight"].any()  # one expert: the gate is 1 whatever the router says


def test_a_gpt_whose_mlps_run_moe_with_one_expert_is_the_dense_gpt(monkeypatch):
    """The whole model: every block through moe.py with E = 1, weights copied from a dense GPT."""
    cfg = ModelConfig(n_layer=2, n_embd=8, n_head=2, block_size=6, vocab_size=11)
    rng = np.random.default_rng(3)
    dense = GPT(cfg, init(cfg, rng, "float64"))
    dense.params.data += rng.normal(0, 0.3, dense.params.data.shape)
    dense.grads = FlatBuffer(cfg, "float64")
    monkeypatch.setattr(params, "is_moe_block", lambda cfg, i: True)  # E = 1 laid out as MoE
    routed = GPT(cfg, FlatBuffer(cfg, "float64"))
    routed.grads = FlatBuffer(cfg, "float64")
    for name, _ in dense.params.layout:
        routed.params[name.replace("mlp.c_", "mlp.experts.0.c_")][...] = dense.params[name]
    idx = rng.integers(0, 11, (2, 6))
    for model in (dense, routed):
        model.result = model.loss(idx, idx)
        model.backward(model.result[1])
    assert routed.routing and routed.result[0] == dense.result[0]
    for name, _ in dense.params.layout:
        np.testing.assert_array_equal(routed.grads[name.replace("mlp.c_", "mlp.experts.0.c_")],
                                      dense.grads[name], err_msg=name)


# ----------------------------------------------------------------------------- 3. counts


def _assert_same(predicted: dict, measured: dict):
    assert predicted.keys() == measured.keys()
    for key, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(measured[key], f) for f in FIELDS], key


@st.composite
def moe_configs(draw):
    L = draw(st.integers(1, 3))
    E = draw(st.integers(2, 4))
    return ModelConfig(
        n_layer=L, n_head=2, n_embd=2 * draw(st.integers(1, 4)), block_size=draw(st.integers(2, 8)),
        vocab_size=draw(st.integers(2, 30)), dropout=draw(st.sampled_from([0.0, 0.1])), n_experts=E,
        experts_per_token=draw(st.integers(1, E)), moe_every=draw(st.integers(1, L)),
        capacity_factor=draw(st.sampled_from([0.0, 0.5, 1.0, 1.25])), aux_loss_coef=0.01)


def _model(cfg):
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    return model


def _computed(model) -> dict:
    return {i: r.computed for i, r in model.routing.items()}


@settings(max_examples=25, deadline=None)
@given(cfg=moe_configs(), batch=st.integers(1, 3), accum=st.integers(1, 2), data=st.data())
def test_prediction_equals_measurement_training(cfg, batch, accum, data):
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    rng = np.random.default_rng(0)
    model = _model(cfg)
    batches = [tuple(rng.integers(0, cfg.vocab_size, (batch, T)) for _ in "xy") for _ in range(accum)]
    routings = []
    METER.reset()
    accumulate(model, batches, accum, rng if cfg.dropout > 0 else None, routings=routings)
    update(model, AdamW(model.params), 1e-3, 1.0)
    routing = [{i: r.computed for i, r in m.items()} for m in routings]
    _assert_same(cost_model.predict_training_step(cfg, batch, T, accum, routing=routing), METER.records)


@settings(max_examples=20, deadline=None)
@given(cfg=moe_configs(), batch=st.integers(1, 3), data=st.data())
def test_prediction_equals_measurement_prefill_and_decode(cfg, batch, data):
    P = data.draw(st.integers(1, cfg.block_size - 1), label="prompt")
    model = _model(cfg)
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, cfg.block_size))
    kv = KVCache(cfg, batch)
    METER.reset()
    with METER.in_phase("prefill"):
        model.logits(idx[:, :P], kv, last_only=True)
    _assert_same(cost_model.predict_forward(cfg, batch, P, "prefill", routing=_computed(model)),
                 METER.records)
    for position in range(P, cfg.block_size):
        METER.reset()
        with METER.in_phase("decode"):
            model.logits(idx[:, position : position + 1], kv)
        _assert_same(cost_model.predict_decode(cfg, batch, position, routing=_computed(model)),
                     METER.records)


def test_prediction_equals_measurement_with_capacity_drops_and_moe_every():
    """The property tests above draw these too; here a case sure to drop assignments."""
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=8, block_size=8, vocab_size=20, n_experts=4,
                      experts_per_token=2, moe_every=2, capacity_factor=0.5)
    idx = np.random.default_rng(4).integers(0, 20, (3, 8))
    model = _model(cfg)
    routings = []
    METER.reset()
    accumulate(model, [(idx, idx)], 1, routings=routings)
    update(model, AdamW(model.params), 1e-3, 1.0)
    assert list(model.routing) == [1] and model.routing[1].dropped > 0
    _assert_same(cost_model.predict_training_step(cfg, 3, 8, routing=[_computed(model)]), METER.records)


def test_dropless_flops_do_not_depend_on_the_routing():
    """Products are linear in tokens per expert and dropless routing computes N * k of them, so the
    balanced prediction's FLOPs are any routing's: here, the measured ones."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=8, vocab_size=20, n_experts=4,
                      experts_per_token=2)
    idx = np.random.default_rng(2).integers(0, 20, (3, 8))
    model = _model(cfg)
    METER.reset()
    accumulate(model, [(idx, idx)], 1)
    assert any(len(set(r.computed)) > 1 for r in model.routing.values())  # not balanced
    predicted = cost_model.predict_training_step(cfg, 3, 8)
    for phase in ("forward", "backward"):
        assert cost_model.total_flops({k: r for k, r in METER.records.items() if k.phase == phase}) == \
            cost_model.total_flops({k: r for k, r in predicted.items() if k.phase == phase})


def test_the_scale_projections_are_the_meters_counts_for_a_dropless_moe():
    """minigpt scale's FLOPs (scale/work.py, wrappers over the closed form, balanced routing)
    equal what the meter counted in a real MoE training step, whatever the routing was."""
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=8, block_size=8, vocab_size=20, n_experts=4,
                      experts_per_token=2, moe_every=2)
    arch = work.Arch(3, 8, 2, 8, 20, n_experts=4, experts_per_token=2, moe_every=2)
    idx = np.random.default_rng(6).integers(0, 20, (2, 8))
    model = _model(cfg)
    METER.reset()
    accumulate(model, [(idx, idx)], 1)
    update(model, AdamW(model.params), 1e-3, 1.0)
    assert cost_model.total_flops(METER.records) == work.training_step_flops(arch, 2, 8)
    assert work.arch_params(arch) == (FlatBuffer(cfg).size, cost_model.n_active_params(cfg))


def test_parameter_counts_match_the_layout():
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=10, block_size=7, vocab_size=13, n_experts=4,
                      experts_per_token=2, moe_every=2)
    layout = params.layout(cfg)
    assert cost_model.n_params(cfg) == FlatBuffer(cfg).size
    assert [n for n, _ in layout if "router" in n] == ["transformer.h.1.mlp.router.weight"]
    assert ("transformer.h.1.mlp.experts.3.c_fc.weight", (10, 40)) in layout
    per_expert = cost_model.mlp_params(10)
    assert cost_model.n_active_params(cfg) == cost_model.n_params(cfg) - 2 * per_expert


# ----------------------------------------------------------------------------- config and use


@pytest.mark.parametrize("override, words", [
    ("model.experts_per_token=3", "experts_per_token = 3 exceeds n_experts = 2"),
    ("model.moe_every=9", "moe_every = 9 exceeds n_layer = 4"),
    ("model.capacity_factor=-1", "capacity_factor"),
])
def test_bad_moe_configs_name_the_field(override, words):
    with pytest.raises(ConfigError, match=words):
        config.load(None, ["model.n_experts=2", override])


def test_int8_refuses_a_moe_model_in_one_line():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=6, vocab_size=11, n_experts=2)
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        quant.quantize_model(init(cfg, np.random.default_rng(0)), cfg, quant.QuantConfig())


MOE_RUN = {"model": {"n_layer": 2, "n_experts": 3, "experts_per_token": 2, "moe_every": 2},
           "train": {"max_steps": 6, "grad_accum": 2}, "eval": {"interval": 2}}


def test_moe_training_logs_the_aux_loss_and_load_and_resumes_exactly(tmp_path):
    Trainer(tiny_config(tmp_path / "a", **MOE_RUN), progress=False).run()

    def stop_at_3(trainer):
        if trainer.state.step == 3:
            trainer.request_stop()

    assert Trainer(tiny_config(tmp_path / "b", **MOE_RUN), progress=False, on_step=stop_at_3).run().interrupted
    Trainer(tiny_config(tmp_path / "b", **MOE_RUN), resume=True, progress=False).run()
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    strip = [[{k: v for k, v in e.items() if k != "elapsed_s"} for e in log] for log in logs]
    assert strip[0] == strip[1]
    tokens_per_log = 2 * 2 * 4 * 16  # steps x micro-batches x batch x block
    for entry in logs[0]:
        assert 0.0 < entry["aux_loss"] < 1.0
        assert list(entry["expert_load"]) == ["h1"]
        assert sum(entry["expert_load"]["h1"]) == 2 * tokens_per_log  # k = 2 assignments a token
        assert entry["imbalance"]["h1"] >= 1.0 and entry["dropped"] == 0
    for name in ("params", "adam_m", "adam_v"):
        assert np.array_equal(checkpoint.load(tmp_path / "a")[1][name], checkpoint.load(tmp_path / "b")[1][name])


def test_moe_checkpoint_generates_with_a_kv_cache_that_matches_the_full_forward(tmp_path):
    Trainer(tiny_config(tmp_path, **MOE_RUN), progress=False).run()
    m = api.load(tmp_path)
    assert "transformer.h.1.mlp.experts.2.c_fc.weight" in m.params
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16))
    full = m.gpt.logits(tokens)
    kv = KVCache(m.gpt.cfg, 2)
    steps = [m.gpt.logits(tokens[:, :5], kv)] + [m.gpt.logits(tokens[:, t : t + 1], kv) for t in range(5, 16)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    out = m.generate(tokens[0, :4], max_new_tokens=20, seed=1)
    assert len(out) == 20 and np.array_equal(out, m.generate(tokens[0, :4], max_new_tokens=20, seed=1))


def test_train_command_reports_moe_parameters_flops_and_load(tmp_path):
    args = [TINY_TOML, "--no-progress", *set_args(merge(merge(TINY, MOE_RUN), {"train": {"out_dir": str(tmp_path)}}))]
    done = run_cli("train.py", *args, timeout=120)
    assert done.returncode == 0, done.stderr
    cfg = tiny_config(tmp_path, **MOE_RUN).model
    assert f"{cost_model.n_params(cfg):,} total, {cost_model.n_active_params(cfg):,} active" in done.stdout
    assert "FLOPs per token (closed form, balanced routing)" in done.stdout
    assert "    h1: " in done.stdout and "imbalance" in done.stdout
