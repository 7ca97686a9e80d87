"""The sampler's distribution against exact expectations on small logits: temperature, then top-k,
then top-p (nucleus), each away from its extremes and all three together.

The logits are log(w) for weights w = (1, 2, 3, 4), so every expectation is a fraction: at
temperature t the probabilities are w^(1/t) / sum(w^(1/t)); top-k keeps the k largest; top-p keeps
the likeliest tokens until the mass ahead of the next one reaches p (the likeliest always stays).
Two ways to look: the probabilities sample_next hands to the generator's choice (exact), and the
counts of many draws with a fixed seed (within 5 binomial standard deviations), which holds
whatever way the sampler draws.
"""

import math

import numpy as np
import pytest

from minigpt.sampling import BLOCK, draw, sample_next

W = np.array([1.0, 2.0, 3.0, 4.0])
LOGITS = np.log(W)
DRAWS = 5000


class Recorder:
    """A stand-in generator: choice(n, p=p) keeps p and returns the likeliest id."""

    def choice(self, n, p):
        self.p = np.array(p, dtype=np.float64)
        assert self.p.shape == (n,)
        return int(np.argmax(self.p))


def probabilities(**kw) -> np.ndarray:
    rec = Recorder()
    sample_next(LOGITS.copy(), rng=rec, **kw)
    return rec.p


# (sampler arguments, the exact probabilities of ids 0..3)
CASES = [
    ({"temperature": 1.0}, [1 / 10, 2 / 10, 3 / 10, 4 / 10]),
    ({"temperature": 0.5}, [1 / 30, 4 / 30, 9 / 30, 16 / 30]),  # w^2 = 1, 4, 9, 16
    ({"temperature": 2.0}, np.sqrt(W) / np.sqrt(W).sum()),  # w^(1/2)
    ({"top_k": 2}, [0, 0, 3 / 7, 4 / 7]),
    ({"top_k": 3}, [0, 2 / 9, 3 / 9, 4 / 9]),
    ({"top_k": 4}, [1 / 10, 2 / 10, 3 / 10, 4 / 10]),  # k = V: nothing removed
    # mass ahead of ids 3, 2, 1, 0: 0, 0.4, 0.7, 0.9
    ({"top_p": 0.5}, [0, 0, 3 / 7, 4 / 7]),  # 0.4 < 0.5 keeps id 2; 0.7 drops id 1
    ({"top_p": 0.75}, [0, 2 / 9, 3 / 9, 4 / 9]),  # 0.7 < 0.75 keeps id 1
    ({"top_p": 0.3}, [0, 0, 0, 1]),  # only the likeliest
    ({"top_p": 0.95}, [1 / 10, 2 / 10, 3 / 10, 4 / 10]),  # 0.9 < 0.95: all four
    # temperature 0.5, then top 3 of 1, 4, 9, 16: 4, 9, 16 (/29)
    ({"temperature": 0.5, "top_k": 3}, [0, 4 / 29, 9 / 29, 16 / 29]),
    # temperature 2, then top 3 of sqrt(w), then top-p 0.6: the mass ahead of id 2 is
    # 2 / (sqrt 2 + sqrt 3 + 2) = 0.389 < 0.6, of id 1 0.725: ids 2 and 3, as sqrt 3 : 2
    ({"temperature": 2.0, "top_k": 3, "top_p": 0.6},
     [0, 0, math.sqrt(3) / (math.sqrt(3) + 2), 2 / (math.sqrt(3) + 2)]),
]
IDS = [",".join(f"{k}={v}" for k, v in kw.items()) for kw, _ in CASES]


@pytest.mark.parametrize(("kw", "expected"), CASES, ids=IDS)
def test_the_filtered_probabilities_are_exact(kw, expected):
    np.testing.assert_allclose(probabilities(**kw), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("kw", "expected"), [CASES[1], CASES[3], CASES[7], CASES[-1]],
                         ids=[IDS[1], IDS[3], IDS[7], IDS[-1]])
def test_many_draws_follow_the_expected_distribution(kw, expected):
    """DRAWS draws with a fixed seed: each id's count within 5 binomial standard deviations of
    DRAWS * p (a chance of about 6e-7 per id to fall outside for a correct sampler), and an id
    with p = 0 never drawn."""
    rng = np.random.default_rng(1234)
    counts = np.bincount([sample_next(LOGITS.copy(), rng=rng, **kw) for _ in range(DRAWS)],
                         minlength=W.size)
    p = np.asarray(expected, dtype=np.float64)
    sigma = np.sqrt(DRAWS * p * (1 - p))
    assert (np.abs(counts - DRAWS * p) <= 5 * sigma).all(), (counts, DRAWS * p, sigma)
    assert (counts[p == 0] == 0).all()


def test_temperature_zero_is_the_argmax_without_drawing():
    class NoDraw:
        def choice(self, n, p):
            raise AssertionError("temperature 0 must not draw")

    assert sample_next(LOGITS.copy(), temperature=0, rng=NoDraw()) == 3
    assert sample_next(LOGITS[::-1].copy(), temperature=0, top_k=2, rng=NoDraw()) == 0


