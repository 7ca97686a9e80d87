"""Weight-only 16-, 8- and 4-bit inference: packed weights, their counted product, their NumPy twin.

Quantization (symmetric, absmax):
- 8 bits: one float32 scale per output channel, scale[j] = max_k |w[k, j]| / 127, q = round(w /
  scale) in [-127, 127]; |w - q * scale| <= scale / 2.
- 4 bits: one scale per group of G consecutive inputs of an output channel (G = group_size, 32 by
  default), scale[g, j] = max over the group of |w| / 7 rounded to fp16 (at least fp16's least
  normal number), q = round(w / scale) in [-7, 7]. Small groups follow the weights' local range (an
  outlier spoils only its own group) at 2 / G bytes of scale per weight; fp16's 11 significant
  bits put the scale within 1/2048 of absmax / 7, far inside the step (scale / 2) the rounding
  to 4 bits already costs, and a weight stays within half a step of its value as at 8 bits.
- 16 bits: the weight rounded to IEEE half (fp16: 10 mantissa bits, |w| <= 65504) or bfloat16
  (7 mantissa bits, float32's range), round to nearest even; no scales.

Every linear layer of every block and the LM head (x @ wte.T, quantized per vocabulary entry, or per
group of each entry's inputs) are quantized: the head is a third of GPT-2 124M's weights. The token
embedding lookup and the position table stay float32 (a step reads one row of each per sequence).
With 16- and 8-bit weights the activations stay float32 ("w16a32", "w8a32"): the weight is widened
to float32 inside the product. With 4-bit weights the product rounds the activations to int8 as
well, one scale per row and group of G inputs (xs = max |x| / 127, xq = rint(x / xs)), and
multiplies integers ("w4a8"; why: minigpt/kernels/quant.py): each output is the sum over chunks of
inputs (groups of up to 32) of float(sum of xq * q) * (scale * xs).

The product runs the Numba kernel of minigpt.kernels.quant (kernels.active() == "numba") or its
NumPy twin (16 and 8 bits: dequantize, then the float product; 4 bits: the same integer sums and
float steps, bit for bit), and is recorded once, as the kernel moves it: FLOPs 2 N K M_pad (the
kernel computes the tile padding too; useful_flops leave it out), bytes read x plus the packed
weight plus its scales, bytes written the (N, M) output, dtype meter.packed_dtype(bits). The
4-bit kernel's int8 activations (N x K, in the first-level cache) are not in it. A linear
layer's bias is added by the same call (op "x@w+b": N M more FLOPs, M floats more read). The twin is the
reference for results, not for traffic: it writes and reads widened copies that the record does
not show.
"""

from dataclasses import dataclass

import numpy as np

from minigpt import backend, kernels
from minigpt.counting.meter import METER, matmul, packed_dtype
from minigpt.errors import ConfigError
from minigpt.kernels import quant as packed_kernels

BITS = (16, 8, 4)
STORAGE16 = ("fp16", "bf16")
DEFAULT_GROUP_SIZE = 32
LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FP16_MAX = 65504.0
FP16_TINY = float(np.finfo(np.float16).tiny)  # the least normal fp16: the least 4-bit scale


def dtype_name(bits: int) -> str:
    """The records' dtype of a product with `bits`-bit weights: w16a32, w8a32, w4a8."""
    return packed_dtype(bits)


def check(bits: int, group_size: int, storage16: str) -> None:
    """One ConfigError line for a bits / group size / 16-bit storage the format cannot take."""
    if bits not in BITS:
        raise ConfigError(f"--bits must be one of 32, {', '.join(map(str, BITS))}; got {bits}")
    if group_size < 2 or group_size % 2:
        raise ConfigError(f"--group-size must be an even number >= 2, got {group_size}")
    if storage16 not in STORAGE16:
        raise ConfigError(f"16-bit storage must be one of {', '.join(STORAGE16)}, got {storage16!r}")


