"""The sampler's distribution and generate's loop, which mutation testing (bench/mutation.py
sampling) found checked only through their samples.

sample_next draws with rng.choice(V, p=p); a recording rng captures p, which is compared with the
distribution worked by hand: softmax(logits / temperature), then top-k (every logit below the
k-th largest dropped; ties with it kept, as Hugging Face's top-k does), then top-p (the nucleus:
the fewest likeliest tokens whose mass reaches top_p), renormalised.
"""

import math

import numpy as np
import pytest

from minigpt import config, sampling
from minigpt.api import Model
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn.model import KVCache
from minigpt.sampling import generate, sample_next


class RecordingRng:
    """Stands in for a numpy Generator: remembers the distribution and returns `pick`."""

    def __init__(self, pick: int = 0):
        self.pick, self.p = pick, None

    def choice(self, n, p):
        assert n == p.size
        self.p = p.copy()
        return self.pick


def distribution(logits, **kwargs) -> np.ndarray:
    rng = RecordingRng()
    sample_next(np.asarray(logits, dtype=getattr(logits, "dtype", np.float64)), rng=rng, **kwargs)
    return rng.p


# p proportional to 1, 2, 4: logits 0, ln 2, ln 4
LOGITS = [0.0, math.log(2), math.log(4)]


def test_temperature_one_is_the_softmax():
    np.testing.assert_allclose(distribution(LOGITS), [1 / 7, 2 / 7, 4 / 7], rtol=1e-6)


def test_temperature_divides_the_logits():
    s = 1 + math.sqrt(2) + 2  # temperature 2: p proportional to 1, sqrt 2, 2
    np.testing.assert_allclose(distribution(LOGITS, temperature=2.0), [1 / s, math.sqrt(2) / s, 2 / s],
                               rtol=1e-6)
    np.testing.assert_allclose(distribution(LOGITS, temperature=0.5), [1 / 21, 4 / 21, 16 / 21],
                               rtol=1e-6)


def test_large_logits_do_not_overflow():
    np.testing.assert_allclose(distribution([1000.0, 1000.0 + math.log(3)]), [0.25, 0.75], rtol=1e-6)


@pytest.mark.parametrize("k, expected", [
    (1, [0, 0, 1]), (2, [0, 1 / 3, 2 / 3]),
    (3, [1 / 7, 2 / 7, 4 / 7]), (4, [1 / 7, 2 / 7, 4 / 7]), (0, [1 / 7, 2 / 7, 4 / 7]),  # no limit
])
def test_top_k_keeps_the_k_likeliest(k, expected):
    np.testing.assert_allclose(distribution(LOGITS, top_k=k), expected, rtol=1e-6, atol=0)


def test_top_k_on_unsorted_logits():
    z = np.random.default_rng(0).permutation(40).astype(np.float64)
    p = distribution(z, top_k=5)
    assert set(np.flatnonzero(p)) == set(np.flatnonzero(z >= 35))
    # a longer draw, where partitioning around the wrong index finds another "k-th largest"
    r = np.random.default_rng(20)
    n = int(r.integers(3, 300))
    k = int(r.integers(1, n))
    z = r.standard_normal(n)
    assert set(np.flatnonzero(distribution(z, top_k=k))) == set(np.argsort(z)[-k:])


def test_top_p_one_truncates_nothing():
    # a token far below the rest: the mass ahead of it rounds to exactly 1.0, and it still stays
    assert distribution([0.0, 0.0, -50.0], top_p=1.0)[2] > 0


def test_float32_logits_are_sampled_in_float64():
    p = distribution(np.array(LOGITS, dtype=np.float32))
    assert p.dtype == np.float64


def test_top_k_keeps_ties_with_the_kth():
    np.testing.assert_allclose(distribution([1.0, 1.0, 0.0], top_k=1), [0.5, 0.5, 0.0], rtol=1e-6)


# p = 0.5, 0.25, 0.25 exactly (exp(z - max) = 1, 0.5, 0.5): the masses ahead are 0, 0.5, 0.75
HALVES = [math.log(2), 0.0, 0.0]


@pytest.mark.parametrize("top_p, expected", [
    (0.3, [1, 0, 0]), (0.5, [1, 0, 0]),  # 0.5 is reached by the first token alone
    (0.6, [2 / 3, 1 / 3, 0]), (0.75, [2 / 3, 1 / 3, 0]), (0.8, [0.5, 0.25, 0.25]),
    (1.0, [0.5, 0.25, 0.25]),
])
def test_top_p_keeps_the_fewest_tokens_that_reach_it(top_p, expected):
    np.testing.assert_allclose(distribution(HALVES, top_p=top_p), expected, rtol=1e-12, atol=0)


def test_top_p_ties_keep_the_lower_id_first():
    # equal probabilities: the stable order puts token 1 before token 2
    np.testing.assert_allclose(distribution(HALVES, top_p=0.7), [2 / 3, 1 / 3, 0], rtol=1e-12)


def test_top_k_then_top_p():
    # top-k 2 leaves 1/3, 2/3; then top-p 0.5 keeps the 2/3 alone
    np.testing.assert_allclose(distribution(LOGITS, top_k=2, top_p=0.5), [0, 0, 1], atol=0)


