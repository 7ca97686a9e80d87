"""Packed 16-, 8- and 4-bit weights: the Numba kernels against their NumPy twins (exactly where
the arithmetic is exact), the quantization's error bounds, and the meter's records of quantized and
batched decode steps against the closed form, for every bits x batch point."""

import itertools

import numpy as np
import pytest

from minigpt import config as config_mod
from minigpt import kernels
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError
from minigpt.kernels import quant as kq
from minigpt.kernels import tiles as kt
from minigpt.nn import lowbit, quant
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import init

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
FORMATS = [(16, "fp16"), (16, "bf16"), (8, "fp16"), (4, "fp16")]
needs_numba = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")


@pytest.fixture
def path():
    """Run a block under kernels.use(name) and restore the path that was active."""
    before = kernels.active()

    def run(name, fn, *args):
        kernels.use(name)
        try:
            return fn(*args)
        finally:
            kernels.use(before)

    return run


def _weight(K, M, seed=0, scale=0.05):
    return (np.random.default_rng(seed).standard_normal((K, M)) * scale).astype(np.float32)


@needs_numba
@pytest.mark.parametrize("bits, storage", FORMATS)
@pytest.mark.parametrize("N, K, M", [(1, 64, 300), (3, 96, 50), (8, 32, 256), (5, 128, 520)])
def test_each_kernel_equals_its_numpy_twin(path, bits, storage, N, K, M):
    w = lowbit.quantize(_weight(K, M), bits, 32, storage)
    x = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32)
    fast = path("numba", lowbit.product, x, w)
    twin = path("numpy", lowbit.product, x, w)
    assert fast.shape == twin.shape == (N, M) and fast.dtype == np.float32
    if bits == 4:  # integer sums, then the same float32 steps in the same order
        assert np.array_equal(fast, twin)
        return
    # float32 sums of K terms in two orders: a few ulps of the largest partial sum apart
    bound = 1e-6 * K * np.abs(x).max() * np.abs(w.dequantize()).max()
    assert np.max(np.abs(fast - twin)) <= bound


@needs_numba
@pytest.mark.parametrize("bits, storage", FORMATS)
@pytest.mark.parametrize("N, K, M", [(1, 64, 300), (3, 96, 50), (8, 32, 256), (13, 128, 520)])
def test_a_kernel_adds_the_bias_as_a_float32_add_after_it(path, bits, storage, N, K, M):
    """A linear layer's bias, added by the kernel to each tile's outputs (the last tile's real
    channels only): the product's result plus the bias, rounded once, on both paths; one record."""
    w = lowbit.quantize(_weight(K, M), bits, 32, storage)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, K)).astype(np.float32)
    b = rng.standard_normal(M).astype(np.float32)
    for name in ("numba", "numpy"):
        plain = path(name, lowbit.product, x, w)
        METER.reset()
        with_bias = path(name, lowbit.product, x, w, "x@w", b)
        assert np.array_equal(with_bias, plain + b), name
        (key, record), = METER.records.items()
        M_pad = w.data.shape[0] * w.data.shape[2]
        assert key.op == "x@w+b" and record.flops == 2 * N * K * M_pad + N * M
        assert record.bytes_read == x.nbytes + w.nbytes + b.nbytes and record.bytes_written == 4 * N * M


def _int4_values(w):
    """The 4-bit weight's integers q (K, M) in [-7, 7], from its nibble pairs."""
    return lowbit.int4_values(w.q).astype(np.int64)


@needs_numba
@pytest.mark.parametrize("bits, storage", FORMATS)
def test_a_kernel_reads_back_every_weight_exactly(path, bits, storage):
    """x = the identity: each output row is one input row of the weight, times 1 plus zeros, so
    the kernel's widening must give the dequantized weight bit for bit. At 4 bits the
    activations are rounded to int8: x = 127 times the identity has scale 1 and xq = 127, so each
    output is float32(127 q) times its scale, exactly."""
    K, M = 64, 300  # a padded last tile
    w = lowbit.quantize(_weight(K, M, seed=2), bits, 16, storage)
    if bits == 4:
        out = path("numba", lowbit.product, 127 * np.eye(K, dtype=np.float32), w)
        expected = (127 * _int4_values(w)).astype(np.float32) * np.repeat(w.scale, 16, axis=0)
        assert np.array_equal(out, expected)
        return
    out = path("numba", lowbit.product, np.eye(K, dtype=np.float32), w)
    assert np.array_equal(out, w.dequantize())


