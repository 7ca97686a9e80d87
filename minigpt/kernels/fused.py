"""Fused elementwise kernels of a training step, compiled with Numba: each reads its inputs once
and writes its outputs once, where NumPy's twin (minigpt/nn/layers.py) makes one pass over memory
per operation. Rows run in parallel (prange) over Numba's threads.

Every kernel here has a NumPy reference in layers.py or train/optim.py; tests/test_fused.py checks
each against it and against finite differences in float64. Sums over a row are carried in float64
scalars whatever the arrays' dtype. The layers call these through counted blocks (METER.op) whose
records carry the FLOPs each kernel does and the bytes it moves (FLOPS_PER_ELEMENT's "_fused" ops).

exp and tanh. Numba calls the C library's scalar exp and tanh, one element at a time, several times
slower than NumPy's vectorised float32 loops; for float32 arrays (`fast`) the kernels use exp_fast
and tanh_fast below instead, plain arithmetic the compiler vectorises, accurate to about 1e-11
relative (far inside float32's 6e-8). float64 arrays (gradient checks) keep the library's.

Kernels that sum over rows (the gradients of LayerNorm's w and b, of a bias) give each of `parts`
row chunks its own partial sums and add the chunks at the end, so the result does not depend on
how threads were scheduled.
"""

import math
import os

# Numba's OpenMP threads, idle between two kernels, would otherwise spin on the cores OpenBLAS's
# threads need for the matrix product that follows: on our shared 2-core machine that spinning
# made a training step's elementwise passes several times slower (docs/benchmarks.md). Passive:
# they sleep at once. Read when OpenMP starts (the first parallel kernel); a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numba  # after the variable OpenMP reads (set above)
import numpy as np
from numba import njit, prange

from minigpt.kernels import fused_threads_here

# One thread unless NUMBA_NUM_THREADS says otherwise: beside OpenBLAS's threads on a 2-core
# machine a training step ran faster with these kernels on one thread than on two, and Numba's
# second thread slowed the step's matrix products several times over (docs/benchmarks.md), though
# each kernel alone runs faster on two. The packed decode kernels (kernels/quant.py) take every
# core for their own calls.
fused_threads_here()  # this thread's; other threads that run the model call it themselves

# Reassociation lets the compiler vectorise sums (row means, dot products): results change in the
# last bits only. No "no NaNs / no infinities" assumptions: a softmax starts its max at -inf.
FAST = {"reassoc", "contract", "nsz", "arcp"}
GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def parts(rows: int) -> int:
    """How many row chunks a reducing kernel splits its rows into: a few per thread."""
    return max(1, min(rows, 4 * numba.get_num_threads()))


def fast(a) -> bool:
    """Whether a kernel on array a may use exp_fast and tanh_fast: float32 (or narrower) data."""
    return a.dtype.itemsize < 8


@njit(inline="always", fastmath=FAST)
def exp_fast(t):  # pragma: no cover - compiled
    """e^t for t clamped to [-80, 80] (e^-80 is below float32's smallest normal ratio of use):
    e^t = (e^(t/128))^128, the inner power by its Taylor series to degree 12 (|t/128| <= 0.625,
    truncation below 4e-13 relative), then squared seven times (errors grow 128-fold: ~5e-11)."""
    r = min(max(t, -80.0), 80.0) * (1.0 / 128.0)
    p = 1.0 + r / 12.0
    p = 1.0 + r / 11.0 * p
    p = 1.0 + r / 10.0 * p
    p = 1.0 + r / 9.0 * p
    p = 1.0 + r / 8.0 * p
    p = 1.0 + r / 7.0 * p
    p = 1.0 + r / 6.0 * p
    p = 1.0 + r / 5.0 * p
    p = 1.0 + r / 4.0 * p
    p = 1.0 + r / 3.0 * p
    p = 1.0 + r / 2.0 * p
    p = 1.0 + r * p
    for _ in range(7):
        p = p * p
    return p


@njit(inline="always", fastmath=FAST)
def tanh_fast(z):  # pragma: no cover - compiled
    """tanh z = 1 - 2 / (e^(2z) + 1): exact saturation to +-1 as e^(2z) grows or vanishes."""
    return 1.0 - 2.0 / (exp_fast(2.0 * z) + 1.0)


# ----------------------------------------------------------------------------- layernorm


