"""Products of float32 activations and packed 16-, 8- and 4-bit weights, for decode on the CPU.

A decode step streams every weight once, so its speed is bytes per second divided by bytes per
weight; NumPy has no product that reads narrow weights and would widen each to float32 in memory
first (four bytes written and read back for every one it saves). These kernels read the packed
bytes and widen them in registers.

Layout (what `pack_*` returns and the kernels read): the weight (K, M) of x (N, K) @ w is cut into
column tiles of W = tile_width(M, bits) output channels, zero-padded to a whole number of tiles,
and each tile stored contiguously, row k after row k - 1: (M_pad / W, K, W). One thread takes one
tile at a time and streams it front to back.

- 16 and 8 bits: tiles of minigpt/kernels/tiles.py's WIDTH (32) channels, and its kernels: up to
  8 rows' 32 sums held in registers over the whole pass over k, each weight widened to float32 in
  a register as it is read (one multiply-add a row), the 8-bit channel scales applied once at the
  end. Against the loops below, whose sums live in the first-level cache: 8 rows of 16-bit
  weights 19 -> 9 ms a GPT-2 step's products, one row of 8-bit 3.3 -> 2.6-3.1 ms
  (docs/benchmarks.md).
- 8 bits: int8, one float32 scale per output channel: w[k, j] = q[k, j] * scale[j].
- 4 bits: two weights a byte (row 2i in the low nibble, 2i + 1 in the high), stored as q + 8 with
  q in [-7, 7]; one fp16 scale per group of G consecutive inputs of each output channel (half a
  float32's bytes: at G = 32 the scales are a fifth of the bytes a product reads, and the kernel
  keeps up with the memory, so every byte is time), widened in the kernel as the 16-bit weights
  are: w[k, j] = q[k, j] * scale[k // G, j]. Tiles of TILE (256) channels, (M_pad / W, K / 2, W),
  and scales (M_pad / W, K / G, W); the kernel below keeps its N x W float32 sums in the core's
  first-level cache, and the innermost loop, over the W channels of a row, is the one the
  compiler vectorizes.
  The activations are rounded to int8 too, one float32 scale per row and group (xs = max |x| /
  127, xq = rint(x / xs)), and the product runs in integers: widening a nibble to float32 and a
  float multiply-add for every weight held this kernel at 30 GB/s of packed weight on two cores,
  below the memory's 40-50, where 16-bit integer multiply-adds, twice as many to an instruction,
  keep up with it (the scheme llama.cpp's 4-bit formats use on CPUs). A chunk of `chunk(G)`
  inputs (32 at most) sums in 16-bit integers, then joins the float32 accumulator as float(sum) *
  (scale * xs); chunks in order. The sum runs over the stored nibbles u = q + 8 as they are (no
  subtraction per weight) and takes 8 x sum(xq) off once a chunk; its 16-bit lanes may wrap on the
  way, but wrapping is arithmetic modulo 2**16, and the true sum fits in int16 (|xq| <= 127,
  |q| <= 7: at most 28,448), so what is left after the bias comes off is exact.
- 16 bits: IEEE half (fp16) or bfloat16 bit patterns as uint16, no scales. bf16 widens by a shift;
  fp16 by the compiler's own half-to-float conversion (LLVM's fpext, one F16C instruction for eight
  weights on x86-64 since 2013), exact for every finite half, subnormals included.

The sums run over k in a fixed order in float32 (16 and 8 bits: one fused multiply-add a weight,
in order), so a result is the same on any number of threads. minigpt.nn.lowbit holds the NumPy
twins the tests compare against (the 4-bit one equal bit for bit), and calls these through the
meter. Without Numba this module still packs (pure NumPy) and `kernels()` refuses.
"""

from contextlib import contextmanager
from functools import cache

import numpy as np

from minigpt.kernels import AVAILABLE, tiles

TILE = 256  # output channels a 4-bit tile: wide enough to keep a core's loads streaming
CHUNK = 32  # the most inputs a 4-bit chunk sums in 16-bit integers (module docstring)
TINY = np.float32(np.finfo(np.float32).tiny)  # the least activation scale: never zero
FP16_ONE = np.float16(1.0).view(np.uint16)  # the bits of a padding channel's 4-bit scale


@cache  # called for every 4-bit product of a decode step
def chunk(G: int) -> int:
    """Inputs a 4-bit chunk sums in 16-bit integers for groups of G (even): the largest even
    divisor of G up to CHUNK, so that a chunk never straddles two groups' scales."""
    return max(c for c in range(2, min(G, CHUNK) + 1, 2) if G % c == 0)