@needs_numba
@pytest.mark.parametrize("group", [2, 6, 8, 10, 48, 64])
def test_the_4_bit_kernel_takes_any_group_size(path, group):
    """A group of G inputs sums in chunks of kq.chunk(G) (2, 6, 8, 10, 24 and 32 here): each
    group size reads back every weight exactly and equals the twin."""
    K, M = 960, 270
    w = lowbit.quantize(_weight(K, M, seed=4), 4, group)
    out = path("numba", lowbit.product, 127 * np.eye(K, dtype=np.float32), w)
    expected = (127 * _int4_values(w)).astype(np.float32) * np.repeat(w.scale, group, axis=0)
    assert np.array_equal(out, expected)
    x = np.random.default_rng(5).standard_normal((3, K)).astype(np.float32)
    assert np.array_equal(path("numba", lowbit.product, x, w), path("numpy", lowbit.product, x, w))


@pytest.mark.parametrize("kernel_path", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_the_4_bit_sums_never_overflow_their_16_bit_lanes(path, kernel_path):
    """The largest sums a chunk can hold: every weight 7 (or -7) times every activation at 127
    over groups of 64, which sum in two chunks of 32 (28,448 each; one chunk of 64 would pass
    16 bits). Exact: 64 * 127 * 7 * scale * (1 / 127) per group, the scales powers of two."""
    K, M, G = 256, 40, 64
    w = np.full((K, M), 7.0 * 2.0 ** -6, np.float32)
    w[:, 1::2] *= -1
    pw = lowbit.quantize(w, 4, G)
    assert (_int4_values(pw) == np.where(np.arange(M) % 2, -7, 7)).all()
    x = np.full((2, K), 2.0 ** -3, np.float32)  # xs = 2**-3 / 127, xq = 127
    out = path(kernel_path, lowbit.product, x, pw)
    ref = x.astype(np.float64) @ pw.dequantize().astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert np.abs(out).max() == pytest.approx(K * 2.0 ** -3 * 7 * 2.0 ** -6, rel=1e-6)


@needs_numba
def test_the_4_bit_products_error_is_the_activations_rounding(path):
    """w4a8 against the float product of x and the dequantized weight: each input is off by at
    most half its group's activation step xs / 2, so an output by at most the sum over groups of
    xs / 2 times the group's |w|, plus float32 rounding."""
    K, M, G = 256, 300, 32
    w = lowbit.quantize(_weight(K, M, seed=8), 4, G)
    x = np.random.default_rng(9).standard_normal((4, K)).astype(np.float32)
    out = path("numba", lowbit.product, x, w)
    wd = w.dequantize().astype(np.float64)
    ref = x.astype(np.float64) @ wd
    xs = np.abs(x.reshape(4, K // G, G)).max(axis=2) / 127  # (4, K / G)
    per_group = np.abs(wd).reshape(K // G, G, M).sum(axis=1)  # (K / G, M)
    bound = (xs / 2) @ per_group + 1e-5 * np.abs(ref).max()
    assert (np.abs(out - ref) <= bound).all()
    assert np.abs(out - ref).max() > 0  # the activations were rounded: not the float product


@needs_numba
@pytest.mark.parametrize("bits, storage", [(8, "fp16"), (16, "fp16"), (16, "bf16")])
@pytest.mark.parametrize("K", [1, 33, 34])
def test_the_8_and_16_bit_kernels_take_odd_and_even_inputs(path, bits, storage, K):
    """The 8-bit kernel adds two input rows a pass and the last row alone when K is odd; at each K
    every kernel reads back every weight exactly and equals the twin."""
    w = lowbit.quantize(_weight(K, 270, seed=6), bits, 32, storage)
    assert np.array_equal(path("numba", lowbit.product, np.eye(K, dtype=np.float32), w), w.dequantize())
    x = np.random.default_rng(7).standard_normal((4, K)).astype(np.float32)
    fast = path("numba", lowbit.product, x, w)
    twin = path("numpy", lowbit.product, x, w)
    assert np.max(np.abs(fast - twin)) <= 1e-6 * K * np.abs(x).max() * np.abs(w.dequantize()).max()


@needs_numba
@pytest.mark.parametrize("storage", ["fp16", "bf16"])
def test_every_finite_16_bit_pattern_widens_exactly(path, storage):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    if storage == "fp16":
        value = bits.view(np.float16).astype(np.float32)
    else:
        value = (bits.astype(np.uint32) << 16).view(np.float32)
    bits = bits[np.isfinite(value)]  # subnormals, both zeros, every normal
    K = 256
    bits = bits[: len(bits) // K * K].reshape(K, -1)
    w = lowbit.from_stored(16, K, bits.shape[1], bits, None, 32, storage == "bf16")
    out = path("numba", lowbit.product, np.eye(K, dtype=np.float32), w)
    assert np.array_equal(out, w.dequantize())  # (a sum starting from +0.0 turns -0.0 into +0.0)
    assert np.count_nonzero(out) == out.size - 2  # and nothing else is lost: only the two zeros


@needs_numba
def test_integer_products_are_exact_on_both_paths(path):
    """Small integers: every partial sum is an integer below 2**24, exact in float32 whatever the
    order, so the kernel and the twin agree exactly."""
    rng = np.random.default_rng(3)
    q = rng.integers(-127, 128, (96, 40)).astype(np.int8)
    w = lowbit.from_stored(8, 96, 40, q, np.ones(40, np.float32), 32, False)
    x = rng.integers(-20, 21, (4, 96)).astype(np.float32)
    exact = x.astype(np.int64) @ q.astype(np.int64)
    assert np.array_equal(path("numba", lowbit.product, x, w), exact)
    assert np.array_equal(path("numpy", lowbit.product, x, w), exact)


@pytest.mark.parametrize("bits, group", [(8, 32), (4, 32), (4, 8)])
def test_quantization_error_is_at_most_half_a_step(bits, group):
    w = _weight(64, 70, seed=4)
    p = lowbit.quantize(w, bits, group)
    step = p.scale if bits == 8 else np.repeat(p.scale, group, axis=0)
    assert np.all(np.abs(w - p.dequantize()) <= step / 2 * (1 + 1e-6))
    levels = 127 if bits == 8 else 7
    rel = 1e-6 if bits == 8 else 2.0 ** -11  # 4 bits: the scale rounded to fp16
    assert np.abs(p.dequantize()).max() == pytest.approx(np.abs(w).max(), rel=rel)
    assert p.nbytes == cost_model.packed_weight_bytes(64, 70, cost_model.Packed(bits, group))
    assert levels * step.max() == pytest.approx(np.abs(w).max(), rel=rel)


def test_4_bit_scales_are_fp16_and_the_kernel_reads_two_bytes_each():
    """Each group's scale is absmax / 7 rounded to fp16 (the least normal fp16 at the smallest),
    and the packed scales are its fp16 bits: half the bytes of float32 ones."""
    w = _weight(64, 300, seed=6)
    w[:32, 0] = 0.0  # an all-zero group: scale 1
    w[:32, 1] *= 1e-9  # a group below fp16's least normal scale
    p = lowbit.quantize(w, 4, 32)
    absmax = np.abs(w.reshape(2, 32, 300)).max(axis=1)
    want = np.where(absmax > 0, absmax / 7, 1.0)
    want = np.maximum(want, np.finfo(np.float16).tiny).astype(np.float16)
    assert np.array_equal(p.scale, want.astype(np.float32))
    assert p.tile_scale.dtype == np.uint16
    assert np.array_equal(kq.unpack(p.tile_scale, 300).view(np.float16), want)
    assert p.nbytes == p.data.nbytes + 2 * 2 * kq.padded(300)


@needs_numba
def test_the_4_bit_kernel_refuses_float32_scales():
    """Numba would compile the kernel for float32 scales too and read their bytes as fp16."""
    w = lowbit.quantize(_weight(64, 40, seed=7), 4, 32)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(TypeError, match="fp16"):
        kq.product(x, 4, w.data, kq.unpack(w.tile_scale, 40).view(np.float16).astype(np.float32)[None],
                   False, 40)


def test_16_bit_rounds_to_nearest():
    w = _weight(32, 40, seed=5)
    w[0, :8] = [1e-7, -3e-6, 6e-5, 2.0 ** -24, 0.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, 65504.0]
    for storage, mantissa, subnormal_step in (("fp16", 10, 2.0 ** -24), ("bf16", 7, 0.0)):
        back = lowbit.quantize(w, 16, storage16=storage).dequantize()
        assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) * 2.0 ** -(mantissa + 1), subnormal_step / 2))
    assert back[0, 4] == 0.0 and back[0, 7] == 65536.0  # bf16: 65504 rounds up to 2**16
    fp16 = lowbit.quantize(w, 16).dequantize()
    assert (fp16[0, 5], fp16[0, 6]) == (1.0, 1.0 + 4 * 2.0 ** -11)  # ties to even


def test_bad_formats_are_one_clear_line():
    with pytest.raises(ConfigError, match="--group-size 24 does not divide"):
        lowbit.quantize(_weight(64, 8), 4, 24, name="w")
    with pytest.raises(ConfigError, match="--bits must be one of"):
        quant.QuantConfig(bits=3)
    with pytest.raises(ConfigError, match="--group-size must be an even"):
        quant.QuantConfig(bits=4, group_size=7)
    with pytest.raises(ConfigError, match="exceeds fp16"):
        lowbit.quantize(np.full((4, 4), 7e4, np.float32), 16, name="w")
    assert lowbit.quantize(np.full((4, 4), 7e4, np.float32), 16, storage16="bf16").dequantize()[0, 0] == 70144.0


def _model(vocab=300):
    cfg = config_mod.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=12, vocab_size=vocab)
    return GPT(cfg, init(cfg, np.random.default_rng(0))), cfg


@pytest.mark.parametrize("bits, positions, kernel_path", list(itertools.product(
    (16, 8, 4), ([5], [3, 7, 1], [0, 2, 4, 6, 8, 10, 1, 3]), ("numpy", "numba"))))
def test_a_quantized_batched_step_counts_what_the_closed_form_predicts(path, bits, positions, kernel_path):
    if kernel_path == "numba" and not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    gpt, cfg = _model()
    qcfg = quant.QuantConfig(bits=bits, group_size=16, kv_int8=bits == 8)
    gpt.quant = quant.quantize_model(gpt.params, cfg, qcfg)
    caches = [KVCache(cfg, 1, int8=qcfg.kv_int8) for _ in positions]
    for kv, n in zip(caches, positions):
        if n:
            gpt.logits(np.arange(n)[None] % 300, kv)
    METER.reset()
    with METER.in_phase("decode"):
        path(kernel_path, gpt.decode_step, np.arange(len(positions)), caches)
    # with Numba the blocks' LayerNorms and residual add run the fused schedule's passes
    predicted = cost_model.predict_decode_batch(cfg, positions, quant=qcfg, fused=kernel_path == "numba")
    assert predicted.keys() == METER.records.keys()
    for k, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(METER.records[k], f) for f in FIELDS], k
    head = next(r for k, r in METER.records.items() if k.scope == "lm_head")
    assert head.bytes_read == 4 * len(positions) * 32 + cost_model.packed_weight_bytes(32, 300, cost_model.Packed(bits, 16))
    assert head.flops == 2 * len(positions) * 32 * kq.padded(300) and head.useful_flops == 2 * len(positions) * 32 * 300


