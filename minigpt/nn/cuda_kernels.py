"""Fused CUDA kernels for the elementwise chains that move the most bytes on a GPU: GELU, the
causal softmax and AdamW, written with CuPy's own ElementwiseKernel and ReductionKernel.

Each public function is the CuPy twin of a NumPy-style function: same arguments, same outputs and
caches, and the same meter record (kind, op, FLOPs and bytes by the same formulas), so a layer
dispatches to it in two lines and the counts stay what the closed-form model predicts:

    if cuda_kernels.active():
        return cuda_kernels.gelu_forward(x)

    twin (NumPy-style, one kernel per ufunc on CuPy)       here
    layers.gelu_forward         8 kernels                  1: read x, write th and out
    layers.gelu_backward       11 kernels                  1: read x, th, dout, write dx
    layers.causal_softmax_forward  7 kernels, ~12 passes   4 (scale+mask, row max, row sum of
                                                             exp, exp / sum), 6 passes
    layers.causal_softmax_backward 5 kernels, ~11 passes   2 (row sum of dout * att, gradient), 5
    AdamW.step (optim.py)      14 kernels, ~30 passes      1: read p, g, m, v, write p, m, v

The meter counts the fewest bytes an op must move whichever way it runs, so a fused kernel
changes seconds, never counts. LayerNorm stays on the NumPy-style path: its arrays are
(tokens, C), a few MB at GPT-2-small width, so its passes cost microseconds.

Arithmetic follows the twins' order, operation by operation, and the kernels are compiled with
--fmad=false (no fused multiply-add contraction), so products and sums round as NumPy's do;
only exp and tanh (CUDA's own, within 2 ulp) and the order of row sums differ.

CuPy comes through minigpt.backend.cupy() when a kernel is first built: importing this module
needs no CuPy. Kernels compile on first use (CuPy caches them in ~/.cupy/kernel_cache).
MINIGPT_FUSED=0 in the environment, or ENABLED = False, sends the layers back to the NumPy-style
path, to compare the two. CALLS counts calls per function (to see that dispatch is wired).
"""

import functools
import math
import os
from collections import Counter
from types import SimpleNamespace

from minigpt import backend
from minigpt.counting import scopes
from minigpt.counting.meter import METER

ENABLED = os.environ.get("MINIGPT_FUSED", "1") != "0"
CALLS: Counter = Counter()
OPTIONS = ("--fmad=false",)  # round every product and sum as NumPy does

_GELU_K = math.sqrt(2.0 / math.pi)  # as in layers.py; the constants below are its products

# 0.5 x (1 + tanh(K (x + 0.044715 x^3))), in layers.gelu_forward's order: th kept for backward
GELU_FORWARD = f"""
T t = x * x;
t = t * (T){_GELU_K * 0.044715!r} + (T){_GELU_K!r};
t = tanh(t * x);
th = t;
y = (t + (T)1) * x * (T)0.5;
"""

# dout * (0.5 (1 + th) + 0.5 x (1 - th^2) K (1 + 3 * 0.044715 x^2)), in layers.gelu_backward's order
GELU_BACKWARD = f"""
T g = x * x;
g = g * (T){0.5 * _GELU_K * 3 * 0.044715!r} + (T){0.5 * _GELU_K!r};
g = g * x;
g = g * ((T)1 - th * th);
g = g + th * (T)0.5;
g = g + (T)0.5;
dx = g * d;
"""

# in place on contiguous scores (..., n_q, n_k): query pos0 + row sees keys col <= pos0 + row
SCALE_MASK = """
const long long col = i % n_k;
const long long row = (i / n_k) % n_q;
s = (col <= pos0 + row) ? s * scale : neg_inf;
"""

SOFTMAX_GRAD = """
T dp = d * p;
ds = (dp - p * z) * scale;
"""

# AdamW.step's arithmetic, one element at a time (decay on the first n_decay: the matrices)
ADAMW = """
if (i < n_decay) p = p * decay;
m = m * beta1 + one_minus_beta1 * g;
v = v * beta2 + one_minus_beta2 * (g * g);
T denom = sqrt(v) / bias2_sqrt + eps;
p = p - step_size * (m / denom);
"""