def test_a_generators_draw_is_the_token_its_choice_would_give():
    """sampling.draw takes a Generator's choice without choice's checks: the same token from the
    same generator state, draw after draw."""
    from minigpt.sampling import draw

    p = np.random.default_rng(1).random(50257)
    p[::7] = 0.0  # tokens filtered out are never drawn
    p /= p.sum()
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    drawn = [draw(a, p) for _ in range(3000)]
    assert drawn == [int(b.choice(p.size, p=p)) for _ in range(3000)]
    assert all(p[t] > 0 for t in drawn)


class FixedUniform(np.random.Generator):
    """A Generator whose uniforms are chosen: draw's edges, u = 0 and the largest u below 1."""

    def __init__(self, u):
        super().__init__(np.random.PCG64(0))
        self.u = u

    def random(self, *args, **kwargs):
        return self.u


def spread_weights() -> np.ndarray:
    """Weights over several of draw's blocks, the last one partial, with zeros between."""
    w = np.zeros(3 * BLOCK + 17)
    w[[0, BLOCK - 1, BLOCK, 2 * BLOCK + 5, 3 * BLOCK + 16]] = [1.0, 2.0, 3.0, 4.0, 5.0]
    return w


def test_draw_across_blocks_follows_the_weights():
    """Indices in different blocks (one at each side of a block's edge, one in the partial last
    block): counts within 5 binomial standard deviations, and no zero-weight index ever drawn."""
    w = spread_weights()
    rng = np.random.default_rng(7)
    counts = np.bincount([draw(rng, w) for _ in range(DRAWS)], minlength=w.size)
    p = w / w.sum()
    sigma = np.sqrt(DRAWS * p * (1 - p))
    assert (np.abs(counts - DRAWS * p) <= 5 * sigma).all()
    assert counts[w == 0].sum() == 0


def test_draw_at_its_uniforms_edges_returns_the_first_and_last_weighted_index():
    w = spread_weights()
    assert draw(FixedUniform(0.0), w) == 0
    assert draw(FixedUniform(np.nextafter(1.0, 0.0)), w) == 3 * BLOCK + 16
    w[-1] = 0.0  # the last block now weightless: u near 1 lands on the last weighted index
    assert draw(FixedUniform(np.nextafter(1.0, 0.0)), w) == 2 * BLOCK + 5
    # u exactly at a cumulative boundary: ids 0 and BLOCK - 1 hold 3 of the 8: the next id's turn
    w = np.zeros(BLOCK + 1)
    w[[0, BLOCK - 1, BLOCK]] = [1.0, 2.0, 5.0]
    assert draw(FixedUniform(3.0 / 8.0), w) == BLOCK


def test_the_float32_softmax_draw_matches_the_float64_probabilities():
    """The Generator path without filters (fast_softmax_draw) draws from the same softmax as the
    float64 path the recorders see: over 50,257 logits of GPT-2's spread, a uniform on a grid
    lands on the same token in both (inverse CDFs within float32's rounding)."""
    z = np.random.default_rng(3).normal(0.0, 3.0, 50257).astype(np.float32)
    p = np.exp((z.astype(np.float64) - z.max()) / 0.7)
    cdf = np.cumsum(p / p.sum())
    for u in np.linspace(0.001, 0.999, 41):
        expected = int(cdf.searchsorted(u, side="right"))
        got = sample_next(z, temperature=0.7, rng=FixedUniform(u))
        near_an_edge = min(abs(cdf[expected] - u), abs(cdf[expected - 1] - u)) <= 1e-5
        assert got == expected or (near_an_edge and abs(got - expected) == 1)


def _full_sort_dropped(p, top_p):
    """top-p's dropped ids by a stable sort of all of p: the definition nucleus_dropped keeps."""
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    return np.sort(order[before >= top_p])


@pytest.mark.parametrize("V", [5, 64, 300, 50257])
@pytest.mark.parametrize("shape", ["peaked", "flat", "ties"])
def test_the_nucleus_is_the_full_sorts(V, shape):
    """nucleus_dropped sorts only the likeliest candidates (more when their mass falls short):
    the same ids dropped as a stable sort of every probability, ties by the lower id, whether the
    nucleus is a few tokens or most of the vocabulary."""
    from minigpt.sampling import nucleus_dropped

    rng = np.random.default_rng(V)
    for trial in range(6):
        z = rng.standard_normal(V) * {"peaked": 4.0, "flat": 0.05, "ties": 1.0}[shape]
        if shape == "ties":
            z = np.round(z * 2) / 2  # a few distinct values, each shared by many ids
        p = np.exp(z - z.max())
        p /= p.sum()
        for top_p in (1e-9, 0.3, 0.9, 0.95, 0.999):
            np.testing.assert_array_equal(np.flatnonzero(nucleus_dropped(p, top_p)), _full_sort_dropped(p, top_p))


def test_the_sampling_bench_times_every_setting():
    """bench/sampling.py: one row a setting, the full-sort comparison last, all timed."""
    import argparse
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "sampling.py"
    spec = importlib.util.spec_from_file_location("bench_sampling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from minigpt import sampling

    kept = sampling.nucleus_dropped
    rows = bench.measure(argparse.Namespace(run=None, vocab=3000, calls=3, rounds=1))
    assert [r["setting"] for r in rows] == [s[0] for s in bench.SETTINGS] + ["top-p 0.95, t 0.8, full sort"]
    assert all(r["us_per_call"] > 0 for r in rows)
    assert sampling.nucleus_dropped is kept  # the comparison put the sampler back