@pytest.mark.parametrize("positions", [[5], [3, 7, 1]])
def test_a_float_batched_step_counts_what_the_closed_form_predicts(positions):
    gpt, cfg = _model()
    caches = [KVCache(cfg, 1) for _ in positions]
    for kv, n in zip(caches, positions):
        gpt.logits(np.arange(n)[None], kv)
    METER.reset()
    with METER.in_phase("decode"):
        gpt.decode_step(np.arange(len(positions)), caches)
    predicted = cost_model.predict_decode_batch(cfg, positions)
    assert predicted.keys() == METER.records.keys()
    for k, p in predicted.items():
        assert [getattr(p, f) for f in FIELDS] == [getattr(METER.records[k], f) for f in FIELDS], k
    if len(positions) == 1:  # batch 1 is the model's single-sequence decode step
        single = cost_model.predict_decode(cfg, 1, positions[0])
        assert {k: [getattr(r, f) for f in FIELDS] for k, r in single.items()} == \
            {k: [getattr(r, f) for f in FIELDS] for k, r in predicted.items()}


def test_the_closed_forms_tile_is_the_kernels():
    for bits in (16, 8, 4):
        for M in (1, 7, 8, 9, 31, 32, 33, 255, 256, 257, 300, 50257):
            assert cost_model.packed_columns(M) == kq.padded(M)
            data = lowbit.quantize(np.ones((64, M), np.float32), bits).data
            assert data.shape[0] * data.shape[2] == kq.padded(M)
    assert cost_model.PACK_TILE == kt.WIDTH


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_a_quantized_model_stays_close_to_fp32(bits):
    gpt, cfg = _model()
    x = np.random.default_rng(6).integers(0, 300, (2, 10))
    ref = gpt.logits(x)
    gpt.quant = quant.quantize_model(gpt.params, cfg, quant.QuantConfig(bits=bits, group_size=16))
    out = gpt.logits(x)
    err = np.max(np.abs(out - ref)) / np.max(np.abs(ref))
    assert err <= {16: 1e-3, 8: 2e-2, 4: 0.2}[bits]
    assert err > 0  # the quantized weights really are the ones in use


