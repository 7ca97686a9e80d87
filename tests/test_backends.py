"""The CPU (NumPy) and the GPU (CuPy) give the same numbers and the same counts.

The comparisons with the CPU run on "cuda" only and are skipped unless CuPy imports and sees a GPU
(cuda_available()): on a machine without one they would compare the CPU with itself, which passes
whatever the code does. bench/gpu.sh runs this file on a GPU machine first. What runs everywhere:
the CPU reference's counts against the closed form, the fused kernels' wrappers against NumPy
stand-ins (below), and the checks under "every machine". Tolerances are relative,
‖ours − cpu‖ / ‖cpu‖, float32 unless said:

- logits, losses, gradients, updated weights: 1e-5 (the issue's bound); counts: equal, record by
  record (calls, FLOPs, useful FLOPs, bytes read and written), and equal to the closed form;
- prefill and decode: the same greedy tokens and the same records;
- checkpoints: trained on one device (train.py --set train.device=...), loaded on the other
  (minigpt.load(run, device=...)): the same logits and greedy tokens on both;
- int8: w8a32 to 1e-5; w8a8 to 1e-3, since an activation whose float32 value differs in its last
  bit between devices may round to the neighbouring int8 step;
- fused kernels (minigpt/nn/cuda_kernels.py) against their NumPy-style twins, outputs and
  records. On the CPU the kernels are replaced by NumPy stand-ins that do what each kernel does,
  which checks the wrappers (shapes, caches, in-place updates, counts) without a GPU.

Also here, for every machine: no module but minigpt/backend.py imports CuPy, the meter's
profiling clock (METER.synchronizing) swaps in and out, and GPU names map to the right profiles.
"""

import ast
import dataclasses
import math
import pathlib
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import TINY, TINY_TOML, merge, run_cli, set_args, tiny_config

import minigpt
from minigpt import backend, sampling
from minigpt.config import ModelConfig
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.hardware import gpu, profiles
from minigpt.nn import cuda_kernels, quant
from minigpt.nn import layers as nn
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW, clip_grad_norm, zero_grad
from minigpt.train.trainer import Trainer

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minigpt"
FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
RTOL = 1e-5
SMALL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=256)


def cuda_available() -> bool:
    """CuPy imports and sees at least one GPU."""
    try:
        return backend.cupy().cuda.runtime.getDeviceCount() > 0
    except (ImportError, OSError, RuntimeError):  # not installed, no driver or libraries, no GPU
        return False


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and an NVIDIA GPU")
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]
ON_GPU = [pytest.param("cuda", id="cuda", marks=needs_cuda)]  # a device compared with the CPU


@pytest.fixture(autouse=True)
def cpu_after():
    """Every test starts and ends on the CPU with an empty meter."""
    backend.use("cpu")
    METER.reset()
    yield
    backend.use("cpu")
    METER.reset()


# ----------------------------------------------------------------------------- helpers


def host(a):
    """NumPy copies of arrays (inside tuples and lists too); other values as they are."""
    if isinstance(a, (tuple, list)):
        return type(a)(host(x) for x in a)
    if hasattr(a, "shape"):
        return np.array(backend.to_host(a))
    return a


def on_backend(a):
    """Host arrays (inside tuples too) as arrays of the active backend."""
    if isinstance(a, tuple):
        return tuple(on_backend(x) for x in a)
    return backend.asarray(a)


def run_on(device: str, work):
    """work() with backend `device` and a fresh meter: (its result on the host, the counts)."""
    backend.use(device)
    METER.reset()
    try:
        return host(work()), counts(METER.records)
    finally:
        backend.use("cpu")


def counts(records) -> dict:
    return {key: tuple(getattr(r, f) for f in FIELDS) for key, r in records.items()}


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-300))


def weights(cfg, seed=0, dtype="float32") -> FlatBuffer:
    """GPT-2 init with every parameter spread a little (biases and LN weights too), on the host."""
    rng = np.random.default_rng(seed)
    params = init(cfg, rng, dtype)
    params.data += rng.normal(0, 0.05, params.data.shape).astype(dtype)
    return params


def model_on_backend(cfg, params: FlatBuffer) -> GPT:
    """A GPT on the active backend holding a copy of host params, with zeroed gradients."""
    data = backend.asarray(params.data.copy())
    model = GPT(cfg, FlatBuffer(cfg, data.dtype, data))
    model.grads = FlatBuffer(cfg, data.dtype)
    return model


def tokens(cfg, shape, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape)


