"""Batched decode: GPT.decode_step over sequences with their own (ragged) KV caches against each
sequence decoded alone, its counts (each weight product once a step, attention once per
sequence), and sampling.generate_batch against generate."""

import numpy as np
import pytest

from minigpt import config, kernels, sampling
from minigpt.api import Model
from minigpt.counting.meter import METER
from minigpt.nn.model import KVCache

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 24}


def model(quantize=None, moe=False):
    overrides = [f"model.{k}={v}" for k, v in SMALL.items()]
    if moe:
        overrides += ["model.n_experts=4", "model.experts_per_token=2"]
    m = Model.from_config(config.load(None, overrides), seed=0)
    if quantize is not None:
        m.quantize(**quantize)
    return m


def prompts(lengths=(3, 7, 1, 12), seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=n) for n in lengths]


def prefilled(gpt, seqs, kv_int8=False):
    caches = [KVCache(gpt.cfg, 1, "float32", int8=kv_int8) for _ in seqs]
    for seq, kv in zip(seqs, caches):
        gpt.logits(seq[None], kv, last_only=True)
    return caches


VARIANTS = {
    "fp32": ({}, False),
    "w8a32": ({"quantize": {"mode": "w8a32", "quantize_embedding": True}}, False),
    "w8a8": ({"quantize": {"mode": "w8a8"}}, False),
    "int8 kv": ({"quantize": {"mode": "w8a32", "kv_int8": True}}, True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_batched_step_gives_each_sequence_its_own_logits(variant):
    kwargs, kv_int8 = VARIANTS[variant]
    gpt = model(**kwargs).gpt
    seqs = prompts()
    batched, alone = prefilled(gpt, seqs, kv_int8), prefilled(gpt, seqs, kv_int8)
    tokens = np.array([5, 9, 11, 200])
    for _ in range(5):
        out = gpt.decode_step(tokens, batched)
        ref = np.stack([gpt.logits(np.array([[t]]), kv)[0, -1] for t, kv in zip(tokens, alone)])
        assert out.shape == (4, 256) and out.dtype == np.float32
        # w8a8 quantizes each row's activations on its own, so batching changes nothing there
        assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
        assert [kv.length for kv in batched] == [kv.length for kv in alone]
        tokens = out.argmax(axis=-1)
    assert [kv.length for kv in batched] == [3 + 5, 7 + 5, 1 + 5, 12 + 5]


def test_a_batched_step_through_mixture_of_experts_blocks():
    gpt = model(moe=True).gpt
    seqs = prompts((4, 2))
    batched, alone = prefilled(gpt, seqs), prefilled(gpt, seqs)
    out = gpt.decode_step([7, 8], batched)
    ref = np.stack([gpt.logits(np.array([[t]]), kv)[0, -1] for t, kv in zip([7, 8], alone)])
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_a_batched_step_reads_each_weight_once_and_attends_per_sequence():
    gpt = model().gpt
    caches = prefilled(gpt, prompts())
    METER.reset()
    with METER.in_phase("decode"):
        gpt.decode_step([1, 2, 3, 4], caches)
    recs = {k: r for k, r in METER.records.items() if k.phase == "decode"}
    c_fc = [r for k, r in recs.items() if k.scope == "h0.mlp.c_fc" and k.kind == "matmul"]
    assert len(c_fc) == 1 and c_fc[0].calls == 1
    C = SMALL["n_embd"]
    assert c_fc[0].flops == 2 * 4 * C * 4 * C  # four rows in one product
    assert c_fc[0].bytes_read == 4 * (4 * C + C * 4 * C)  # the weight once, not four times
    head = [r for k, r in recs.items() if k.scope == "lm_head"]
    assert head[0].calls == 1 and head[0].flops == 2 * 4 * C * 256
    scores = [r for k, r in recs.items() if k.scope == "h1.attn.scores"]
    assert scores[0].calls == 4
    hs = C // SMALL["n_head"]
    keys = sum(n + 1 for n in (3, 7, 1, 12))  # each sequence's cached keys and its new one
    assert scores[0].flops == 2 * SMALL["n_head"] * keys * hs


def test_a_batched_step_refuses_what_it_cannot_decode():
    gpt = model().gpt
    caches = prefilled(gpt, prompts((3, 4)))
    with pytest.raises(ValueError, match="3 tokens for 2 caches"):
        gpt.decode_step([1, 2, 3], caches)
    full = prefilled(gpt, [np.zeros(SMALL["block_size"], dtype=np.int64)])
    with pytest.raises(ValueError, match="cache 1 is full"):
        gpt.decode_step([1, 2], [caches[0], full[0]])
    assert caches[0].length == 3  # nothing advanced


def test_a_copied_cache_decodes_on_its_own():
    gpt = model().gpt
    (kv,) = prefilled(gpt, prompts((5,)))
    twin = kv.copy()
    a = gpt.decode_step([3], [kv])
    b = gpt.decode_step([3], [twin])
    assert np.array_equal(a, b) and (kv.length, twin.length) == (6, 6)
    gpt.decode_step([9], [kv])
    assert (kv.length, twin.length) == (7, 6)
    assert not np.array_equal(kv.k[:, :, 6], twin.k[:, :, 6])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_batch_gives_each_sequence_what_generate_gives_it(temperature):
    gpt = model().gpt
    seqs = prompts((3, 20, 3))  # 40 new tokens: every sequence's cache fills and is rebuilt
    seen = []
    gens = sampling.generate_batch(gpt, seqs, 40, temperature=temperature, top_k=50, seed=3,
                                   on_token=lambda b, t: seen.append((b, t)))
    for b, seq in enumerate(seqs):
        alone = sampling.generate(gpt, seq, 40, temperature=temperature, top_k=50, seed=3 + b)
        assert gens[b].to_json() == alone.to_json()  # the tokens and the schedule
        assert gens[b].rebuilds >= 1
        assert [t for i, t in seen if i == b] == gens[b].tokens.tolist()
    if temperature:
        assert not np.array_equal(gens[0].tokens, gens[2].tokens)  # one prompt, two samples


def test_generate_batch_counts_one_decode_pass_per_step_for_all_sequences():
    gpt = model().gpt
    METER.reset()
    gens = sampling.generate_batch(gpt, prompts((3, 5)), 10, temperature=0)
    passes = {ph: sum(r.calls for k, r in METER.records.items() if k.scope == "lm_head" and k.phase == ph)
              for ph in ("prefill", "decode")}
    assert passes == {"prefill": 2, "decode": 9}
    assert [g.decode_steps for g in gens] == [9, 9]


def test_prepare_decode_keeps_the_logits_and_a_training_step_drops_its_copy():
    """prepare_decode lays the LM head's weight out row-major: the same logits to float32
    rounding; a backward pass drops the copy, so the step's update shows in the next logits."""
    from minigpt.nn.model import GPT
    from minigpt.nn.params import FlatBuffer
    from minigpt.train.optim import AdamW
    from minigpt.train.trainer import accumulate, update

    gpt = model().gpt
    x, y = np.stack(prompts((8, 8), seed=3)), np.stack(prompts((8, 8), seed=4))
    before = gpt.logits(x)
    gpt.prepare_decode()
    np.testing.assert_allclose(gpt.logits(x), before, rtol=1e-5, atol=1e-6)
    gpt.grads = FlatBuffer(gpt.cfg)
    accumulate(gpt, [(x, y)], 1)
    update(gpt, AdamW(gpt.params), 1e-2, 1.0)
    fresh = GPT(gpt.cfg, gpt.params)  # the updated weights, no copy
    assert np.abs(fresh.logits(x) - before).max() > 1e-3  # the update changed the logits
    np.testing.assert_allclose(gpt.logits(x), fresh.logits(x), rtol=1e-6, atol=1e-7)


EXTEND_VARIANTS = {k: VARIANTS[k] for k in ("fp32", "w8a32", "int8 kv")}


@pytest.mark.parametrize("variant", list(EXTEND_VARIANTS))
def test_an_extend_step_gives_each_sequence_what_its_own_forward_gives(variant):
    """Prompts into fresh caches and decode tokens into filled ones, in one extend_step: each
    sequence's last logits, and then its cache (a decode step after it), as if run alone."""
    kwargs, kv_int8 = EXTEND_VARIANTS[variant]
    gpt = model(**kwargs).gpt
    filled = prompts((3, 9))
    new = prompts((5, 1, 11), seed=2)
    caches = prefilled(gpt, filled, kv_int8) + [KVCache(gpt.cfg, 1, "float32", int8=kv_int8) for _ in new]
    alone = prefilled(gpt, filled, kv_int8) + [KVCache(gpt.cfg, 1, "float32", int8=kv_int8) for _ in new]
    lists = [np.array([17]), np.array([4, 250])] + new  # one decode token, two, and three prompts
    out = gpt.extend_step(lists, caches)
    ref = np.stack([gpt.logits(t[None], kv, last_only=True)[0, -1] for t, kv in zip(lists, alone)])
    assert out.shape == (5, 256)
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert [kv.length for kv in caches] == [4, 11, 5, 1, 11] == [kv.length for kv in alone]
    nxt = out.argmax(axis=-1)
    after = gpt.decode_step(nxt, caches)
    ref = np.stack([gpt.logits(np.array([[t]]), kv)[0, -1] for t, kv in zip(nxt, alone)])
    assert np.max(np.abs(after - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("schedule", ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    not kernels.AVAILABLE, reason="Numba is not installed"))])
def test_an_extend_step_counts_what_the_closed_form_predicts(schedule):
    """Record by record, in NumPy's passes and in the fused kernels' schedule (Numba: the
    LayerNorms, the residual add with ln_2 and c_fc's bias with the GELU, one pass each)."""
    from minigpt.counting import closed_form

    gpt = model().gpt
    caches = prefilled(gpt, prompts((3, 9))) + [KVCache(gpt.cfg, 1, "float32") for _ in range(2)]
    METER.reset()
    before = kernels.active()
    kernels.use(schedule)
    try:
        with METER.in_phase("prefill"):
            gpt.extend_step([[1], [2, 3], [4, 5, 6, 7], [8]], caches)
    finally:
        kernels.use(before)
    predicted = closed_form.predict_extend(gpt.cfg, [(3, 1), (9, 2), (0, 4), (0, 1)], phase="prefill",
                                           fused=schedule == "numba")
    fields = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
    assert predicted.keys() == METER.records.keys()
    for k, p in predicted.items():
        assert [getattr(p, f) for f in fields] == [getattr(METER.records[k], f) for f in fields], k
    c_fc = next(r for k, r in METER.records.items() if k.scope == "h0.mlp.c_fc" and k.kind == "matmul")
    C = SMALL["n_embd"]
    assert c_fc.calls == 1 and c_fc.flops == 2 * 8 * C * 4 * C  # all eight new rows in one product
    head = next(r for k, r in METER.records.items() if k.scope == "lm_head")
    assert head.flops == 2 * 4 * C * 256  # one row a sequence
    # one token a sequence is decode_step's step: the same records as predict_decode_batch's
    assert closed_form.predict_extend(gpt.cfg, [(3, 1), (5, 1)]).keys() == \
        closed_form.predict_decode_batch(gpt.cfg, [3, 5]).keys()


def test_an_extend_step_refuses_what_does_not_fit():
    gpt = model().gpt
    caches = prefilled(gpt, prompts((3, 20)))
    with pytest.raises(ValueError, match="cache 1 is full"):
        gpt.extend_step([[1], [1, 2, 3, 4, 5]], caches)
    with pytest.raises(ValueError, match="no new tokens"):
        gpt.extend_step([[1], []], caches)
    assert [kv.length for kv in caches] == [3, 20]  # nothing advanced