@njit(parallel=True, cache=True, fastmath=FAST)
def layernorm_forward(x, w, b, eps, out, mean, rstd):  # pragma: no cover - compiled
    """out = (x - mean) * rstd * w + b per row of x (N, C); mean and rstd (N,) kept."""
    N, C = x.shape
    for i in prange(N):
        m = 0.0
        for j in range(C):
            m += x[i, j]
        m /= C
        var = 0.0
        for j in range(C):
            d = x[i, j] - m
            var += d * d
        r = 1.0 / math.sqrt(var / C + eps)
        mean[i] = m
        rstd[i] = r
        for j in range(C):
            out[i, j] = (x[i, j] - m) * r * w[j] + b[j]


@njit(parallel=True, cache=True, fastmath=FAST)
def residual_layernorm_forward(x, a, w, b, eps, out, mean, rstd):  # pragma: no cover - compiled
    """a = x + a (the residual stream, written over the branch a), then layernorm_forward of it."""
    N, C = x.shape
    for i in prange(N):
        m = 0.0
        for j in range(C):
            s = x[i, j] + a[i, j]
            a[i, j] = s
            m += s
        m /= C
        var = 0.0
        for j in range(C):
            d = a[i, j] - m
            var += d * d
        r = 1.0 / math.sqrt(var / C + eps)
        mean[i] = m
        rstd[i] = r
        for j in range(C):
            out[i, j] = (a[i, j] - m) * r * w[j] + b[j]


@njit(parallel=True, cache=True, fastmath=FAST)
def layernorm_backward(dout, x, mean, rstd, w, dx, dw, db, accumulate, n_parts):  # pragma: no cover
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * w, xhat
    recomputed from x, mean and rstd; added into dx if accumulate (the residual stream's gradient),
    else written (dx may be dout itself). dw += sum of dout * xhat, db += sum of dout, over rows."""
    N, C = x.shape
    pw = np.zeros((n_parts, C))
    pb = np.zeros((n_parts, C))
    for k in prange(n_parts):
        for i in range(k * N // n_parts, (k + 1) * N // n_parts):
            m, r = mean[i], rstd[i]
            s1 = 0.0
            s2 = 0.0
            for j in range(C):
                xh = (x[i, j] - m) * r
                g = dout[i, j]
                pw[k, j] += g * xh
                pb[k, j] += g
                gw = g * w[j]
                s1 += gw
                s2 += gw * xh
            s1 /= C
            s2 /= C
            for j in range(C):
                xh = (x[i, j] - m) * r
                v = r * (dout[i, j] * w[j] - s1 - xh * s2)
                if accumulate:
                    dx[i, j] += v
                else:
                    dx[i, j] = v
    for j in range(C):
        sw = 0.0
        sb = 0.0
        for k in range(n_parts):
            sw += pw[k, j]
            sb += pb[k, j]
        dw[j] += sw
        db[j] += sb


# ----------------------------------------------------------------------------- bias + GELU


@njit(parallel=True, cache=True, fastmath=FAST)
def bias_gelu_forward(h, b, out, fast):  # pragma: no cover - compiled
    """out = gelu(h + b), GPT-2's tanh form, per row of h (N, F); h (the product) is kept."""
    N, F = h.shape
    for i in prange(N):
        if fast:
            for j in range(F):
                u = h[i, j] + b[j]
                out[i, j] = 0.5 * u * (1.0 + tanh_fast(GELU_K * u * (1.0 + GELU_C * u * u)))
        else:
            for j in range(F):
                u = h[i, j] + b[j]
                out[i, j] = 0.5 * u * (1.0 + math.tanh(GELU_K * u * (1.0 + GELU_C * u * u)))


@njit(inline="always")
def _gelu_slope(u, t):  # pragma: no cover - compiled
    """d gelu / du at u, given t = tanh(sqrt(2/pi) (u + 0.044715 u^3))."""
    return 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * u * u)