@dataclass
class PackedWeight:
    """A weight (K, M) as x @ w sees it, packed for the kernels (layout: kernels/quant.py).

    q: the logical quantized values before tiling (int8 (K, M) for 8 bits; uint8 (K / 2, M) of
    nibble pairs for 4; uint16 (K, M) bit patterns for 16), and scale ((M,) for 8 bits, (K / G, M)
    for 4, None for 16), kept to save them; data and tile_scale are what the kernels read."""

    bits: int
    K: int
    M: int
    q: np.ndarray
    scale: np.ndarray | None
    data: np.ndarray
    tile_scale: np.ndarray | None
    group_size: int = DEFAULT_GROUP_SIZE
    bf16: bool = False

    @property
    def shape(self):
        return (self.K, self.M)

    @property
    def nbytes(self) -> int:
        """Bytes a product reads of the weight: the packed tiles (with their padding) and scales."""
        return self.data.nbytes + (0 if self.tile_scale is None else self.tile_scale.nbytes)

    def dequantize(self) -> np.ndarray:
        """The float32 weight (K, M) the packed one stands for."""
        if self.bits == 16:
            u = self.q
            if self.bf16:
                return (u.astype(np.uint32) << 16).view(np.float32)
            return u.view(np.float16).astype(np.float32)
        if self.bits == 8:
            return self.q.astype(np.float32) * self.scale
        q = int4_values(self.q).astype(np.float32)
        return q * np.repeat(self.scale, self.group_size, axis=0)


def int4_values(nibbles) -> np.ndarray:
    """The 4-bit weight's integers (K, M) int8 in [-8, 7] (the stored ones in [-7, 7]) from its
    nibble pairs (K / 2, M) uint8: row 2i the low nibble, 2i + 1 the high, each biased by 8."""
    q = np.empty((2 * nibbles.shape[0], nibbles.shape[1]), np.int8)
    q[0::2] = (nibbles & 15).astype(np.int8) - 8
    q[1::2] = (nibbles >> 4).astype(np.int8) - 8
    return q


def _absmax_scale(absmax, levels: int):
    scale = np.where(absmax > 0, absmax / levels, 1.0).astype(np.float32)
    return np.maximum(scale, np.finfo(np.float32).tiny)


