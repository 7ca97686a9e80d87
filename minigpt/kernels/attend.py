"""A decode step's attention over many KV caches in three calls, compiled with Numba.

A batched decode step (nn/decode.py) runs its weight products once over all B sequences, but each
sequence attends to its own cache. Done one sequence at a time, that is three NumPy calls per
sequence per layer (the scores, the softmax, the mix), each a few microseconds of work and as
much again of Python around it: at 64 sequences a GPT-2 step spent about 20 of its 65 ms there,
on 57 MB of cache reads. These kernels take every sequence's cache at once (a typed list of the
caches' arrays, (L, 1, Tmax, H, hs) each, as nn/model.KVCache holds them) with each sequence's
own length, so the caches may differ in length (ragged) and need not share memory.

Sequence b's new token is its cache's last position, lengths[b] - 1: `scores` first stores that
token's key and value there (the cache write the NumPy path does with an assignment), then
computes att[b, h, t] = q[b, h] . key[t] for t < lengths[b]. `softmax` turns each row into the
softmax of scale * att over its own length, and `mix` sums the values by those weights. Entries of
att past a sequence's length are neither written nor read.

Each sequence's keys are read position by position, all heads of a position together: one
contiguous run of H * hs values, the order the cache stores them (a head at a time would read
rows H * hs apart). Sequences run in parallel (prange over b). Sums are carried in the arrays'
dtype, as the BLAS products of the NumPy path do.

The NumPy path (layers.cached_attention, once per sequence) is the reference;
tests/test_attend.py checks these kernels against it, ragged lengths included.
"""

import math

import numpy as np
from numba import njit, prange

from minigpt.kernels.fused import FAST, exp_fast


@njit(parallel=True, cache=True, fastmath=FAST)
def scores(q, k_new, v_new, keys, values, layer, lengths, att, parts):  # pragma: no cover - compiled
    """Store k_new[b], v_new[b] (B, H, hs) at position lengths[b] - 1 of layer `layer` of caches
    keys[b], values[b]; then att[b, h, t] = q[b, h] . keys[b][layer, 0, t, h] for t < lengths[b].
    q (B, H, hs); att (B, H, Tmax) with Tmax >= max(lengths). parts: each sequence's heads are
    split into this many runs of heads, a task each (threads beyond the sequences get work)."""
    B, H, hs = q.shape
    zero = np.zeros(1, att.dtype)[0]  # sums in the arrays' dtype
    for task in prange(B * parts):
        b, part = task // parts, task % parts
        h0, h1 = part * H // parts, (part + 1) * H // parts
        k, v, n = keys[np.int64(b)], values[np.int64(b)], lengths[b]  # prange counts unsigned
        for h in range(h0, h1):
            for d in range(hs):
                k[layer, 0, n - 1, h, d] = k_new[b, h, d]
                v[layer, 0, n - 1, h, d] = v_new[b, h, d]
        for t in range(n):
            for h in range(h0, h1):
                s = zero  # from 0 over all hs terms: a whole number of vectors, no scalar remainder
                for d in range(hs):
                    s += q[b, h, d] * k[layer, 0, t, h, d]
                att[b, h, t] = s


@njit(parallel=True, cache=True, fastmath=FAST)
def softmax(att, lengths, scale, fast):  # pragma: no cover - compiled
    """att[b, h, :lengths[b]] = softmax(scale * att[b, h, :lengths[b]]), in place; the rest of each
    row untouched. fast: exp_fast (float32 data; kernels/fused.py) in place of the C library's."""
    B, H, _ = att.shape
    for r in prange(B * H):
        b, h = r // H, r % H
        n = lengths[b]
        mx = -np.inf
        for t in range(n):
            mx = max(mx, att[b, h, t] * scale)
        total = 0.0
        for t in range(n):
            e = exp_fast(att[b, h, t] * scale - mx) if fast else math.exp(att[b, h, t] * scale - mx)
            att[b, h, t] = e
            total += e
        inv = 1.0 / total
        for t in range(n):
            att[b, h, t] *= inv


@njit(parallel=True, cache=True, fastmath=FAST)
def mix(att, values, layer, lengths, y, parts):  # pragma: no cover - compiled
    """y[b, h] = sum over t < lengths[b] of att[b, h, t] * values[b][layer, 0, t, h]. y (B, H, hs);
    parts: as scores'."""
    B, H, hs = y.shape
    for task in prange(B * parts):
        b, part = task // parts, task % parts
        h0, h1 = part * H // parts, (part + 1) * H // parts
        v, n = values[np.int64(b)], lengths[b]
        acc = np.zeros((h1 - h0, hs), y.dtype)  # the sums stay here, apart from y and the cache
        for t in range(n):
            for h in range(h0, h1):
                a = att[b, h, t]
                for d in range(hs):
                    acc[h - h0, d] += a * v[layer, 0, t, h, d]
        for h in range(h0, h1):
            for d in range(hs):
                y[b, h, d] = acc[h - h0, d]
