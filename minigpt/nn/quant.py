"""Int8 quantized inference: what 8-bit weights (and activations, and KV cache) buy and cost.

Weights: symmetric, per output channel, absmax scales in float32:
    scale[j] = max_i |w[i, j]| / 127,   q = round(w / scale) clipped to [-127, 127] (int8)
so |w - q * scale| <= scale / 2 everywhere.

Two modes for a linear layer x (N, K) @ w (K, M):
- "w8a32": weight-only. x times the int8 weights widened inside the product, then times the
  per-channel scales (a per-column factor commutes with the product).
- "w8a8": the activations are quantized too, per token (row) and dynamically:
  xq = round(x / xs), xs = max |x[row]| / 127; the int8 x int8 product is accumulated exactly
  (as int32; see METER.matmul_int8) and rescaled by xs * scale.
  With an outlier threshold (in the spirit of LLM.int8()), feature dimensions where any |x|
  exceeds it are taken out of the int8 product and multiplied in float instead.

The LM head shares its int8 table with the token embedding (they are tied): wte is quantized per
row (per vocabulary entry), which is per output channel for the head. The embedding lookup can use
the same table (quantize_embedding). The KV cache can be stored in int8 too (kv_int8): one scale
per cached key or value vector.

Everything is counted by the meter at its own width: int8 weights at one byte plus their scales,
integer products as dtype "int8", the KV cache's bytes at one byte.
"""

import math
from dataclasses import dataclass

from minigpt import backend
from minigpt.counting import scopes
from minigpt.counting.meter import INT8, METER, W8A32
from minigpt.errors import ConfigError
from minigpt.nn import lowbit

# The int8 options, named once: the API, the commands, checkpoints and the closed form use these.
W8A8 = "w8a8"  # int8 weights and activations: integer products, recorded as dtype INT8
MODES = (W8A32, W8A8)  # W8A32: int8 weights only, its products recorded under that same name
DEFAULT_MODE = W8A8


@dataclass
class Int8Weight:
    """A weight as x @ w sees it: q (K, M) int8 and one float32 scale per output column."""

    q: object  # (K, M) int8
    scale: object  # (M,) float32
    mode: str = DEFAULT_MODE
    outlier_threshold: float | None = None

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self):
        return self.q.astype(self.scale.dtype) * self.scale


def _scale_of(absmax):
    """absmax / 127 as float32; 1 for an all-zero slice, and never below the smallest normal
    float32 (a subnormal absmax would otherwise give a zero scale)."""
    xp = backend.xp
    scale = xp.where(absmax > 0, absmax / 127.0, 1.0).astype(xp.float32)
    return xp.maximum(scale, xp.finfo(xp.float32).tiny)


def quantize(w, axis: int = 0):
    """Symmetric absmax quantization of w, one scale per slice along the other axis.

    axis=0: per column (a linear layer's output channels); axis=1: per row (embedding entries).
    Returns (q int8 like w, scale float32 of w.shape[1 - axis])."""
    xp = backend.xp
    absmax = xp.abs(w).max(axis=axis, keepdims=True)
    scale = _scale_of(absmax)
    q = xp.clip(xp.rint(w / scale), -127, 127).astype(xp.int8)
    return q, scale.reshape(-1)


def quantize_rows(x):
    """Per-row (per-token) dynamic quantization of activations x (N, K): (xq int8, xs (N, 1))."""
    return quantize_vectors(x)


def quantize_vectors(x):
    """Per-vector (last axis) int8 quantization for the KV cache: (q int8, scale (..., 1))."""
    xp = backend.xp
    with METER.op(kind="quant", op="quantize") as c:
        s = _scale_of(xp.abs(x).max(axis=-1, keepdims=True))
        q = xp.clip(xp.rint(x / s), -127, 127).astype(xp.int8)
        c.count(elements=x.size, bytes_read=x.nbytes, bytes_written=q.nbytes + s.nbytes, dtype=INT8)
    return q, s


def rescale(acc, factors, out_dtype):
    """acc times each of factors (broadcast), as out_dtype; counted as quant/rescale."""
    with METER.op(kind="quant", op="rescale") as c:
        out = acc * factors[0]
        for f in factors[1:]:
            out *= f
        out = out.astype(out_dtype, copy=False)
        c.count(elements=len(factors) * out.size,
                bytes_read=4 * acc.size + sum(f.nbytes for f in factors), bytes_written=out.nbytes,
                dtype=out.dtype)
    return out


def matmul_int8_weight(x2, w: Int8Weight, op: str = "x@w"):
    """x2 (N, K) float @ w, by w's mode; returns (N, M) in x2's dtype (no bias)."""
    xp = backend.xp
    if w.mode == W8A32:
        acc = METER.matmul_w8(x2, w.q, op=op)
        return rescale(acc, (w.scale,), x2.dtype)
    outliers = None
    if w.outlier_threshold is not None:
        cols = xp.nonzero(xp.abs(x2).max(axis=0) > w.outlier_threshold)[0]
        if cols.size:
            outliers = cols
            x_float = x2[:, cols]  # (N, n_outliers): these dimensions stay in float
            x2 = x2.copy()
            x2[:, cols] = 0.0
    xq, xs = quantize_rows(x2)
    acc = METER.matmul_int8(xq, w.q, op=op)  # exact integer sums, float64
    out = rescale(acc, (xs, w.scale), x_float.dtype if outliers is not None else x2.dtype)
    if outliers is not None:
        from minigpt.counting.meter import matmul  # the float product of the outlier dimensions

        w_float = w.q[outliers].astype(out.dtype) * w.scale
        with METER.scope(scopes.OUTLIERS):
            part = matmul(x_float, w_float, op="x@w")
        with METER.op(kind="quant", op="outlier_add") as c:
            out += part
            c.count(elements=out.size, bytes_read=2 * out.nbytes, bytes_written=out.nbytes,
                    dtype=out.dtype)
    return out


