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

from minigpt import config
from minigpt.api import Model
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
    sample_next(np.array(logits, dtype=np.float64), rng=rng, **kwargs)
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


def full_forward_greedy(gpt, ids: list[int], n: int, n_tokens=None) -> list[int]:
    """n greedy tokens, each from a fresh forward over at most the last block_size ids."""
    ids, out = list(ids), []
    for _ in range(n):
        logits = gpt.logits(np.array([ids[-SMALL["block_size"]:]]))[0, -1, :n_tokens]
        out.append(int(np.argmax(logits)))
        ids.append(out[-1])
    return out


def test_on_token_streams_every_new_token_in_order():
    gpt = small_model().gpt
    seen = []
    new = generate(gpt, [1, 2, 3], 4, temperature=0, on_token=seen.append)
    assert seen == new.tolist() and len(seen) == 4 and new.dtype == np.int64


def test_n_tokens_limits_the_ids_sampled():
    gpt = small_model().gpt
    new = generate(gpt, [1, 2, 3], 5, temperature=0, n_tokens=7)
    assert new.tolist() == full_forward_greedy(gpt, [1, 2, 3], 5, n_tokens=7)
    sampled = generate(gpt, [1, 2, 3], 40, temperature=5.0, seed=0, n_tokens=3)
    assert set(sampled.tolist()) <= {0, 1, 2}


def test_the_cache_is_rebuilt_from_the_last_half_context(monkeypatch):
    """Past block_size the cache restarts from the last block_size // 2 tokens: the next token is
    the greedy one over exactly those (not over the last block_size)."""
    gpt = small_model().gpt
    B = SMALL["block_size"]
    prompt = [5, 6, 7, 8, 9]
    n = 2 * B
    new = generate(gpt, prompt, n, temperature=0).tolist()
    ids = list(prompt)
    expected = []
    length = len(prompt)  # tokens in the cache
    for _ in range(n):
        if length > B:  # the last step filled the cache: rebuild from the last B // 2
            length = B // 2
        context = ids[-length:]
        expected.append(int(np.argmax(gpt.logits(np.array([context]))[0, -1])))
        ids.append(expected[-1])
        length += 1
    assert new == expected


def test_no_decode_step_after_the_last_token(monkeypatch):
    gpt = small_model().gpt
    calls = []
    real = gpt.logits
    monkeypatch.setattr(gpt, "logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    generate(gpt, [1, 2], 3, temperature=0)
    assert len(calls) == 3  # the prefill and two decode steps: the third token needs no forward


def test_int8_kv_cache_is_used_when_asked(monkeypatch):
    made = []
    real = KVCache.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("int8"))
        real(self, *args, **kwargs)

    monkeypatch.setattr(KVCache, "__init__", spy)
    generate(small_model().gpt, [1, 2], 2, temperature=0, kv_int8=True)
    assert made == [True]
