"""The optimizer's edges that mutation testing (bench/mutation.py optim) found untested.

- lr_at against the schedule worked by hand: linear warmup to learning_rate, then a cosine from
  learning_rate down to min_lr over the remaining steps, then min_lr.
- clip_grad_norm's coefficient is torch's, max_norm / (norm + 1e-6), to float64 precision.
- One clip + AdamW step records exactly what the closed-form model predicts for the optimizer.
- AdamW's defaults are the trainer's defaults, and the CUDA path hands the kernel every buffer
  and hyperparameter by its place in the kernel's signature.
"""

import inspect
import math

import numpy as np
import pytest

from minigpt.config import ModelConfig, TrainConfig
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn import cuda_kernels
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW, clip_grad_norm, lr_at, zero_grad

# 4 warmup steps, then a cosine over the 10 steps from 4 to 14: lr(4 + s) = 0.1 + 0.45 (1 + cos(pi s / 10))
SCHEDULE = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
BY_HAND = {
    0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0,  # (step + 1) / 4
    4: 1.0,  # the cosine starts at the peak
    6: 0.1 + 0.45 * (1 + math.cos(math.pi * 0.2)),
    9: 0.55,  # half way: cos(pi / 2) = 0, so (learning_rate + min_lr) / 2
    13: 0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)),
    14: 0.1, 15: 0.1, 100: 0.1,  # min_lr from max_steps on
}


@pytest.mark.parametrize("step", sorted(BY_HAND))
def test_schedule_matches_the_hand_worked_values(step):
    assert lr_at(step, SCHEDULE) == pytest.approx(BY_HAND[step], rel=1e-12)


def test_no_warmup_starts_at_the_peak():
    t = TrainConfig(learning_rate=2.0, min_lr=0.0, warmup_steps=0, max_steps=4)
    assert [lr_at(s, t) for s in range(5)] == pytest.approx([2.0, 1.0 + 2 ** -0.5, 1.0, 1.0 - 2 ** -0.5, 0.0])


def test_clip_scales_by_max_norm_over_norm_plus_1e_6():
    g = np.array([3.0, 4.0])  # norm 5
    assert clip_grad_norm(g, 1.0) == 5.0
    np.testing.assert_allclose(g, np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-14)
    small = np.array([0.3, 0.4])  # norm 0.5 < 1: left alone
    assert clip_grad_norm(small, 1.0) == pytest.approx(0.5)
    np.testing.assert_array_equal(small, [0.3, 0.4])


CFG = ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=11)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_optimizer_step_records_the_closed_form(dtype):
    params = init(CFG, np.random.default_rng(0), dtype)
    g = np.empty(params.size, dtype)
    METER.reset()
    zero_grad(g)
    g += np.random.default_rng(1).standard_normal(params.size).astype(dtype)  # a backward's sum
    with METER.in_phase("optimizer"):
        clip_grad_norm(g, 1.0)
        AdamW(params).step(g, 1e-3)
    predicted = closed_form.predict_training_step(CFG, 1, 1, dtype=dtype)
    predicted = {k: r for k, r in predicted.items() if k.phase == "optimizer"}
    assert METER.records.keys() == predicted.keys()
    for key, p in predicted.items():
        m = METER.records[key]
        assert (m.calls, m.flops, m.bytes_read, m.bytes_written) == (
            p.calls, p.flops, p.bytes_read, p.bytes_written), key


def test_adamw_defaults_are_the_trainers():
    opt = AdamW(FlatBuffer(CFG))
    t = TrainConfig()
    assert (opt.beta1, opt.beta2, opt.eps, opt.weight_decay) == (t.beta1, t.beta2, t.eps, t.weight_decay)


def test_the_cuda_path_passes_every_argument_in_the_kernels_order(monkeypatch):
    signature = inspect.signature(cuda_kernels.adamw_update)
    seen = {}

    def kernel(*args, **kwargs):
        seen.update(signature.bind(*args, **kwargs).arguments)

    monkeypatch.setattr(cuda_kernels, "active", lambda: True)
    monkeypatch.setattr(cuda_kernels, "adamw_update", kernel)
    params = FlatBuffer(CFG)
    opt = AdamW(params, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.05)
    g = np.ones(params.size, dtype=np.float32)
    opt.step(g, 0.01)
    opt.step(g, 0.02)
    assert seen["p"] is params.data and seen["g"] is g and seen["m"] is opt.m and seen["v"] is opt.v
    assert {k: seen[k] for k in ("n_decay", "lr", "beta1", "beta2", "eps", "weight_decay", "t")} == {
        "n_decay": params.n_decay, "lr": 0.02, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6,
        "weight_decay": 0.05, "t": 2}
