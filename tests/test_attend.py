"""A batched decode step's attention in one call per operation (minigpt/kernels/attend.py, used by
nn/decode.py on the fused schedule): the three kernels against float64 attention over ragged
caches, the cache write and what they leave alone, their independence from the thread count; a
decode step through them against each sequence run alone, and its records against the closed
form's."""

import numpy as np
import pytest

from minigpt import config, kernels
from minigpt.api import Model
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn import decode, layers
from minigpt.nn.model import KVCache

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
L, TMAX, H, HS = 3, 20, 4, 8


def _caches(lengths, dtype, rng):
    """Per-sequence key and value arrays as KVCache holds them, (L, 1, Tmax, H, hs), filled with
    noise beyond what attention may read (a kernel reading past a length would show it)."""
    keys = [rng.standard_normal((L, 1, TMAX, H, HS)).astype(dtype) for _ in lengths]
    values = [rng.standard_normal((L, 1, TMAX, H, HS)).astype(dtype) for _ in lengths]
    return keys, values


def _reference(q, keys, values, layer, lengths):
    """Float64 attention of each sequence's query against its first lengths[b] positions."""
    out = []
    for b, n in enumerate(lengths):
        k = keys[b][layer, 0, :n].astype(np.float64)  # (n, H, hs)
        v = values[b][layer, 0, :n].astype(np.float64)
        s = np.stack([k[:, h] @ q[b, h].astype(np.float64) for h in range(H)]) / np.sqrt(HS)  # (H, n)
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(np.stack([p[h] @ v[:, h] for h in range(H)]))
    return np.stack(out)  # (B, H, hs)


def _attend(q, k_new, v_new, keys, values, layer, lengths, threads=1, parts=1):
    from numba.typed import List

    from minigpt.kernels import attend, quant

    kl, vl = List(keys), List(values)
    lengths = np.asarray(lengths, dtype=np.int64)
    att = np.full((len(keys), H, int(lengths.max())), np.nan, dtype=q.dtype)
    y = np.empty(q.shape, dtype=q.dtype)
    with quant.threads(threads):
        quant.on_threads(attend.scores, q, k_new, v_new, kl, vl, layer, lengths, att, parts)
        quant.on_threads(attend.softmax, att, lengths, 1.0 / np.sqrt(HS), q.dtype == np.float32)
        quant.on_threads(attend.mix, att, vl, layer, lengths, y, parts)
    return att, y


@pytest.mark.parametrize("parts", [1, 2, 3])  # each sequence's heads in parts (3: uneven runs of H = 4)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lengths", [[1], [5], [3, 9, 1, 20], [7, 7]])
def test_the_kernels_attend_each_sequence_to_its_own_length(lengths, dtype, parts):
    rng = np.random.default_rng(len(lengths) * 100 + lengths[0])
    keys, values = _caches(lengths, dtype, rng)
    before_k, before_v = [k.copy() for k in keys], [v.copy() for v in values]
    B, layer = len(lengths), 1
    q, k_new, v_new = (rng.standard_normal((B, H, HS)).astype(dtype) for _ in range(3))
    att, y = _attend(q, k_new, v_new, keys, values, layer, lengths, threads=2, parts=parts)
    for b, n in enumerate(lengths):
        # the new key and value land at the last position of this layer and nowhere else
        np.testing.assert_array_equal(keys[b][layer, 0, n - 1], k_new[b])
        np.testing.assert_array_equal(values[b][layer, 0, n - 1], v_new[b])
        changed = np.argwhere(keys[b] != before_k[b])[:, (0, 2)]
        assert set(map(tuple, changed)) <= {(layer, n - 1)}
        assert set(map(tuple, np.argwhere(values[b] != before_v[b])[:, (0, 2)])) <= {(layer, n - 1)}
        # each row a distribution over the sequence's own positions; the rest not written
        np.testing.assert_allclose(att[b, :, :n].sum(axis=1), 1.0, rtol=1e-5)
        assert np.isnan(att[b, :, n:]).all()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, _reference(q, keys, values, layer, lengths), rtol=tol, atol=tol)


