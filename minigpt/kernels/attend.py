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
    split into this many runs of heads, a task each (threads beyond the sequences get work).
    Four positions at a time: four independent sums per head, where one alone waits on its own
    reduction (64 GPT-2 sequences, 70 positions: 6.3 -> 4.7 ms a step, against 4.1 for reading
    the keys alone); each sum runs as before."""
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
        kl = k[layer, 0]  # (Tmax, H, hs)
        t = 0
        while t + 4 <= n:
            for h in range(h0, h1):
                qh, r0, r1, r2, r3 = q[b, h], kl[t, h], kl[t + 1, h], kl[t + 2, h], kl[t + 3, h]
                s0 = s1 = s2 = s3 = zero  # from 0 over all hs terms: whole vectors, no remainder
                for d in range(hs):
                    s0 += qh[d] * r0[d]
                    s1 += qh[d] * r1[d]
                    s2 += qh[d] * r2[d]
                    s3 += qh[d] * r3[d]
                att[b, h, t], att[b, h, t + 1], att[b, h, t + 2], att[b, h, t + 3] = s0, s1, s2, s3
            t += 4
        while t < n:
            for h in range(h0, h1):
                qh, r0 = q[b, h], kl[t, h]
                s0 = zero
                for d in range(hs):
                    s0 += qh[d] * r0[d]
                att[b, h, t] = s0
            t += 1


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
    parts: as scores'. Four positions a pass over each head's sums, added in order (the same
    sums; each sum loaded and stored once for four: 64 sequences 5.8 -> 5.1 ms a step)."""
    B, H, hs = y.shape
    for task in prange(B * parts):
        b, part = task // parts, task % parts
        h0, h1 = part * H // parts, (part + 1) * H // parts
        v, n = values[np.int64(b)], lengths[b]
        vl = v[layer, 0]  # (Tmax, H, hs)
        acc = np.zeros((h1 - h0, hs), y.dtype)  # the sums stay here, apart from y and the cache
        t = 0
        while t + 4 <= n:
            for h in range(h0, h1):
                a0, a1, a2, a3 = att[b, h, t], att[b, h, t + 1], att[b, h, t + 2], att[b, h, t + 3]
                r0, r1, r2, r3 = vl[t, h], vl[t + 1, h], vl[t + 2, h], vl[t + 3, h]
                ah = acc[h - h0]
                for d in range(hs):
                    ah[d] = (((ah[d] + a0 * r0[d]) + a1 * r1[d]) + a2 * r2[d]) + a3 * r3[d]
            t += 4
        while t < n:
            for h in range(h0, h1):
                a, r0, ah = att[b, h, t], vl[t, h], acc[h - h0]
                for d in range(hs):
                    ah[d] += a * r0[d]
            t += 1
        for h in range(h0, h1):
            for d in range(hs):
                y[b, h, d] = acc[h - h0, d]