def predicted(records: dict, times: int = 1) -> dict:
    return {key: tuple(times * getattr(r, f) for f in FIELDS) for key, r in records.items()}


# ----------------------------------------------------------------------------- forward, training


@pytest.mark.parametrize("device", ON_GPU)
def test_logits_and_loss_match_the_cpu(device):
    params = weights(SMALL)
    x, y = tokens(SMALL, (3, SMALL.block_size)), tokens(SMALL, (3, SMALL.block_size), seed=2)

    def work():
        model = model_on_backend(SMALL, params)
        logits = model.logits(backend.asarray(x))
        loss, _ = model.loss(backend.asarray(x), backend.asarray(y))
        return logits, loss

    (ref_logits, ref_loss), ref_counts = run_on("cpu", work)
    (logits, loss), got_counts = run_on(device, work)
    assert rel(logits, ref_logits) <= RTOL
    assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (loss, ref_loss)
    assert got_counts == ref_counts


def train_steps(cfg, params, batches, dropout_seed=None):
    """Our training step, as the trainer runs it: (losses, gradient norms, last grads, params)."""
    model = model_on_backend(cfg, params)
    opt = AdamW(model.params)
    rng = np.random.default_rng(dropout_seed) if dropout_seed is not None else None
    losses, norms = [], []
    for step, (x, y) in enumerate(batches):
        zero_grad(model.grads.data)
        with METER.in_phase("forward"):
            loss, cache = model.loss(backend.asarray(x), backend.asarray(y), rng)
        with METER.in_phase("backward"):
            model.backward(cache)
        with METER.in_phase("optimizer"):
            norms.append(clip_grad_norm(model.grads.data, 1.0))
            opt.step(model.grads.data, 1e-2 / (step + 1))
        losses.append(loss)
    return losses, norms, model.grads.data, model.params.data


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_cpu_reference_counts_equal_the_closed_form(dropout):
    """The reference run of the test below, on its own: its counts against the closed form."""
    cfg = dataclasses.replace(SMALL, dropout=dropout)
    B, T, steps = 4, cfg.block_size, 3
    batches = [(tokens(cfg, (B, T), seed=s), tokens(cfg, (B, T), seed=s + 100))
               for s in range(steps)]
    _, ref_counts = run_on("cpu", lambda: train_steps(cfg, weights(cfg), batches,
                                                      dropout_seed=7 if dropout else None))
    assert ref_counts == predicted(cost_model.predict_training_step(cfg, B, T), times=steps)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("device", ON_GPU)
def test_training_steps_match_the_cpu_and_the_closed_form(device, dropout):
    cfg = dataclasses.replace(SMALL, dropout=dropout)
    params = weights(cfg)
    B, T, steps = 4, cfg.block_size, 3
    batches = [(tokens(cfg, (B, T), seed=s), tokens(cfg, (B, T), seed=s + 100)) for s in range(steps)]

    def work():
        return train_steps(cfg, params, batches, dropout_seed=7 if dropout else None)

    (ref_losses, ref_norms, ref_grads, ref_params), ref_counts = run_on("cpu", work)
    (losses, norms, grads, new_params), got_counts = run_on(device, work)
    for name, ours, ref in [("loss", losses, ref_losses), ("grad norm", norms, ref_norms)]:
        for step, (a, b) in enumerate(zip(ours, ref)):
            assert abs(a - b) <= RTOL * abs(b), (name, step, a, b)
    assert rel(grads, ref_grads) <= RTOL
    assert rel(new_params, ref_params) <= RTOL
    assert got_counts == ref_counts
    assert got_counts == predicted(cost_model.predict_training_step(cfg, B, T), times=steps)


@pytest.mark.parametrize("device", ON_GPU)
def test_trainer_losses_match_the_cpu(device, tmp_path):
    """The Trainer itself, [train] device switched: the same training and validation losses."""

    def losses(dev):
        trainer = Trainer(tiny_config(tmp_path / dev, train={"device": dev}), progress=False)
        try:
            return [trainer.train_step() for _ in range(3)] + [trainer.evaluate()]
        finally:
            backend.use("cpu")

    ref, got = losses("cpu"), losses(device)
    for a, b in zip(got, ref):
        assert abs(a - b) <= RTOL * abs(b), (got, ref)


# ----------------------------------------------------------------------------- generation, int8


def greedy(model, prompt, n, kv_int8=False):
    return sampling.generate(model, np.asarray(prompt), n, temperature=0, kv_int8=kv_int8).tokens