def test_the_result_does_not_depend_on_the_thread_count():
    rng = np.random.default_rng(9)
    lengths = [4, 17, 2, 11, 20, 1]
    keys, values = _caches(lengths, np.float32, rng)
    q, k_new, v_new = (rng.standard_normal((len(lengths), H, HS)).astype(np.float32) for _ in range(3))
    _, one = _attend(q, k_new, v_new, keys, values, 2, lengths, threads=1)
    for threads, parts in ((2, 1), (2, 2), (1, 3)):  # the heads' parts change no sum's order
        _, other = _attend(q, k_new, v_new, keys, values, 2, lengths, threads=threads, parts=parts)
        np.testing.assert_array_equal(one, other)


def _model():
    overrides = ["model.n_layer=2", "model.n_embd=32", "model.n_head=4", "model.block_size=24"]
    return Model.from_config(config.load(None, overrides), seed=0).gpt


def _prefilled(gpt, lengths):
    rng = np.random.default_rng(1)
    caches = [KVCache(gpt.cfg, 1, "float32") for _ in lengths]
    for n, kv in zip(lengths, caches):
        gpt.logits(rng.integers(0, 256, (1, n)), kv, last_only=True)
    return caches


@pytest.mark.parametrize("parallel", [False, True])
def test_a_step_through_the_kernels_gives_each_sequence_its_own_logits(parallel, monkeypatch):
    """Ragged caches (3, 7, 1, 12 positions), five steps, on one thread and on every core."""
    kernels.use("numba")  # conftest puts NumPy's path back after the test
    monkeypatch.setattr(layers, "PARALLEL_KEY_BYTES", 0 if parallel else 1 << 40)
    gpt = _model()
    lengths = (3, 7, 1, 12)
    batched, alone = _prefilled(gpt, lengths), _prefilled(gpt, lengths)
    tokens = np.array([5, 9, 11, 200])
    for _ in range(5):
        assert decode._all_in_one_call(batched, [1] * 4)
        out = gpt.decode_step(tokens, batched)
        kernels.use("numpy")  # each sequence alone on NumPy's attention
        ref = np.stack([gpt.logits(np.array([[t]]), kv)[0, -1] for t, kv in zip(tokens, alone)])
        kernels.use("numba")
        assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
        tokens = out.argmax(axis=-1)
    for a, b in zip(batched, alone):
        assert a.length == b.length
        np.testing.assert_allclose(a.k[:, :, :a.length], b.k[:, :, :b.length], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.v[:, :, :a.length], b.v[:, :, :b.length], rtol=1e-5, atol=1e-6)


def test_a_step_through_the_kernels_counts_what_the_closed_form_predicts():
    kernels.use("numba")
    gpt = _model()
    lengths = (3, 7, 1, 12)
    caches = _prefilled(gpt, lengths)
    METER.reset()
    with METER.in_phase("decode"):
        gpt.decode_step([1, 2, 3, 4], caches)
    predicted = closed_form.predict_decode_batch(gpt.cfg, lengths, fused=True)
    assert predicted.keys() == METER.records.keys()
    for k, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(METER.records[k], f) for f in FIELDS], k
    scores = METER.records[next(k for k in METER.records if k.scope == "h1.attn.scores")]
    hs = 32 // 4
    assert scores.calls == 1 and scores.flops == 2 * 4 * hs * sum(n + 1 for n in lengths)
    # the same work as one call a sequence (NumPy's schedule), summed
    numpy_scores = closed_form.predict_decode_batch(gpt.cfg, lengths)
    r = next(v for k, v in numpy_scores.items() if k.scope == "h1.attn.scores")
    assert r.calls == 4 and [r.flops, r.bytes_read, r.bytes_written] == [
        scores.flops, scores.bytes_read, scores.bytes_written]


def test_a_paused_meter_records_nothing_from_the_kernels():
    kernels.use("numba")
    gpt = _model()
    caches = _prefilled(gpt, (3, 5))
    METER.reset()
    with METER.paused():
        gpt.decode_step([1, 2], caches)
    assert METER.records == {}


def test_an_int8_cache_or_several_new_tokens_attend_one_sequence_at_a_time():
    kernels.use("numba")
    gpt = _model()
    float_caches = _prefilled(gpt, (2, 3))
    int8_caches = [KVCache(gpt.cfg, 1, "float32", int8=True) for _ in range(2)]
    assert decode._all_in_one_call(float_caches, [1, 1])
    assert not decode._all_in_one_call(float_caches, [1, 2])
    assert not decode._all_in_one_call(int8_caches, [1, 1])
    kernels.use("numpy")
    assert not decode._all_in_one_call(float_caches, [1, 1])