def active() -> bool:
    """Whether the layers should use these kernels: on a GPU, unless turned off."""
    return ENABLED and backend.device == "cuda"


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernels, built once (CuPy compiles each for a dtype on its first call)."""
    cp = backend.cupy()

    def elementwise(inputs, outputs, body, name):
        return cp.ElementwiseKernel(inputs, outputs, body, name, options=OPTIONS)

    def row_sum(inputs, term, name):
        return cp.ReductionKernel(inputs, "T y", term, "a + b", "y = a", "0", name, options=OPTIONS)

    return SimpleNamespace(
        gelu_forward=elementwise("T x", "T th, T y", GELU_FORWARD, "minigpt_gelu_forward"),
        gelu_backward=elementwise("T x, T th, T d", "T dx", GELU_BACKWARD, "minigpt_gelu_backward"),
        scale_mask=elementwise("T scale, int64 n_q, int64 n_k, int64 pos0, T neg_inf", "T s",
                               SCALE_MASK, "minigpt_softmax_scale_mask"),
        sum_exp=row_sum("T s, T m", "exp(s - m)", "minigpt_softmax_sum_exp"),
        exp_div=elementwise("T m, T z", "T s", "s = exp(s - m) / z;", "minigpt_softmax_exp_div"),
        sum_prod=row_sum("T d, T p", "d * p", "minigpt_softmax_sum_prod"),
        softmax_grad=elementwise("T d, T p, T z, T scale", "T ds", SOFTMAX_GRAD,
                                 "minigpt_softmax_grad"),
        adamw=elementwise("T g, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
                          "T bias2_sqrt, T eps, T step_size, int64 n_decay", "T p, T m, T v",
                          ADAMW, "minigpt_adamw"),
    )


# ----------------------------------------------------------------------------- GELU


def gelu_forward(x):
    """layers.gelu_forward in one kernel: (out like x, cache (x2 (N, 4C), th))."""
    CALLS["gelu_forward"] += 1
    x2 = x.reshape(-1, x.shape[-1])  # (N, 4C)
    with METER.op(kind="gelu", op="tanh") as c:
        th, out = _kernels().gelu_forward(x2)
        c.count(elements=x.size, bytes_read=x.nbytes, bytes_written=out.nbytes + th.nbytes,
                dtype=x.dtype)
    return out.reshape(x.shape), (x2, th)


def gelu_backward(dout, cache):
    """layers.gelu_backward in one kernel: dx like dout."""
    CALLS["gelu_backward"] += 1
    x2, th = cache  # (N, 4C) each
    d2 = dout.reshape(x2.shape)
    with METER.op(kind="gelu", op="grad") as c:
        dx = _kernels().gelu_backward(x2, th, d2)
        c.count(elements=x2.size, bytes_read=x2.nbytes + th.nbytes + dout.nbytes,
                bytes_written=dx.nbytes, dtype=x2.dtype)
    return dx.reshape(dout.shape)


# ----------------------------------------------------------------------------- causal softmax


def causal_softmax_forward(scores, scale, pos0=0):
    """layers.causal_softmax_forward: softmax over keys of scale * scores with the causal mask,
    in place on contiguous scores (B, H, T, Tk); returns scores."""
    CALLS["causal_softmax_forward"] += 1
    if not scores.flags.c_contiguous:
        raise ValueError("causal_softmax_forward works in place on a contiguous array")
    k = _kernels()
    T, Tk = scores.shape[-2:]
    dt = scores.dtype.type
    with METER.op(kind="softmax", op="causal") as c:
        k.scale_mask(dt(scale), T, Tk, pos0, dt(-math.inf), scores)
        peak = scores.max(axis=-1, keepdims=True)  # (B, H, T, 1); key 0 is always visible
        total = k.sum_exp(scores, peak, axis=-1, keepdims=True)  # (B, H, T, 1)
        k.exp_div(peak, total, scores)
        c.count(elements=scores.size, bytes_read=scores.nbytes, bytes_written=scores.nbytes,
                dtype=scores.dtype)
    return scores


def causal_softmax_backward(datt, att, scale):
    """layers.causal_softmax_backward: dscores = scale * att * (datt - sum(datt * att)) per row."""
    CALLS["causal_softmax_backward"] += 1
    k = _kernels()
    with METER.op(kind="softmax", op="grad") as c:
        total = k.sum_prod(datt, att, axis=-1, keepdims=True)  # (B, H, T, 1)
        dscores = k.softmax_grad(datt, att, total, att.dtype.type(scale))  # (B, H, T, Tk)
        c.count(elements=att.size, bytes_read=datt.nbytes + att.nbytes,
                bytes_written=dscores.nbytes, dtype=att.dtype)
    return dscores


# ----------------------------------------------------------------------------- AdamW


def adamw_update(p, g, m, v, n_decay: int, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float, t: int) -> None:
    """AdamW.step's update of the flat buffers p, m, v (in place) from the gradient g, at step t
    (1-based, already advanced), weight decay on p[:n_decay] only; recorded as AdamW.step is."""
    CALLS["adamw_update"] += 1
    dt = p.dtype.type  # the scalars round to the buffers' dtype, as NumPy rounds them
    with METER.scope(scopes.ADAMW), METER.op(kind="adamw", op="update") as c:
        _kernels().adamw(g, dt(1.0 - lr * weight_decay), dt(beta1), dt(1.0 - beta1), dt(beta2),
                         dt(1.0 - beta2), dt(math.sqrt(1.0 - beta2**t)), dt(eps),
                         dt(lr / (1.0 - beta1**t)), n_decay, p, m, v)
        c.count(elements=p.size, bytes_read=p.nbytes + g.nbytes + m.nbytes + v.nbytes,
                bytes_written=p.nbytes + m.nbytes + v.nbytes, dtype=p.dtype)