@pytest.mark.parametrize("device", ON_GPU)
def test_prefill_and_decode_match_the_cpu(device):
    """Greedy tokens and prefill/decode records; 16 new tokens after 5 overflow the 16-position
    cache, so the rebuild (a second prefill) runs too."""
    params = weights(SMALL, seed=3)
    prompt = tokens(SMALL, (5,), seed=4)

    def work():
        return greedy(model_on_backend(SMALL, params), prompt, 16)

    ref_tokens, ref_counts = run_on("cpu", work)
    got_tokens, got_counts = run_on(device, work)
    assert got_tokens.tolist() == ref_tokens.tolist()
    assert got_counts == ref_counts
    assert {key.phase for key in got_counts} == {"prefill", "decode"}


INT8 = [("w8a32", False, False, 1e-5), ("w8a8", False, False, 1e-3), ("w8a8", True, True, 1e-3)]


@pytest.mark.parametrize(("mode", "embedding", "kv_int8", "rtol"), INT8,
                         ids=["w8a32", "w8a8", "w8a8-embedding-kv"])
@pytest.mark.parametrize("device", ON_GPU)
def test_int8_logits_and_counts_match_the_cpu(device, mode, embedding, kv_int8, rtol):
    params = weights(SMALL, seed=5)
    x = tokens(SMALL, (2, SMALL.block_size), seed=6)
    qcfg = quant.QuantConfig(mode, quantize_embedding=embedding, kv_int8=kv_int8)

    def work():
        model = model_on_backend(SMALL, params)
        model.quant = quant.quantize_model(model.params, SMALL, qcfg)
        return model.logits(backend.asarray(x)), greedy(model, x[0, :4], 6, kv_int8=kv_int8)

    (ref_logits, ref_tokens), ref_counts = run_on("cpu", work)
    (got_logits, got_tokens), got_counts = run_on(device, work)
    assert rel(got_logits, ref_logits) <= rtol
    assert got_tokens.tolist() == ref_tokens.tolist()
    assert got_counts == ref_counts


# ----------------------------------------------------------------------------- checkpoints


PAIRS = [pytest.param("cuda", "cpu", id="cuda-to-cpu", marks=needs_cuda),
         pytest.param("cpu", "cuda", id="cpu-to-cuda", marks=needs_cuda)]


@pytest.mark.parametrize(("trained_on", "loaded_on"), PAIRS)
def test_a_checkpoint_moves_between_devices(trained_on, loaded_on, tmp_path):
    run = tmp_path / "run"
    sections = merge(TINY, {"train": {"out_dir": str(run), "max_steps": 3, "device": trained_on}})
    r = run_cli("train.py", TINY_TOML, "--no-progress", *set_args(sections), timeout=300)
    assert r.returncode == 0, r.stderr
    prompt = list(b"The fox ")
    seen = {}
    for device in dict.fromkeys([trained_on, loaded_on]):
        model = minigpt.load(run, device=device)
        seen[device] = (model.logits([prompt]), model.generate(prompt, 12, temperature=0))
        backend.use("cpu")
    (ref_logits, ref_tokens), (logits, got_tokens) = seen[trained_on], seen[loaded_on]
    assert isinstance(logits, np.ndarray)  # Model.logits hands back host arrays on any device
    assert rel(logits, ref_logits) <= RTOL
    assert got_tokens.tolist() == ref_tokens.tolist()


# ----------------------------------------------------------------------------- fused kernels


def numpy_kernels() -> SimpleNamespace:
    """What each CUDA kernel of cuda_kernels does, in NumPy, called the way CuPy calls them
    (outputs passed last are written in place; otherwise they are returned)."""
    K = math.sqrt(2.0 / math.pi)

    def gelu_forward(x):
        th = np.tanh((x * x * (K * 0.044715) + K) * x)
        return th, (th + 1) * x * 0.5

    def gelu_backward(x, th, d):
        g = (x * x * (0.5 * K * 3 * 0.044715) + 0.5 * K) * x * (1 - th * th)
        return (g + th * 0.5 + 0.5) * d

    def scale_mask(scale, n_q, n_k, pos0, neg_inf, s):
        visible = np.arange(n_k)[None, :] <= np.arange(n_q)[:, None] + pos0  # (n_q, n_k)
        s[...] = np.where(visible, s * scale, neg_inf)

    def exp_div(m, z, s):
        s[...] = np.exp(s - m) / z

    def adamw(g, decay, b1, c1, b2, c2, bias2_sqrt, eps, step_size, n_decay, p, m, v):
        p[:n_decay] *= decay
        m[...] = m * b1 + c1 * g
        v[...] = v * b2 + c2 * (g * g)
        p[...] = p - step_size * (m / (np.sqrt(v) / bias2_sqrt + eps))

    return SimpleNamespace(
        gelu_forward=gelu_forward, gelu_backward=gelu_backward, scale_mask=scale_mask,
        sum_exp=lambda s, m, axis, keepdims: np.exp(s - m).sum(axis=axis, keepdims=keepdims),
        exp_div=exp_div,
        sum_prod=lambda d, p, axis, keepdims: (d * p).sum(axis=axis, keepdims=keepdims),
        softmax_grad=lambda d, p, z, scale: (d * p - p * z) * scale, adamw=adamw)