def tile_width(M: int, bits: int) -> int:
    """Output channels per tile for a `bits`-bit weight with M of them: 16 and 8 bits
    tiles.WIDTH; 4 bits TILE, or M rounded up to 8 if fewer."""
    if bits != 4:
        return tiles.WIDTH
    return TILE if M >= TILE else -(-M // 8) * 8


def padded(M: int, bits: int) -> int:
    """M rounded up to a whole number of tiles."""
    W = tile_width(M, bits)
    return -(-M // W) * W


def _tiles(a, W):
    """(K, M_pad) -> (M_pad / W, K, W), contiguous."""
    K, M = a.shape
    return np.ascontiguousarray(a.reshape(K, M // W, W).transpose(1, 0, 2))


def _pad(a, M_pad, fill=0):
    K, M = a.shape
    if M == M_pad:
        return a
    out = np.full((K, M_pad), fill, dtype=a.dtype)
    out[:, :M] = a
    return out


def pack_int8(q, scale):
    """q (K, M) int8 and scale (M,) float32 -> tiles (T, K, W) int8, scales (T, W) float32."""
    M = q.shape[1]
    W, M_pad = tile_width(M, 8), padded(M, 8)
    s = _pad(np.asarray(scale, np.float32).reshape(1, M), M_pad, 1.0)
    return _tiles(_pad(q, M_pad), W), s.reshape(M_pad // W, W).copy()


def pack_int4(q, scale):
    """q (K, M) int8 in [-7, 7], scale (K / G, M) (values fp16 holds) -> tiles (T, K / 2, W)
    uint8 (two weights a byte, biased by 8), scales (T, K / G, W) uint16: their fp16 bits."""
    M = q.shape[1]
    W, M_pad = tile_width(M, 4), padded(M, 4)
    b = _pad((q.astype(np.int16) + 8).astype(np.uint8), M_pad, 8)  # padding decodes to 0
    nibbles = (b[0::2] | (b[1::2] << 4)).astype(np.uint8)  # (K / 2, M_pad)
    s = _pad(np.asarray(scale, np.float16).view(np.uint16), M_pad, FP16_ONE)
    return _tiles(nibbles, W), _tiles(s, W)


def pack_16(bits):
    """bits (K, M) uint16 (fp16 or bf16 patterns) -> tiles (T, K, W) uint16."""
    M = bits.shape[1]
    return _tiles(_pad(bits, padded(M, 16)), tile_width(M, 16))


def unpack(tiles, M):
    """Tiles (T, R, W) -> (R, M): the inverse of _tiles and _pad (for the NumPy twins)."""
    T, R, W = tiles.shape
    return tiles.transpose(1, 0, 2).reshape(R, T * W)[:, :M]


def _build():
    """The Numba kernels, compiled on first use and cached on disk: the 4-bit one here, the 16-
    and 8-bit ones kernels/tiles.py's."""
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def half_as_float32(typingctx, u):
        """The float32 value of the IEEE half whose bits are the uint16 u (exact; vectorizes)."""
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    # The innermost loops read the packed row (an integer type) and accumulate into integers or
    # float32: the compiler can tell by type that the two never overlap, and vectorizes.

    @njit(parallel=True, cache=True)
    def w4(x, q, scale, chunk, out):
        N, K = x.shape
        T, _, W = q.shape
        n_groups = scale.shape[1]
        G = K // n_groups
        M = out.shape[1]
        xq = np.empty((N, K), np.int16)  # the activations' int8 values
        xs = np.empty((N, n_groups), np.float32)  # and their scales
        for n in range(N):
            for g in range(n_groups):
                m = np.float32(0.0)
                for k in range(g * G, (g + 1) * G):
                    m = max(m, abs(x[n, k]))
                s = max(m / np.float32(127.0), TINY) if m > 0 else np.float32(1.0)
                xs[n, g] = s
                for k in range(g * G, (g + 1) * G):
                    xq[n, k] = np.int16(np.rint(x[n, k] / s))
        n_chunks = K // chunk
        bias = np.empty((N, n_chunks), np.int32)  # 8 x each chunk's sum of xq: the nibbles' bias
        for n in range(N):
            for c in range(n_chunks):
                total = 0
                for k in range(c * chunk, (c + 1) * chunk):
                    total += xq[n, k]
                bias[n, c] = 8 * total
        rows = chunk // 2  # byte rows a chunk
        per_group = G // chunk
        for t in prange(T):
            acc = np.zeros((N, W), np.float32)
            part = np.empty((N, W), np.int16)
            qt = q[t]
            for g in range(n_groups):
                sg = scale[t, g]  # fp16 bits
                for c in range(per_group):
                    part[:] = 0
                    ci = g * per_group + c
                    i = ci * rows
                    end = i + rows
                    while i + 1 < end:  # two byte rows (four inputs) a pass over the sums
                        r0 = qt[i]
                        r1 = qt[i + 1]
                        for n in range(N):
                            x0 = xq[n, 2 * i]
                            x1 = xq[n, 2 * i + 1]
                            x2 = xq[n, 2 * i + 2]
                            x3 = xq[n, 2 * i + 3]
                            p = part[n]
                            for j in range(W):  # the biased nibbles, in [0, 15]; wraps mod 2**16
                                u = np.int16(r0[j])
                                v = np.int16(r1[j])
                                p[j] += (x0 * (u & np.int16(15)) + x1 * (u >> np.int16(4))
                                         + x2 * (v & np.int16(15)) + x3 * (v >> np.int16(4)))
                        i += 2
                    if i < end:  # an odd number of byte rows a chunk: the last alone
                        r0 = qt[i]
                        for n in range(N):
                            x0 = xq[n, 2 * i]
                            x1 = xq[n, 2 * i + 1]
                            p = part[n]
                            for j in range(W):
                                u = np.int16(r0[j])
                                p[j] += x0 * (u & np.int16(15)) + x1 * (u >> np.int16(4))
                    for n in range(N):
                        a = acc[n]
                        p = part[n]
                        b = bias[n, ci]
                        sx = xs[n, g]
                        for j in range(W):  # the bias off, the exact sum back in int16
                            a[j] += np.float32(np.int16(p[j] - b)) * (half_as_float32(sg[j]) * sx)
            j0 = t * W
            for n in range(N):
                for j in range(min(W, M - j0)):
                    out[n, j0 + j] = acc[n, j]

    return {4: w4, **{bits: tiles.kernels()[bits] for bits in (8, 16)}}


_KERNELS: dict | None = None


def kernels() -> dict:
    """{bits: kernel}, compiled (or loaded from Numba's cache) on first call; needs Numba."""
    global _KERNELS
    if _KERNELS is None:
        if not AVAILABLE:
            raise RuntimeError("the packed-weight kernels need Numba")
        _KERNELS = _build()
    return _KERNELS


def product(x, bits: int, data, scale, bf16: bool, M: int):
    """x (N, K) float32 @ the packed weight -> (N, M) float32, by the Numba kernel for `bits`."""
    if bits == 4 and scale.dtype != np.uint16:  # Numba would compile it, and read garbage
        raise TypeError(f"4-bit scales are fp16 bits (uint16, pack_int4), not {scale.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], M), np.float32)
    k = kernels()[bits]
    if bits == 16:
        on_threads(k, x, data, bf16, out)
    elif bits == 8:
        on_threads(k, x, data, scale, out)
    else:
        on_threads(k, x, data, scale, chunk(x.shape[1] // scale.shape[1]), out)
    return out


def on_threads(kernel, *args) -> None:
    """kernel(*args) on every core (or NUMBA_NUM_THREADS; `threads` below), whatever the fused
    training kernels set for theirs (one thread: kernels/fused.py): a decode step streams the
    weights, which one core alone cannot read at the memory's bandwidth."""
    get, set_ = _thread_count_calls()
    before = get()
    if before != _THREADS:
        set_(_THREADS)
    try:
        kernel(*args)
    finally:
        if before != _THREADS:
            set_(before)


@cache
def _thread_count_calls():
    """(get, set) of this thread's Numba thread count. numba.get_num_threads and set_num_threads
    check their argument and the thread pool on every call, 2 microseconds for the three calls a
    product makes, 0.1 ms of a 4-bit decode step's 3; the threading layer's own two functions,
    which those end in, take a fifth of that. They are Numba's internals: where a Numba lacks
    them, the public pair."""
    import numba
    from numba.np.ufunc import parallel

    numba.get_num_threads()  # starts the thread pool, which the internal pair needs
    get, set_ = getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None)
    if get is None or set_ is None:
        return numba.get_num_threads, numba.set_num_threads
    return get, set_


@contextmanager
def threads(n: int):
    """`with threads(n):` packed products run on n threads (at most Numba's) inside the block;
    Numba's own setting, which the fused training kernels use, is left alone."""
    global _THREADS
    outer, _THREADS = _THREADS, max(1, min(n, _max_threads()))
    try:
        yield
    finally:
        _THREADS = outer


def _max_threads() -> int:
    if not AVAILABLE:
        return 1
    import numba

    return numba.config.NUMBA_NUM_THREADS  # NUMBA_NUM_THREADS, else the cores numba sees


_THREADS = _max_threads()