def test_greedy_takes_the_argmax_and_draws_nothing():
    rng = RecordingRng(pick=0)
    assert sample_next(np.array([0.1, 3.0, -2.0]), temperature=0, rng=rng) == 1
    assert rng.p is None


def test_the_drawn_index_is_returned_as_an_int():
    token = sample_next(np.array(LOGITS), rng=RecordingRng(pick=2))
    assert token == 2 and type(token) is int


# --------------------------------------------------------------------------- generate's loop

SMALL = {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8}


def small_model() -> Model:
    cfg = config.load(None, [f"model.{k}={v}" for k, v in SMALL.items()])
    return Model.from_config(cfg, seed=0, dtype="float64")


def recorded_run(monkeypatch, gpt, prompt, n, **kwargs):
    """generate with sample_next replaced: it records the logits and temperature it is given and
    picks tokens 3, 4, 5, ... in turn. Returns (new tokens, [(logits, temperature)])."""
    seen = []

    def pick(logits, temperature, top_k, top_p, rng):
        seen.append((np.array(logits, dtype=np.float64), temperature))
        return 3 + len(seen) - 1

    monkeypatch.setattr(sampling, "sample_next", pick)
    return generate(gpt, prompt, n, **kwargs).tokens.tolist(), seen


def test_each_step_sees_the_full_forward_logits_and_the_cache_restarts_at_half(monkeypatch):
    """Every step's logits are those of a fresh forward over the tokens in the cache; past
    block_size the cache restarts from the last block_size // 2 tokens."""
    gpt = small_model().gpt
    B = SMALL["block_size"]
    prompt = [5, 6, 7, 8, 9]
    new, seen = recorded_run(monkeypatch, gpt, prompt, 2 * B)
    assert new == list(range(3, 3 + 2 * B))
    ids, length = list(prompt), len(prompt)  # tokens in the cache
    for logits, temperature in seen:
        if length > B:  # the last step filled the cache: rebuilt from the last B // 2 tokens
            length = B // 2
        full = gpt.logits(np.array([ids[-length:]]))[0, -1]
        np.testing.assert_allclose(logits, full, rtol=1e-9, atol=1e-12)
        assert temperature == 1.0  # the default
        ids.append(3 + len(ids) - len(prompt))
        length += 1


def test_n_tokens_limits_the_ids_sampled(monkeypatch):
    gpt = small_model().gpt
    _, seen = recorded_run(monkeypatch, gpt, [1, 2, 3], 2, n_tokens=7)
    assert [logits.shape for logits, _ in seen] == [(7,), (7,)]


def test_prefills_compute_only_the_last_positions_logits():
    """Both prefills, the prompt's and the rebuilt cache's (block_size // 2 tokens), record what
    the closed form predicts for a prefill: the LM head on the last position only."""
    gpt = small_model().gpt
    METER.reset()
    generate(gpt, [1, 2, 3, 4], 6, temperature=0)  # the 5th token fills the cache: one rebuild
    predicted = {}
    for T in (4, SMALL["block_size"] // 2):
        for key, r in closed_form.predict_forward(gpt.cfg, 1, T, phase="prefill",
                                                  dtype="float64").items():
            predicted[key] = predicted.get(key, 0) + r.flops
    measured = {k: r.flops for k, r in METER.records.items() if k.phase == "prefill"}
    assert measured == predicted


def test_on_token_streams_every_new_token_in_order():
    gpt = small_model().gpt
    seen = []
    new = generate(gpt, [1, 2, 3], 4, temperature=0, on_token=seen.append).tokens
    assert seen == new.tolist() and len(seen) == 4 and new.dtype == np.int64


def test_prompts_of_one_token_to_block_size_are_taken():
    gpt = small_model().gpt
    assert generate(gpt, [3], 2, temperature=0).tokens.shape == (2,)
    assert generate(gpt, list(range(SMALL["block_size"])), 2, temperature=0).tokens.shape == (2,)
    for bad in ([], list(range(SMALL["block_size"] + 1))):
        with pytest.raises(AssertionError, match="^the caller trims the prompt to block_size$"):
            generate(gpt, bad, 1)


def test_no_decode_step_after_the_last_token(monkeypatch):
    gpt = small_model().gpt
    calls = []
    real = gpt.logits
    monkeypatch.setattr(gpt, "logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    generate(gpt, [1, 2], 3, temperature=0)
    assert len(calls) == 3  # the prefill and two decode steps: the third token needs no forward


@pytest.mark.parametrize("kv_int8", [False, True])
def test_every_cache_has_the_models_dtype_and_the_asked_width(monkeypatch, kv_int8):
    cfg = config.load(None, [f"model.{k}={v}" for k, v in SMALL.items()])
    gpt = Model.from_config(cfg, seed=0, dtype="float32").gpt
    made = []
    real = KVCache.__init__

    def spy(self, cfg, batch, dtype="float32", int8=False):
        made.append((batch, str(np.dtype(dtype)), int8))
        real(self, cfg, batch, dtype, int8=int8)

    monkeypatch.setattr(KVCache, "__init__", spy)
    generate(gpt, [1, 2], 2 * SMALL["block_size"], temperature=0, kv_int8=kv_int8)
    assert len(made) >= 2 and set(made) == {(1, "float32", kv_int8)}  # the first and the rebuilt
