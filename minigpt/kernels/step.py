"""A decode step's blocks and LM head in one compiled call, each op timed inside it.

A decode step of GPT-2 124M with 4-bit weights spends about 1.5 ms in its kernels and 0.9-1.1 ms
more between them: some 170 calls from Python (a LayerNorm, a product, the three attention
kernels, ... per layer), each with its Numba dispatch, its meter record and the Python around it
(bench/step_floor.py measured it). `decode_step` here makes the same kernel calls, on the same
arrays, in the same order, from one compiled function: kernels/fused.py's LayerNorms and GELU,
kernels/tiles.py's products (float32 tiles, or packed 16-, 8- and 4-bit weights),
kernels/attend.py's attention over every sequence's cache. Its results are the Python step's bit
for bit (tests/test_step.py).

The meter still gets every op: the function reads the clock (CLOCK_MONOTONIC, through the C
library's clock_gettime, the clock time.perf_counter reads on Linux) before and after each op and
writes the nanoseconds into `seconds[layer, slot]` (SLOTS below; the last row holds the final
LayerNorm's and the head's), and nn/compiled.py adds each op's record, its FLOPs and bytes counted
from these same arrays by the helpers the Python step counts with. The products run on `threads`,
the attention on `attention_threads` (nn/compiled.py passes every core for both: inside the call
the workers are still awake), everything else on the caller's own count, as in the Python step.
"""

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from minigpt.kernels import attend, tiles
from minigpt.kernels import fused as fk
from minigpt.kernels.quant import CHUNK

# The ops of one block, in the order they run: seconds[i, slot] times block i's. The *_bias
# slots are the float32 weights' bias adds (a packed weight's kernel adds its own bias).
SLOTS = ("ln_1", "c_attn", "c_attn_bias", "scores", "softmax", "mix", "attn_c_proj",
         "attn_c_proj_bias", "ln_2", "c_fc", "gelu", "mlp_c_proj", "mlp_c_proj_bias", "residual_2")
HEAD_SLOTS = ("ln_f", "lm_head")  # the last row of seconds
(LN_1, C_ATTN, C_ATTN_BIAS, SCORES, SOFTMAX, MIX, ATTN_C_PROJ, ATTN_C_PROJ_BIAS, LN_2, C_FC, GELU,
 MLP_C_PROJ, MLP_C_PROJ_BIAS, RESIDUAL_2) = range(len(SLOTS))
CLOCK_MONOTONIC = 1  # Linux's id for the clock


@intrinsic
def _now_ns(typingctx):
    """The monotonic clock in nanoseconds: clock_gettime(CLOCK_MONOTONIC), about 20 ns a read.
    A declared C function, resolved when the code is linked: nothing process-specific is baked
    in, so the compiled step caches on disk like the other kernels."""
    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        clock_gettime = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i32, [i32, i64.as_pointer()]), "clock_gettime")
        spec = cgutils.alloca_once(builder, i64, size=2)  # struct timespec {seconds, nanoseconds}
        builder.call(clock_gettime, [ir.Constant(i32, CLOCK_MONOTONIC), spec])
        seconds = builder.load(spec)
        nanoseconds = builder.load(builder.gep(spec, [ir.Constant(i32, 1)]))
        return builder.add(builder.mul(seconds, ir.Constant(i64, 1_000_000_000)), nanoseconds)

    return types.int64(), codegen


