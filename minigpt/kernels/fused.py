"""Fused elementwise kernels of a training step, compiled with Numba: each reads its inputs once
and writes its outputs once, where NumPy's twin (minigpt/nn/layers.py) makes one pass over memory
per operation. Rows run in parallel (prange) over Numba's threads.

Every kernel here has a NumPy reference in layers.py or train/optim.py; tests/test_fused.py checks
each against it and against finite differences in float64. Sums over a row are carried in float64
scalars whatever the arrays' dtype. The layers call these through counted blocks (METER.op) whose
records carry the FLOPs each kernel does and the bytes it moves (FLOPS_PER_ELEMENT's "_fused" ops).

Kernels that sum over rows (the gradients of LayerNorm's w and b, of a bias) give each of `parts`
row chunks its own partial sums and add the chunks at the end, so the result does not depend on
how threads were scheduled.
"""

import math

import numba
import numpy as np
from numba import njit, prange

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715


def parts(rows: int) -> int:
    """How many row chunks a reducing kernel splits its rows into: a few per thread."""
    return max(1, min(rows, 4 * numba.get_num_threads()))


# ----------------------------------------------------------------------------- layernorm


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def bias_gelu_forward(h, b, out):  # pragma: no cover - compiled
    """out = gelu(h + b), GPT-2's tanh form, per row of h (N, F); h (the product) is kept."""
    N, F = h.shape
    for i in prange(N):
        for j in range(F):
            u = h[i, j] + b[j]
            t = math.tanh(GELU_K * u * (1.0 + GELU_C * u * u))
            out[i, j] = 0.5 * u * (1.0 + t)


@njit(parallel=True, cache=True)
def bias_gelu_backward(dout, h, b, dx, db, n_parts):  # pragma: no cover - compiled
    """dx = dout * gelu'(h + b) (dx may be dout itself); db += its sum over rows."""
    N, F = h.shape
    pb = np.zeros((n_parts, F))
    for k in prange(n_parts):
        for i in range(k * N // n_parts, (k + 1) * N // n_parts):
            for j in range(F):
                u = h[i, j] + b[j]
                uu = u * u
                t = math.tanh(GELU_K * u * (1.0 + GELU_C * uu))
                slope = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * uu)
                d = dout[i, j] * slope
                dx[i, j] = d
                pb[k, j] += d
    for j in range(F):
        s = 0.0
        for k in range(n_parts):
            s += pb[k, j]
        db[j] += s


# ----------------------------------------------------------------------------- causal softmax


@njit(parallel=True, cache=True)
def causal_softmax_forward(att, scale, pos0):  # pragma: no cover - compiled
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
        for j in range(n):
            e = math.exp(att[r, i, j] * scale - mx)
            att[r, i, j] = e
            s += e
        inv = 1.0 / s
        for j in range(n):
            att[r, i, j] *= inv
        for j in range(n, Tk):
            att[r, i, j] = 0.0


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def cross_entropy_forward(logits, targets, probs, losses):  # pragma: no cover - compiled
    """probs = softmax of each row of logits (N, V); losses[i] = -log probs[i, targets[i]],
    as log(sum exp) - the shifted target logit, in float64."""
    N, V = logits.shape
    for i in prange(N):
        mx = -np.inf
        for j in range(V):
            mx = max(mx, logits[i, j])
        s = 0.0
        for j in range(V):
            e = math.exp(logits[i, j] - mx)
            probs[i, j] = e
            s += e
        inv = 1.0 / s
        for j in range(V):
            probs[i, j] *= inv
        losses[i] = math.log(s) - (logits[i, targets[i]] - mx)


@njit(parallel=True, cache=True)
def cross_entropy_backward(probs, targets, scale):  # pragma: no cover - compiled
    """dlogits = (probs - onehot(targets)) * scale, written over probs (N, V)."""
    N, V = probs.shape
    for i in prange(N):
        probs[i, targets[i]] -= 1.0
        for j in range(V):
            probs[i, j] *= scale


# ----------------------------------------------------------------------------- AdamW


@njit(parallel=True, cache=True)
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