def _fp16_values(a):
    """a rounded to the nearest fp16 values, kept as float32 (what the 4-bit kernel widens back)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _group_scale(absmax, name: str):
    """4 bits: absmax / 7 rounded to fp16, as float32 (the kernel reads the fp16 bits)."""
    scale = np.where(absmax > 0, absmax / 7, 1.0)
    if scale.max(initial=0.0) > FP16_MAX:
        raise ConfigError(f"{name}: |w| up to {absmax.max():.6g} needs a 4-bit scale above fp16's "
                          f"{FP16_MAX:g}; use --bits 8")
    return _fp16_values(np.maximum(scale, FP16_TINY))


def quantize(w, bits: int, group_size: int = DEFAULT_GROUP_SIZE, storage16: str = "fp16",
             name: str = "weight") -> PackedWeight:
    """Quantize and pack a float weight w (K, M) (x @ w's orientation)."""
    w = np.ascontiguousarray(backend.to_host(w), dtype=np.float32)
    K, M = w.shape
    if not np.isfinite(w).all():
        raise ConfigError(f"{name}: holds inf or NaN; it cannot be quantized")
    if bits == 8:
        scale = _absmax_scale(np.abs(w).max(axis=0), 127)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        data, ts = packed_kernels.pack_int8(q, scale)
        return PackedWeight(8, K, M, q, scale, data, ts)
    if bits == 4:
        if K % group_size:
            divisors = [g for g in (64, 32, 16, 8, 4, 2) if K % g == 0]
            raise ConfigError(f"--group-size {group_size} does not divide {name}'s {K} inputs "
                              f"(--group-size {divisors[0] if divisors else 2} would)")
        groups = w.reshape(K // group_size, group_size, M)
        scale = _group_scale(np.abs(groups).max(axis=1), name)  # (K / G, M)
        q = np.clip(np.rint(groups / scale[:, None]), -7, 7).astype(np.int8).reshape(K, M)
        b = (q + 8).astype(np.uint8)
        nibbles = (b[0::2] | (b[1::2] << 4)).astype(np.uint8)
        data, ts = packed_kernels.pack_int4(q, scale)
        return PackedWeight(4, K, M, nibbles, scale, data, ts, group_size)
    if bits == 16:
        bf16 = storage16 == "bf16"
        if bf16:
            u = w.view(np.uint32)
            u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        else:
            if np.abs(w).max(initial=0.0) > FP16_MAX:
                raise ConfigError(f"{name}: |w| up to {np.abs(w).max():.6g} exceeds fp16's {FP16_MAX:g}; "
                                  "use bf16 storage")
            u = w.astype(np.float16).view(np.uint16)
        return PackedWeight(16, K, M, u, None, packed_kernels.pack_16(u), None, bf16=bf16)
    check(bits, group_size, storage16)
    raise AssertionError("unreachable")


def from_stored(bits: int, K: int, M: int, q, scale, group_size: int, bf16: bool) -> PackedWeight:
    """A PackedWeight from its saved logical arrays (see PackedWeight.q and .scale)."""
    q = np.ascontiguousarray(q)
    if bits == 8:
        data, ts = packed_kernels.pack_int8(q, scale)
    elif bits == 4:
        # fp16 values as saved; an older minigpt saved float32 scales, rounded here as
        # quantize rounds them (a change within 1/2048 of each)
        scale = np.asarray(scale, np.float32)
        if not np.isfinite(scale).all() or np.abs(scale).max(initial=0.0) > FP16_MAX:
            raise ValueError(f"4-bit scales must be finite and at most fp16's {FP16_MAX:g}")
        scale = _fp16_values(scale)
        data, ts = packed_kernels.pack_int4(int4_values(q), scale)
    else:
        data, ts = packed_kernels.pack_16(q), None
    return PackedWeight(bits, K, M, q, scale, data, ts, group_size, bf16)


def _run(x2, w: PackedWeight, bias=None):
    """The product itself (+ bias): the Numba kernel, or the NumPy twin (the result in x2's
    dtype; the bias added to the float32 product, as the kernel adds it)."""
    if kernels.active() == "numba" and backend.xp is np:
        out = packed_kernels.product(x2, w.bits, w.data, w.tile_scale, w.bf16, w.M, bias)
        return out.astype(x2.dtype, copy=False)
    with METER.paused():  # the twin's products are not what the record describes
        x2f = x2.astype("float32", copy=False)
        out = int_activations_product(x2f, w) if w.bits == 4 else matmul(x2f, backend.asarray(w.dequantize()))
        if bias is not None:
            out += bias.astype("float32", copy=False)
        return out.astype(x2.dtype, copy=False)


def int_activations_product(x2, w: PackedWeight):
    """The 4-bit product as the kernel computes it (module docstring), in NumPy: x2 (N, K) float32
    -> (N, M) float32, equal to the kernel's bit for bit. The integer sums run exactly on the
    float64 BLAS (|sum| <= 28,448); then the same float32 steps in the same order."""
    xp = backend.xp
    N, K = x2.shape
    G = w.group_size
    Q = packed_kernels.chunk(G)
    groups = x2.reshape(N, K // G, G)
    m = xp.abs(groups).max(axis=2)  # (N, K / G)
    xs = xp.where(m > 0, xp.maximum(m / xp.float32(127.0), packed_kernels.TINY), 1.0).astype(xp.float32)
    xq = xp.rint(groups / xs[:, :, None]).reshape(N, K).astype(xp.float64)
    q = backend.asarray(int4_values(w.q)).astype(xp.float64)  # the weights' integers
    scale = backend.asarray(w.scale)
    out = xp.zeros((N, w.M), xp.float32)
    for c in range(K // Q):
        g = c * Q // G
        part = matmul(xq[:, c * Q:(c + 1) * Q], q[c * Q:(c + 1) * Q]).astype(xp.float32)  # (unmetered: _run)
        out += part * (scale[g][None, :] * xs[:, g][:, None])
    return out


def product(x2, w: PackedWeight, op: str = "x@w", bias=None):
    """x2 (N, K) @ w -> (N, M) in x2's dtype, counted as the kernel moves it (module docstring).
    bias (M,): a linear layer's, added by the kernel to each tile's outputs as they come (the
    record, op "x@w+b", then counts its N M additions and its M floats read)."""
    if not METER.enabled:
        return _run(x2, w, bias)
    t0 = METER.clock()
    out = _run(x2, w, bias)
    seconds = METER.clock() - t0
    op, flops, useful, read, written = product_counts(x2, w, out, bias, op)
    METER.add(kind="matmul", op=op, dtype=dtype_name(w.bits), flops=flops, useful_flops=useful,
              bytes_read=read, bytes_written=written, seconds=seconds)
    return out


def product_counts(x2, w: PackedWeight, out, bias, op: str) -> tuple:
    """(op, FLOPs, useful FLOPs, bytes read, bytes written) of out = x2 @ w (+ bias): the record
    of product (module docstring), for it and for the compiled decode step (nn/compiled.py)."""
    N, K = x2.shape
    M_pad = w.data.shape[0] * w.data.shape[2]
    adds, bias_bytes = (0, 0) if bias is None else (N * w.M, bias.nbytes)
    return (op if bias is None else op + "+b", 2 * N * K * M_pad + adds, 2 * N * K * w.M + adds,
            x2.nbytes + w.nbytes + bias_bytes, out.nbytes)


class PackedWeights:
    """A model's packed weights: every block's linear layers, and the LM head (wte.T)."""

    def __init__(self, cfg, qcfg, weights: dict):
        """weights: {name: PackedWeight} for every block's LINEAR_WEIGHTS and
        "transformer.wte.weight" (the head's (C, V) orientation)."""
        self.cfg, self.qcfg, self.weights = cfg, qcfg, weights
        self.blocks = [{short: weights[f"transformer.h.{i}.{short}"] for short in LINEAR_WEIGHTS}
                       for i in range(cfg.n_layer)]
        self.lm_head = weights["transformer.wte.weight"]
        self.tables = weights  # the quantized names, as QuantizedWeights names them

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())


def quantize_model(params, cfg, qcfg) -> PackedWeights:
    """Pack a FlatBuffer's linear weights and LM head at qcfg.bits (a quant.QuantConfig).

    The token table in params is overwritten with the head's dequantized weights: the lookup and
    the head are one tied matrix and stay so, and a model loaded from a --bits checkpoint (which
    stores the packed matrix only) computes exactly what this one does."""
    if cfg.n_experts > 1:
        raise ConfigError(f"{qcfg.bits}-bit quantization of a mixture-of-experts model (n_experts = "
                          f"{cfg.n_experts}) is not supported; run it in float32")
    check(qcfg.bits, qcfg.group_size, qcfg.storage16)
    mk = lambda w, name: quantize(w, qcfg.bits, qcfg.group_size, qcfg.storage16, name)
    weights = {"transformer.wte.weight": mk(backend.to_host(params["transformer.wte.weight"]).T,
                                            "transformer.wte.weight")}
    for i in range(cfg.n_layer):
        for short in LINEAR_WEIGHTS:
            name = f"transformer.h.{i}.{short}"
            weights[name] = mk(params[name], name)
    wte = params["transformer.wte.weight"]
    wte[...] = backend.asarray(weights["transformer.wte.weight"].dequantize().T.astype(wte.dtype))
    return PackedWeights(cfg, qcfg, weights)