@intrinsic
def _get_threads(typingctx):
    """numba.get_num_threads() as the threading layer answers it (its own symbol, which Numba
    registers when it starts its threads): Numba's function calls it through a ctypes pointer,
    which would keep this module's step from caching on disk."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []),
                                            "get_num_threads")
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(), codegen


@intrinsic
def _set_threads(typingctx, n):
    """_set_threads(n) without its checks (n is a count the caller has checked), through
    the threading layer's symbol, as _get_threads."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]), "set_num_threads")
        builder.call(fn, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


def product(x, data, scale, bf16, bias, out):  # the Python form only names it: see _product
    raise NotImplementedError("compiled only")


@njit(inline="always")
def _chunk(G):  # pragma: no cover - compiled
    """kernels/quant.py's chunk(G): the largest even divisor of G up to CHUNK."""
    c = min(G, CHUNK)
    c -= c % 2
    while G % c:
        c -= 2
    return c


@overload(product)
def _product(x, data, scale, bf16, bias, out):
    """out = x @ the weight (+ bias): the decode kernel of the weight's format, picked by its
    storage type (kernels/quant.py's layouts): float32 tiles (scale: the rest; no bias, the step
    adds it apart as the Python step does), int8 (scale per channel), uint16 (fp16 or bf16 bits;
    scale unused), uint8 (4-bit nibble pairs; scale: fp16 group scales)."""
    kernels = tiles.kernels()
    kind = data.dtype
    if kind == types.float32:
        f32 = kernels["f32"]
        return lambda x, data, scale, bf16, bias, out: f32(x, data, scale, out)
    if kind == types.int8:
        w8 = kernels[8]
        return lambda x, data, scale, bf16, bias, out: w8(x, data, scale, bias, out)
    if kind == types.uint16:
        w16 = kernels[16]
        return lambda x, data, scale, bf16, bias, out: w16(x, data, bf16, bias, out)
    if kind == types.uint8:
        w4 = kernels[4]
        return lambda x, data, scale, bf16, bias, out: w4(
            x, data, scale, _chunk(x.shape[1] // scale.shape[1]), bias, out)
    return None


@njit(inline="always")
def _add_bias(out, b):  # pragma: no cover - compiled
    for n in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[n, j] += b[j]


# nogil: other Python threads (a server's event loop) run during a step. Numba's disk cache checks
# this file only: after editing a kernel it calls (attend.py, fused.py, tiles.py), delete
# minigpt/kernels/__pycache__/step.*.nb* or it keeps running the old one (an install replaces all).
@njit(cache=True, nogil=True)
def decode_step(x, weights, scales, biases, norms, bf16, bias_apart, eps, n_head, keys, values,
                lengths, head, head_scale, threads, attention_threads, parts, h, qkv, q, att, y, a, f, g,
                m, mean, rstd, logits, seconds):  # pragma: no cover - compiled
    """One decode step of B sequences, one new token each, after the embedding: x (B, C) float32,
    the embedded tokens (the residual stream, overwritten). weights, scales, biases: typed lists
    of every block's four linear layers in LINEAR_WEIGHTS order (c_attn, attn c_proj, c_fc, mlp
    c_proj), the kernels' arrays (nn/compiled.py); c_fc's bias is added by the GELU. norms: each
    block's ln_1 w, b, ln_2 w, b, then ln_f's w, b. bf16: 16-bit weights are bfloat16.
    bias_apart: the products add no bias (float32 tiles), so it is added here, timed apart.
    keys, values, lengths: kernels/attend.py's (each sequence's cache; its length with the new
    token). head, head_scale: the LM head's weight. threads: the products'; attention_threads,
    parts: the attention kernels' (kernels/attend.py). h, a, m (B, C), qkv (B, 3C), q, y
    (B, H, hs), att (B, H, Tmax), f, g (B, 4C), mean, rstd (B,): scratch; logits (B, V) receives
    the head's output. seconds (n_layer + 1, len(SLOTS)) int64: each op's nanoseconds, added."""
    B, C = x.shape
    hs = C // n_head
    own = _get_threads()
    scale = 1.0 / np.sqrt(hs)
    no_bias = np.empty(0, np.float32)
    qkv_heads = qkv.reshape(B, 3, n_head, hs)
    y2 = y.reshape(B, C)
    for i in range(len(weights) // 4):
        w0 = 4 * i
        t = _now_ns()
        fk.layernorm_forward(x, norms[w0], norms[w0 + 1], eps, h, mean, rstd)
        t = _lap(seconds, i, LN_1, t)
        t = _linear(h, weights[w0], scales[w0], bf16, biases[w0], qkv, bias_apart, threads, own, seconds,
                    i, C_ATTN, t)
        q[...] = qkv_heads[:, 0]  # contiguous, as the Python step copies it (untimed there too)
        _set_threads(attention_threads)
        t = _now_ns()
        attend.scores(q, qkv_heads[:, 1], qkv_heads[:, 2], keys, values, i, lengths, att, parts)
        t = _lap(seconds, i, SCORES, t)
        attend.softmax(att, lengths, scale, True)
        t = _lap(seconds, i, SOFTMAX, t)
        attend.mix(att, values, i, lengths, y, parts)
        t = _lap(seconds, i, MIX, t)
        _set_threads(own)
        t = _linear(y2, weights[w0 + 1], scales[w0 + 1], bf16, biases[w0 + 1], a, bias_apart, threads, own,
                    seconds, i, ATTN_C_PROJ, t)
        fk.residual_layernorm_forward(x, a, norms[w0 + 2], norms[w0 + 3], eps, h, mean, rstd)  # a = x + a
        t = _lap(seconds, i, LN_2, t)
        t = _linear(h, weights[w0 + 2], scales[w0 + 2], bf16, no_bias, f, bias_apart, threads, own, seconds,
                    i, C_FC, t)  # its bias: the GELU's
        fk.bias_gelu_forward(f, biases[w0 + 2], g, True)
        t = _lap(seconds, i, GELU, t)
        t = _linear(g, weights[w0 + 3], scales[w0 + 3], bf16, biases[w0 + 3], m, bias_apart, threads, own,
                    seconds, i, MLP_C_PROJ, t)
        for b in range(B):  # the stream after the MLP: (x + attention) + mlp, as residual_forward adds
            for j in range(C):
                x[b, j] = a[b, j] + m[b, j]
        t = _lap(seconds, i, RESIDUAL_2, t)
    last, top = len(norms) - 2, len(weights) // 4
    t = _now_ns()
    fk.layernorm_forward(x, norms[last], norms[last + 1], eps, h, mean, rstd)
    t = _lap(seconds, top, 0, t)
    _linear(h, head, head_scale, bf16, no_bias, logits, bias_apart, threads, own, seconds, top, 1, t)


@njit(inline="always")
def _linear(x, w, scale, bf16, bias, out, bias_apart, threads, own, seconds, i, slot, t):  # pragma: no cover
    """out = x @ w (+ bias) on `threads`, timed into seconds[i, slot]; where the product adds no
    bias (bias_apart), the bias added after it, timed into slot + 1 (none: an empty bias).
    Returns the clock's reading."""
    _set_threads(threads)
    product(x, w, scale, bf16, bias, out)
    _set_threads(own)
    t = _lap(seconds, i, slot, t)
    if bias_apart and bias.shape[0] > 0:
        _add_bias(out, bias)
        t = _lap(seconds, i, slot + 1, t)
    return t


@njit(inline="always")
def _lap(seconds, i, slot, t0):  # pragma: no cover - compiled
    """Add the nanoseconds since t0 to seconds[i, slot]; return the clock's reading."""
    t = _now_ns()
    seconds[i, slot] += t - t0
    return t
