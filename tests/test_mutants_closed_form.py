"""The closed-form cost model where mutation testing (bench/mutation.py closed_form) found it
unchecked: the general forward_records and backward_records (scale/work.py's only use of them
sums their FLOPs), balanced routing under a capacity, whole-number ring allreduces, the dtype of
the loss allreduce, and integer counts.

The references: the meter's records of the same pass run on a real model (key by key, every
field), and numbers worked out by hand from the docstrings' formulas.
"""

import numpy as np
import pytest

from minigpt.config import ModelConfig
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import accumulate, update

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
CFG = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=10, vocab_size=13)
MOE = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=10, vocab_size=13, n_experts=3,
                  experts_per_token=2, moe_every=2)


def _same(predicted: dict, measured: dict) -> None:
    assert predicted.keys() == measured.keys()
    for key, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(measured[key], f) for f in FIELDS], key


def _model(cfg):
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    return model


IDX = np.random.default_rng(1).integers(0, 13, (2, 10))


def test_forward_records_default_to_a_fresh_forward_of_every_position():
    model = _model(CFG)
    METER.reset()
    model.logits(IDX[:, :6])
    _same(closed_form.forward_records(CFG, 2, 6), METER.records)


def test_forward_records_after_cached_positions_and_of_the_last_position():
    model = _model(CFG)
    kv = KVCache(CFG, 2)
    model.logits(IDX[:, :4], kv)
    METER.reset()
    model.logits(IDX[:, 4:7], kv, last_only=True)
    _same(closed_form.forward_records(CFG, 2, 3, pos0=4, last_only=True), METER.records)


@pytest.mark.parametrize("cfg", [CFG, MOE], ids=["dense", "moe"])
def test_forward_and_backward_records_of_a_training_pass(cfg):
    model = _model(cfg)
    METER.reset()
    _, cache = model.loss(IDX[:, :7], IDX[:, 1:8])
    routing = {i: r.computed for i, r in model.routing.items()} or None
    _same(closed_form.forward_records(cfg, 2, 7, targets=True, routing=routing), METER.records)
    METER.reset()
    with METER.in_phase("backward"):
        model.backward(cache)
    _same(closed_form.backward_records(cfg, 2, 7, routing=routing), METER.records)


def test_every_predicted_count_is_an_integer():
    """Counts are whole numbers of FLOPs and bytes (a float rounds them past 2^53)."""
    records = closed_form.predict_training_step(MOE, 2, 7, grad_accum=2, ranks=2)
    records.update(closed_form.predict_decode(MOE, 2, 7))
    for key, r in records.items():
        assert all(type(getattr(r, f)) is int for f in FIELDS), key


def test_balanced_routing_spreads_the_assignments_and_caps_them():
    """10 tokens, 2 experts each, 3 experts: 20 assignments = 7 + 7 + 6. With capacity factor 0.9
    an expert takes at most ceil(0.9 * 10 * 2 / 3) = 6 tokens."""
    cfg = ModelConfig(n_experts=3, experts_per_token=2)
    assert closed_form.balanced_routing(cfg, 10) == [7, 7, 6]
    capped = ModelConfig(n_experts=3, experts_per_token=2, capacity_factor=0.9)
    assert closed_form.balanced_routing(capped, 10) == [6, 6, 6]
    roomy = ModelConfig(n_experts=3, experts_per_token=2, capacity_factor=1.5)  # cap 10
    assert closed_form.balanced_routing(roomy, 10) == [7, 7, 6]


def test_ring_allreduce_of_whole_bytes_rounds_down():
    """2 (N - 1) / N x the buffer, floored for whole numbers: 10 bytes over 3 ranks is 40 / 3."""
    assert closed_form.allreduce_bytes(10, 3) == 13
    assert type(closed_form.allreduce_bytes(10, 3)) is int
    assert closed_form.allreduce_flops(10, 3) == 6  # 20 / 3 additions, floored
    assert type(closed_form.allreduce_flops(10, 3)) is int


def test_the_loss_allreduce_is_float64_whatever_the_models_dtype():
    """The gradient buffer is summed at the model's dtype; the loss and the stop flag travel as two
    float64 numbers (minigpt.train.dist)."""
    records = closed_form.predict_training_step(CFG, 2, 7, ranks=2)
    comm = {(k.op, k.dtype): r for k, r in records.items() if k.phase == "communication"}
    P = closed_form.n_params(CFG)
    assert set(comm) == {("grad_sum", "float32"), ("loss_sum", "float64")}
    assert comm["grad_sum", "float32"].bytes_read == 2 * 1 * P * 4 // 2
    assert comm["loss_sum", "float64"].bytes_read == 2 * 1 * 16 // 2


def test_a_step_without_clipping_predicts_the_update_alone():
    """grad_clip = 0: no clip records, AdamW's update reads p, g, m, v and writes p, m, v, and the
    gradients' zeroing writes g."""
    model = _model(CFG)
    METER.reset()
    accumulate(model, [(IDX[:, :7], IDX[:, 1:8])], 1)
    update(model, AdamW(model.params), 1e-3, 0.0)
    predicted = closed_form.predict_training_step(CFG, 2, 7, clip=False)
    _same(predicted, METER.records)
    P = closed_form.n_params(CFG)
    optimizer = {k.kind: r for k, r in predicted.items() if k.phase == "optimizer"}
    assert sorted(optimizer) == ["adamw", "zero_grad"]
    assert (optimizer["adamw"].bytes_read, optimizer["adamw"].bytes_written) == (4 * P * 4, 3 * P * 4)
    assert (optimizer["zero_grad"].bytes_read, optimizer["zero_grad"].bytes_written) == (0, P * 4)


def test_backward_records_with_dropout_as_the_config_says():
    """backward_records follows cfg.dropout: with dropout on, the masks' backward passes too."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=10, vocab_size=13, dropout=0.5)
    model = _model(cfg)
    _, cache = model.loss(IDX[:, :7], IDX[:, 1:8], rng=np.random.default_rng(2))
    METER.reset()
    with METER.in_phase("backward"):
        model.backward(cache)
    _same(closed_form.backward_records(cfg, 2, 7), METER.records)
    assert any(k.kind == "dropout" for k in METER.records)