def linear_forward(x, w: Int8Weight, b):
    """x (..., K) @ w + b with an int8 weight."""
    K, M = w.shape
    x2 = x.reshape(-1, K)
    out = matmul_int8_weight(x2, w)
    if b is not None:
        with METER.op(kind="bias", op="add") as c:
            out += b
            c.count(elements=out.size, bytes_read=out.nbytes + b.nbytes, bytes_written=out.nbytes,
                    dtype=out.dtype)
    return out.reshape(*x.shape[:-1], M), None


LINEAR_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class QuantConfig:
    """How a model runs in int8 (an int8 checkpoint stores these fields by name)."""

    mode: str = DEFAULT_MODE  # one of MODES
    quantize_embedding: bool = False  # read the token embedding from the int8 table too
    kv_int8: bool = False  # keep the KV cache in int8, one scale per key or value vector
    outlier_threshold: float | None = None  # w8a8: dimensions with any |x| above it stay float
    bits: int | None = None  # 16, 8 or 4: weight-only packed weights (nn/lowbit.py), mode unused
    group_size: int = lowbit.DEFAULT_GROUP_SIZE  # 4 bits: inputs sharing one scale
    storage16: str = "fp16"  # 16 bits: "fp16" or "bf16"

    def __post_init__(self):
        check_outlier_threshold(self.outlier_threshold)
        if self.bits is not None:
            lowbit.check(self.bits, self.group_size, self.storage16)
            if self.quantize_embedding or self.outlier_threshold is not None:
                raise ConfigError(f"--bits {self.bits} quantizes weights only: the int8 embedding "
                                  "and the outlier threshold belong to the --int8 modes")

    @property
    def name(self) -> str:
        """What the model runs: the int8 mode, or w16a32 / w8a32 / w4a8 for packed weights."""
        return self.mode if self.bits is None else lowbit.dtype_name(self.bits)


def check_outlier_threshold(value: float | None, name: str = "outlier_threshold") -> None:
    """None (no outliers kept in float) or a positive, finite |x|; else one ConfigError line."""
    if value is not None and not 0 < value < math.inf:
        raise ConfigError(f"{name} must be > 0, got {value}")


class QuantizedWeights:
    """The int8 weights of a model: every linear layer's, and the tied token table's."""

    def __init__(self, cfg, qcfg: QuantConfig, tables: dict):
        """tables: {name: (q, scale)} for every block's LINEAR_WEIGHTS and transformer.wte.weight
        (q (V, C) per row)."""
        self.cfg, self.qcfg = cfg, qcfg
        self.tables = tables
        mk = lambda q, s: Int8Weight(q, s, qcfg.mode, qcfg.outlier_threshold)
        self.blocks = [
            {short: mk(*tables[f"transformer.h.{i}.{short}"]) for short in LINEAR_WEIGHTS}
            for i in range(cfg.n_layer)
        ]
        wte_q, wte_s = tables["transformer.wte.weight"]
        self.lm_head = mk(wte_q.T, wte_s)  # (C, V) view, one scale per vocabulary entry
        self.wte_q, self.wte_scale = wte_q, wte_s

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes + s.nbytes for q, s in self.tables.values())


def quantize_model(params, cfg, qcfg: QuantConfig):
    """Quantize a FlatBuffer's matrices (not the position table) for inference: QuantizedWeights
    for an int8 mode, lowbit.PackedWeights for qcfg.bits."""
    if qcfg.bits is not None:
        return lowbit.quantize_model(params, cfg, qcfg)
    if qcfg.mode not in MODES:
        raise ValueError(f"int8 mode must be one of {MODES}, not {qcfg.mode!r}")
    if cfg.n_experts > 1:
        raise ConfigError(f"int8 quantization of a mixture-of-experts model (n_experts = "
                          f"{cfg.n_experts}) is not supported; run it in float32")
    tables = {"transformer.wte.weight": quantize(params["transformer.wte.weight"], axis=1)}
    for i in range(cfg.n_layer):
        for short in LINEAR_WEIGHTS:
            name = f"transformer.h.{i}.{short}"
            tables[name] = quantize(params[name], axis=0)
    return QuantizedWeights(cfg, qcfg, tables)


def embedding_forward(idx, wte_q, wte_scale, wpe, pos0=0):
    """Token embedding from the int8 table (rows times their scales) plus positions."""
    B, T = idx.shape
    with METER.op(kind="embedding", op="lookup_int8") as c:
        out = wte_q[idx].astype(wpe.dtype)  # (B, T, C)
        out *= wte_scale[idx][..., None]
        out += wpe[pos0 : pos0 + T]
        C = wte_q.shape[1]
        c.count(elements=out.size,
                bytes_read=idx.nbytes + B * T * (C + wte_scale.itemsize) + T * C * wpe.itemsize,
                bytes_written=out.nbytes, dtype=out.dtype)
    return out