@pytest.fixture
def fused(device, monkeypatch):
    """cuda_kernels on `device`: the real kernels on a GPU, the NumPy stand-ins on the CPU."""
    if device == "cpu":
        monkeypatch.setattr(cuda_kernels, "_kernels", numpy_kernels)
    return cuda_kernels


def twin_and_fused(device, twin, fused_fn, make_inputs, monkeypatch):
    """The NumPy-style twin (dispatch off) on the CPU and on `device`, and the fused function on
    `device`, each on a fresh copy of the same inputs: their records must be equal; returns the
    three results (on the host)."""
    monkeypatch.setattr(cuda_kernels, "ENABLED", False)  # the twin must not dispatch to us
    ref, ref_counts = run_on("cpu", lambda: twin(*on_backend(make_inputs())))
    out_twin, twin_counts = run_on(device, lambda: twin(*on_backend(make_inputs())))
    out_fused, fused_counts = run_on(device, lambda: fused_fn(*on_backend(make_inputs())))
    assert fused_counts == twin_counts == ref_counts
    return ref, out_twin, out_fused


# fused against the twin on the same device (the same CUDA exp and tanh there), and either against
# the CPU (whose exp and tanh differ by an ulp or two: 1 - th^2 magnifies that where |x| is large)
TOL = {"float32": 1e-6, "float64": 1e-13}
CPU_TOL = {"float32": RTOL, "float64": 1e-12}
DTYPES = ["float32", "float64"]


def assert_all_close(results, dtype):
    """results: (the twin on the CPU, the twin on the device, ours on the device)."""
    cpu, twin, ours = map(flat, results)
    for a, b, c in zip(cpu, twin, ours, strict=True):
        assert rel(c, b) <= TOL[dtype]
        assert rel(c, a) <= CPU_TOL[dtype] and rel(b, a) <= CPU_TOL[dtype]


def flat(x) -> list:
    """The arrays in a (possibly nested) tuple, flattened in order."""
    if isinstance(x, (tuple, list)):
        return [a for item in x for a in flat(item)]
    return [x]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", BACKENDS)
def test_fused_gelu_matches_its_twin(device, dtype, fused, monkeypatch):
    rng = np.random.default_rng(10)
    x, dout = (rng.normal(0, 2, (2, 5, 24)).astype(dtype) for _ in range(2))
    results = twin_and_fused(device, nn.gelu_forward, fused.gelu_forward, lambda: (x.copy(),),
                             monkeypatch)
    assert_all_close(results, dtype)
    _, (x2, th) = results[0]
    results = twin_and_fused(device, nn.gelu_backward, fused.gelu_backward,
                             lambda: (dout.copy(), (x2.copy(), th.copy())), monkeypatch)
    assert_all_close(results, dtype)