@njit(parallel=True, cache=True, fastmath=FAST)
def bias_gelu_backward(dout, h, b, db, n_parts, fast):  # pragma: no cover - compiled
    """dout *= gelu'(h + b), in place; db += its sum over rows. In place rather than into another
    array that may be dout: the compiler vectorises a loop only where its arrays provably do
    not overlap, and two names for one array make it fall back to one element at a time."""
    N, F = h.shape
    pb = np.zeros((n_parts, F))
    for k in prange(n_parts):
        for i in range(k * N // n_parts, (k + 1) * N // n_parts):
            if fast:
                for j in range(F):
                    u = h[i, j] + b[j]
                    d = dout[i, j] * _gelu_slope(u, tanh_fast(GELU_K * u * (1.0 + GELU_C * u * u)))
                    dout[i, j] = d
                    pb[k, j] += d
            else:
                for j in range(F):
                    u = h[i, j] + b[j]
                    d = dout[i, j] * _gelu_slope(u, math.tanh(GELU_K * u * (1.0 + GELU_C * u * u)))
                    dout[i, j] = d
                    pb[k, j] += d
    for j in range(F):
        s = 0.0
        for k in range(n_parts):
            s += pb[k, j]
        db[j] += s


# ----------------------------------------------------------------------------- causal softmax


@njit(parallel=True, cache=True, fastmath=FAST)
def causal_softmax_forward(att, scale, pos0, fast):  # pragma: no cover - compiled
    """Softmax over keys of scale * att in place, att (R, T, Tk): query i sees keys j <= pos0 + i;
    the keys it cannot see are written 0 and never read."""
    R, T, Tk = att.shape
    for q in prange(R * T):
        r, i = q // T, q % T
        n = min(pos0 + i + 1, Tk)
        mx = -np.inf
        for j in range(n):
            mx = max(mx, att[r, i, j] * scale)
        s = 0.0
        if fast:
            for j in range(n):
                e = exp_fast(att[r, i, j] * scale - mx)
                att[r, i, j] = e
                s += e
        else:
            for j in range(n):
                e = math.exp(att[r, i, j] * scale - mx)
                att[r, i, j] = e
                s += e
        inv = 1.0 / s
        for j in range(n):
            att[r, i, j] *= inv
        for j in range(n, Tk):
            att[r, i, j] = 0.0


@njit(parallel=True, cache=True, fastmath=FAST)
def causal_softmax_backward(datt, att, scale, pos0):  # pragma: no cover - compiled
    """dscores = scale * att * (datt - sum(datt * att)) over the visible keys, written over datt;
    0 where the mask hid the key."""
    R, T, Tk = att.shape
    for q in prange(R * T):
        r, i = q // T, q % T
        n = min(pos0 + i + 1, Tk)
        s = 0.0
        for j in range(n):
            s += datt[r, i, j] * att[r, i, j]
        for j in range(n):
            datt[r, i, j] = scale * att[r, i, j] * (datt[r, i, j] - s)
        for j in range(n, Tk):
            datt[r, i, j] = 0.0


# ----------------------------------------------------------------------------- cross-entropy


@njit(parallel=True, cache=True, fastmath=FAST)
def cross_entropy_forward(logits, targets, probs, losses, fast):  # pragma: no cover - compiled
    """probs = softmax of each row of logits (N, V); losses[i] = -log probs[i, targets[i]],
    as log(sum exp) - the shifted target logit, in float64."""
    N, V = logits.shape
    for i in prange(N):
        mx = -np.inf
        for j in range(V):
            mx = max(mx, logits[i, j])
        s = 0.0
        if fast:
            for j in range(V):
                e = exp_fast(logits[i, j] - mx)
                probs[i, j] = e
                s += e
        else:
            for j in range(V):
                e = math.exp(logits[i, j] - mx)
                probs[i, j] = e
                s += e
        inv = 1.0 / s
        for j in range(V):
            probs[i, j] *= inv
        losses[i] = math.log(s) - (logits[i, targets[i]] - mx)


@njit(parallel=True, cache=True, fastmath=FAST)
def cross_entropy_backward(probs, targets, scale):  # pragma: no cover - compiled
    """dlogits = (probs - onehot(targets)) * scale, written over probs (N, V)."""
    N, V = probs.shape
    for i in prange(N):
        probs[i, targets[i]] -= 1.0
        for j in range(V):
            probs[i, j] *= scale


# ----------------------------------------------------------------------------- AdamW


@njit(parallel=True, cache=True, fastmath=FAST)
def adamw_update(p, g, m, v, n_decay, decay, b1, b2, eps, step_size, root_bc2):  # pragma: no cover
    """One AdamW step over the flat buffers in one pass: p *= decay on the first n_decay elements
    (the matrices), then the moments, then p -= step_size * m / (sqrt(v) / root_bc2 + eps)."""
    for i in prange(p.size):
        gi = g[i]
        mi = b1 * m[i] + (1.0 - b1) * gi
        vi = b2 * v[i] + (1.0 - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        pi = p[i] * decay if i < n_decay else p[i]
        p[i] = pi - step_size * mi / (math.sqrt(vi) / root_bc2 + eps)
