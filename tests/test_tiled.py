"""The tiled float32 product of a batched decode step (minigpt/kernels/tiles.py, nn/tiled.py):
the kernel against float64 products for every row count its register blocks split into, any
width (whole tiles and the channels left over), its independence from the thread count; a
prepared model's decode steps against an unprepared one's, record for record."""

import numpy as np
import pytest

from minigpt import config, kernels
from minigpt.api import Model
from minigpt.counting.meter import METER
from minigpt.nn import tiled
from minigpt.nn.model import KVCache

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


def _within_rounding(out, x, w):
    """Each output within K float32 roundings of its magnitude sum: any order of summation, and
    no more (a dropped, doubled or misplaced term is a whole term off)."""
    ref = x.astype(np.float64) @ w.astype(np.float64)
    bound = x.shape[1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))
    return np.all(np.abs(out - ref) <= bound)


@pytest.mark.parametrize("K, M", [(768, 2304), (40, 120), (3, 7), (17, 33), (64, 32), (5, 95)])
def test_the_kernel_equals_the_product_for_every_row_count(K, M):
    from minigpt.kernels import tiles

    rng = np.random.default_rng(K * M)
    w = rng.standard_normal((K, M), dtype=np.float32)
    t, rest = tiles.pack(w)
    assert t.shape == (M // 32, K, 32) and rest.shape == (K, M % 32)
    assert t.nbytes + rest.nbytes == w.nbytes  # nothing padded
    for N in list(range(1, 18)) + [23, 32, 40]:  # every mix of the 8-, 4-, 2- and 1-row blocks
        x = rng.standard_normal((N, K), dtype=np.float32)
        out = tiles.product(x, t, rest)
        assert out.shape == (N, M) and out.dtype == np.float32
        assert _within_rounding(out, x, w), (K, M, N)


def test_a_transposed_weight_tiles_as_its_values():
    """The LM head tiles wte.T, a transposed view."""
    from minigpt.kernels import tiles

    rng = np.random.default_rng(3)
    wte = rng.standard_normal((100, 48), dtype=np.float32)
    x = rng.standard_normal((5, 48), dtype=np.float32)
    assert _within_rounding(tiles.product(x, *tiles.pack(wte.T)), x, wte.T)


def test_the_result_does_not_depend_on_the_thread_count():
    from minigpt.kernels import quant, tiles

    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 1000), dtype=np.float32)
    x = rng.standard_normal((8, 96), dtype=np.float32)
    packed = tiles.pack(w)
    with quant.threads(1):
        one = tiles.product(x, *packed)
    with quant.threads(2):
        two = tiles.product(x, *packed)
    assert np.array_equal(one, two)


def _model():
    overrides = ["model.n_layer=2", "model.n_embd=40", "model.n_head=4", "model.block_size=24"]
    return Model.from_config(config.load(None, overrides), seed=0).gpt


def _decode(gpt, batch, steps=3):
    rng = np.random.default_rng(7)
    caches = [KVCache(gpt.cfg, 1, "float32") for _ in range(batch)]
    for kv in caches:
        gpt.logits(rng.integers(0, 256, (1, 5)), kv, last_only=True)
    tokens = np.arange(batch) + 3
    METER.reset()
    outs = []
    with METER.in_phase("decode"):
        for _ in range(steps):
            outs.append(gpt.decode_step(tokens, caches))
            tokens = outs[-1].argmax(axis=-1)
    return np.stack(outs), dict(METER.records)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_a_prepared_model_decodes_as_an_unprepared_one_with_the_same_records(batch, monkeypatch):
    kernels.use("numba")  # conftest puts NumPy's path back after the test
    from minigpt.nn import compiled

    monkeypatch.setattr(compiled, "ENABLED", False)  # the Python step's calls (the compiled one's: test_step.py)
    plain, prepared = _model(), _model()
    prepared.prepare_decode()
    assert isinstance(prepared.decode_params(0)["mlp.c_fc.weight"], tiled.TiledWeight)
    calls = []
    from minigpt.kernels import tiles

    real = tiles.product
    monkeypatch.setattr(tiles, "product", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    ref, ref_records = _decode(plain, batch)
    assert not calls  # unprepared: NumPy's products
    out, records = _decode(prepared, batch)
    # each prefill's head (its last row), then the four weights of each block and the head in
    # every decode step
    assert calls == [1] * batch + [batch] * 3 * (4 * 2 + 1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
    assert records.keys() == ref_records.keys()
    for k, r in records.items():
        assert [getattr(r, f) for f in FIELDS] == [getattr(ref_records[k], f) for f in FIELDS], k


def test_a_backward_pass_drops_the_tiles_and_trains_on_the_weights():
    kernels.use("numba")
    gpt = _model()
    gpt.prepare_decode()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 256, (2, 6))
    _, cache = gpt.loss(idx, rng.integers(0, 256, (2, 6)))
    gpt.backward(cache)
    assert gpt._tiled is None and gpt._head is None
    assert "mlp.c_fc.weight" in gpt.decode_params(0) and not isinstance(
        gpt.decode_params(0)["mlp.c_fc.weight"], tiled.TiledWeight)
    assert np.abs(gpt.grads.data).sum() > 0


def test_numpys_path_runs_numpys_product_with_the_same_record(monkeypatch):
    """A tiled weight on NumPy's path (--kernels numpy) or with float64 rows: np.matmul on the
    weight itself, recorded as the kernel's product is."""
    from minigpt.kernels import tiles

    monkeypatch.setattr(tiles, "product", lambda *a: pytest.fail("the kernel ran"))
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 70), dtype=np.float32)
    tw = tiled.TiledWeight(w, *tiles.pack(w))
    x = rng.standard_normal((40, 24), dtype=np.float32)
    METER.reset()
    np.testing.assert_array_equal(tiled.product(x, tw), x @ w)
    (record,) = METER.records.values()
    assert record.flops == 2 * x.shape[0] * 24 * 70 and record.bytes_read == x.nbytes + w.nbytes
    kernels.use("numba")
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(tiled.product(x64, tw), x64 @ w)


def test_a_second_process_loads_the_decode_kernels_from_numbas_cache(tmp_path):
    """kernels/tiles.py builds its kernels in closures, and Numba's disk cache finds a kernel by
    a hash of its pickled closure: with a random uuid in each intrinsic's pickle and llvmlite's
    types caching their text once used, every process compiled them again (the 4-bit kernel
    1.7 s before its first product) and wrote one more cache file. A second process, same
    cache folder, loads every kernel it runs and saves none."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = ("import numpy as np; from minigpt import kernels; kernels.use('numba')\n"
              "from minigpt.kernels import tiles; from minigpt.nn import lowbit\n"
              "x = np.ones((3, 64), np.float32)\n"
              "for bits in (16, 8, 4): lowbit.product(x, lowbit.quantize(np.ones((64, 70), np.float32), bits))\n"
              "tiles.product(x, *tiles.pack(np.ones((64, 70), np.float32)))\n")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DEBUG_CACHE": "1"}

    def run():
        out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300, check=True).stdout
        return [line for line in out.splitlines() if "tiles._build" in line and "data " in line]

    first = run()
    assert first and all("data saved" in line for line in first)
    second = run()
    assert len(second) == len(first) and all("data loaded" in line for line in second), second