SOFTMAX_SHAPES = [(2, 3, 6, 6, 0), (1, 2, 1, 9, 8), (2, 2, 3, 7, 4)]  # B, H, T, Tk, pos0


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", BACKENDS)
def test_fused_softmax_matches_its_twin(device, dtype, shape, fused, monkeypatch):
    B, H, T, Tk, pos0 = shape
    rng = np.random.default_rng(11)
    scores, datt = (rng.normal(0, 3, (B, H, T, Tk)).astype(dtype) for _ in range(2))
    scale = 1 / math.sqrt(8)
    results = twin_and_fused(
        device, lambda s: nn.causal_softmax_forward(s, scale, pos0),
        lambda s: fused.causal_softmax_forward(s, scale, pos0), lambda: (scores.copy(),), monkeypatch)
    assert_all_close(results, dtype)
    att = results[0]
    assert np.allclose(att.sum(axis=-1), 1.0)
    assert (att[..., np.arange(Tk)[None, :] > np.arange(T)[:, None] + pos0] == 0).all()  # masked
    results = twin_and_fused(
        device, lambda d, a: nn.causal_softmax_backward(d, a, scale),
        lambda d, a: fused.causal_softmax_backward(d, a, scale),
        lambda: (datt.copy(), att.copy()), monkeypatch)
    assert_all_close(results, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", BACKENDS)
def test_fused_adamw_matches_its_twin(device, dtype, fused, monkeypatch):
    """Three steps of AdamW.step against adamw_update on the same buffers, decay on part."""
    rng = np.random.default_rng(12)
    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=4, block_size=4, vocab_size=8)
    start = weights(cfg, seed=13, dtype=dtype).data
    grads = [rng.normal(0, 1, start.shape).astype(dtype) for _ in range(3)]

    def twin():
        opt = AdamW(FlatBuffer(cfg, dtype, backend.asarray(start.copy())))
        for step, g in enumerate(grads):
            opt.step(backend.asarray(g), 1e-2 / (step + 1))
        return opt.params.data, opt.m, opt.v

    def ours():
        opt = AdamW(FlatBuffer(cfg, dtype, backend.asarray(start.copy())))
        for step, g in enumerate(grads):
            opt.t += 1
            fused.adamw_update(opt.params.data, backend.asarray(g), opt.m, opt.v,
                               opt.params.n_decay, 1e-2 / (step + 1), opt.beta1, opt.beta2,
                               opt.eps, opt.weight_decay, opt.t)
        return opt.params.data, opt.m, opt.v

    monkeypatch.setattr(cuda_kernels, "ENABLED", False)
    ref, ref_counts = run_on("cpu", twin)
    got_twin, twin_counts = run_on(device, twin)
    got, fused_counts = run_on(device, ours)
    assert fused_counts == twin_counts == ref_counts
    assert_all_close([ref, got_twin, got], dtype)


@pytest.mark.parametrize("device", BACKENDS)
def test_layers_use_the_fused_kernels_on_cuda_only(device, monkeypatch):
    """On a GPU a training step goes through every fused kernel (once dispatch is wired in
    layers.py and optim.py); on the CPU through none."""
    monkeypatch.setattr(cuda_kernels, "CALLS", type(cuda_kernels.CALLS)())
    batches = [(tokens(SMALL, (2, SMALL.block_size)), tokens(SMALL, (2, SMALL.block_size), seed=9))]
    run_on(device, lambda: train_steps(SMALL, weights(SMALL), batches))
    expected = {"gelu_forward", "gelu_backward", "causal_softmax_forward",
                "causal_softmax_backward", "adamw_update"} if device == "cuda" else set()
    assert set(cuda_kernels.CALLS) == expected


# ----------------------------------------------------------------------------- every machine


def test_no_module_but_the_backend_imports_cupy():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "backend.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("cupy", "cupyx") for n in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("device", BACKENDS)
def test_the_profiling_clock_synchronizes_inside_and_restores_outside(device, monkeypatch):
    plain = METER.clock
    syncs = []
    real = backend.synchronize
    monkeypatch.setattr(backend, "synchronize", lambda: syncs.append(1) or real())
    params, x = weights(SMALL), tokens(SMALL, (2, 8))

    def work():
        model = model_on_backend(SMALL, params)
        with METER.synchronizing():
            assert METER.clock is not plain
            logits = model.logits(backend.asarray(x))
        assert METER.clock is plain
        with METER.synchronizing(on=False):
            assert METER.clock is plain
        return logits

    _, profiled = run_on(device, work)
    assert syncs and len(syncs) >= 2 * sum(c[0] for c in profiled.values())  # two reads per record
    _, plain_counts = run_on(device, lambda: model_on_backend(SMALL, params).logits(backend.asarray(x)))
    assert profiled == plain_counts


GPU_NAMES = [("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"),
             ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"), ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
             ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"), ("Tesla V100-SXM2-16GB", "v100-sxm2"),
             ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None), ("NVIDIA A100 80GB PCIe", None),
             ("NVIDIA GeForce RTX 4090", None), (None, None)]


@pytest.mark.parametrize(("name", "profile"), GPU_NAMES, ids=[str(n) for n, _ in GPU_NAMES])
def test_gpu_names_map_to_packaged_profiles(name, profile):
    assert gpu.profile_for(name) == profile
    if profile is not None:
        assert profiles.load_profile(profile).name == profile