@needs_numba
@pytest.mark.parametrize("group", [2, 6, 8, 12, 16, 32, 64])
def test_the_4_bit_dot_block_gives_the_generic_blocks_bits(group):
    """kernels/tiles.py's int4_block(vnni=True) (AVX-512 VNNI: four inputs a 32-bit lane, after a byte
    permutation) against int4_block (16-bit lanes, one byte row at a time) and the NumPy twin:
    the same bits for every register block (1 to 9 rows: blocks of 4, 2 and 1), a padded last
    tile, and group sizes whose chunks take four inputs at a time or not (2, 6: int4_block)."""
    if not kt.dot_instructions():
        pytest.skip("this CPU lacks AVX-512 VNNI and VBMI")
    K, M = 384, 100
    w = lowbit.quantize(_weight(K, M, seed=6), 4, group)
    rng = np.random.default_rng(7)
    chunk = kq.chunk(group)
    for N in range(1, 10):
        x = rng.standard_normal((N, K)).astype(np.float32)
        outs = []
        for vnni in (False, True):
            out = np.empty((N, M), np.float32)
            kt.kernels(vnni)[4](x, w.data, w.tile_scale, chunk, np.empty(0, np.float32), out)
            outs.append(out)
        assert np.array_equal(outs[0], outs[1]), (group, N)
        kernels.use("numpy")
        try:
            assert np.array_equal(outs[1], lowbit.product(x, w)), (group, N)
        finally:
            kernels.use("numba")


@needs_numba
def test_the_4_bit_kernel_takes_the_dot_block_only_where_the_cpu_has_it(monkeypatch):
    """The default kernels use the VNNI block exactly where Numba compiles for a CPU with VNNI
    and VBMI; asking for it elsewhere is one clear error, not an illegal instruction. A CPU
    named to Numba (NUMBA_CPU_NAME) counts only through the features it is told."""
    from numba.core import config

    has = kt.dot_instructions()
    assert kt.kernels() is kt.kernels(has)
    monkeypatch.setattr(kt, "dot_instructions", lambda: False)
    with pytest.raises(RuntimeError, match="VNNI"):
        kt.kernels(True)
    monkeypatch.undo()
    probe = kt.dot_instructions.__wrapped__
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw,+avx512vnni,+avx512vbmi")
    assert probe()
    monkeypatch.setattr(config, "CPU_FEATURES", "+avx512f,+avx512bw,+avx512vnni")
    assert not probe()
    monkeypatch.setattr(config, "CPU_FEATURES", None)
    monkeypatch.setattr(config, "CPU_NAME", "generic")
    assert not probe()
