"""Products of float32 activations and packed 16-, 8- and 4-bit weights, for decode on the CPU.

A decode step streams every weight once, so its speed is bytes per second divided by bytes per
weight; NumPy has no product that reads narrow weights and would widen each to float32 in memory
first (four bytes written and read back for every one it saves). These kernels read the packed
bytes and widen them in registers.

Layout (what `pack_*` returns and the kernels read): the weight (K, M) of x (N, K) @ w is cut into
column tiles of minigpt/kernels/tiles.py's WIDTH (32) output channels, zero-padded to a whole
number of tiles, and each tile stored contiguously, row k after row k - 1: (M_pad / 32, K, 32).
One thread takes one tile at a time and streams it front to back. The kernels are tiles.py's: up
to 8 rows' (4 at 4 bits) sums of a tile held in registers for the whole pass over k, each weight
widened in a register as it is read. Against the loops they replaced, whose sums lived in the
first-level cache and whose 256-channel tiles were read in strips: a GPT-2 step's products of 8
rows 19 -> 9 ms at 16 bits and 7.9 -> 5.3 ms at 4, of one row 3.3 -> 2.6-3.1 ms at 8 bits and
1.58 -> 1.35 ms at 4 (docs/benchmarks.md).

- 8 bits: int8, one float32 scale per output channel: w[k, j] = q[k, j] * scale[j].
- 4 bits: two weights a byte (row 2i in the low nibble, 2i + 1 in the high), stored as q + 8 with
  q in [-7, 7]; one fp16 scale per group of G consecutive inputs of each output channel (half a
  float32's bytes: at G = 32 the scales are a fifth of the bytes a product reads, and the kernel
  keeps up with the memory, so every byte is time), widened in the kernel as the 16-bit weights
  are: w[k, j] = q[k, j] * scale[k // G, j]. Tiles (M_pad / 32, K / 2, 32) (a byte row holds
  inputs 2i and 2i + 1 of the tile's 32 channels), scales (M_pad / 32, K / G, 32).
  The activations are rounded to int8 too, one float32 scale per row and group (xs = max |x| /
  127, xq = rint(x / xs)), and the product runs in integers: widening a nibble to float32 and a
  float multiply-add for every weight held this kernel at 30 GB/s of packed weight on two cores,
  below the memory's 40-50, where 16-bit integer multiply-adds, twice as many to an instruction,
  keep up with it (the scheme llama.cpp's 4-bit formats use on CPUs). A chunk of `chunk(G)`
  inputs (32 at most) sums in 16-bit integers (one register of 32 lanes a row; with AVX-512
  VNNI, four inputs at a time into 32-bit lanes: tiles.py's int4_block with vnni, the same
  sums), then joins the float32 accumulator as float(sum) * (scale * xs), a multiply and an add
  (not fused); chunks in order. The sum runs over the stored nibbles u = q + 8 as they are (no
  subtraction per weight) and takes 8 x sum(xq) off once a chunk; its 16-bit lanes may wrap on the
  way, but wrapping is arithmetic modulo 2**16, and the true sum fits in int16 (|xq| <= 127,
  |q| <= 7: at most 28,448), so what is left after the bias comes off is exact.
- 16 bits: IEEE half (fp16) or bfloat16 bit patterns as uint16, no scales. bf16 widens by a shift;
  fp16 by the compiler's own half-to-float conversion (LLVM's fpext, one F16C instruction for eight
  weights on x86-64 since 2013), exact for every finite half, subnormals included.

The sums run over k in a fixed order in float32 (16 and 8 bits: one fused multiply-add a weight,
in order, over 4 / R sets of inputs for R = 1 or 2 rows, added at the end), so a result is the
same on any number of threads. minigpt.nn.lowbit holds the NumPy
twins the tests compare against (the 4-bit one equal bit for bit), and calls these through the
meter. Without Numba this module still packs (pure NumPy) and `kernels()` refuses.
"""

from contextlib import contextmanager
from functools import cache

import numpy as np

from minigpt.kernels import AVAILABLE, tiles

CHUNK = 32  # the most inputs a 4-bit chunk sums in 16-bit integers (module docstring)
TINY = np.float32(np.finfo(np.float32).tiny)  # the least activation scale: never zero
FP16_ONE = np.float16(1.0).view(np.uint16)  # the bits of a padding channel's 4-bit scale


@cache  # called for every 4-bit product of a decode step
def chunk(G: int) -> int:
    """Inputs a 4-bit chunk sums in 16-bit integers for groups of G (even): the largest even
    divisor of G up to CHUNK, so that a chunk never straddles two groups' scales."""
    return max(c for c in range(2, min(G, CHUNK) + 1, 2) if G % c == 0)


def padded(M: int) -> int:
    """M rounded up to a whole number of tiles (of tiles.WIDTH channels)."""
    return -(-M // tiles.WIDTH) * tiles.WIDTH


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
    W, M_pad = tiles.WIDTH, padded(M)
    s = _pad(np.asarray(scale, np.float32).reshape(1, M), M_pad, 1.0)
    return _tiles(_pad(q, M_pad), W), s.reshape(M_pad // W, W).copy()


def pack_int4(q, scale):
    """q (K, M) int8 in [-7, 7], scale (K / G, M) (values fp16 holds) -> tiles (T, K / 2, W)
    uint8 (two weights a byte, biased by 8), scales (T, K / G, W) uint16: their fp16 bits."""
    M = q.shape[1]
    W, M_pad = tiles.WIDTH, padded(M)
    b = _pad((q.astype(np.int16) + 8).astype(np.uint8), M_pad, 8)  # padding decodes to 0
    nibbles = (b[0::2] | (b[1::2] << 4)).astype(np.uint8)  # (K / 2, M_pad)
    s = _pad(np.asarray(scale, np.float16).view(np.uint16), M_pad, FP16_ONE)
    return _tiles(nibbles, W), _tiles(s, W)


def pack_16(bits):
    """bits (K, M) uint16 (fp16 or bf16 patterns) -> tiles (T, K, W) uint16."""
    M = bits.shape[1]
    return _tiles(_pad(bits, padded(M)), tiles.WIDTH)


def unpack(tiles, M):
    """Tiles (T, R, W) -> (R, M): the inverse of _tiles and _pad (for the NumPy twins)."""
    T, R, W = tiles.shape
    return tiles.transpose(1, 0, 2).reshape(R, T * W)[:, :M]


def kernels() -> dict:
    """{bits: kernel} (kernels/tiles.py's), compiled (or loaded from Numba's cache) on first call;
    needs Numba."""
    if not AVAILABLE:
        raise RuntimeError("the packed-weight kernels need Numba")
    return tiles.kernels()


_NO_BIAS = np.empty(0, np.float32)


def product(x, bits: int, data, scale, bf16: bool, M: int, bias=None):
    """x (N, K) float32 @ the packed weight (+ bias (M,) float32, added by the kernel) -> (N, M)
    float32, by the Numba kernel for `bits`."""
    if bits == 4 and scale.dtype != np.uint16:  # Numba would compile it, and read garbage
        raise TypeError(f"4-bit scales are fp16 bits (uint16, pack_int4), not {scale.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bias = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    out = np.empty((x.shape[0], M), np.float32)
    k = kernels()[bits]
    if bits == 16:
        on_threads(k, x, data, bf16, bias, out)
    elif bits == 8:
        on_threads(k, x, data, scale, bias, out)
    else:
        on_threads(k, x, data, scale, chunk(x.shape[1] // scale.shape[1]), bias, out)
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


def product_threads() -> int:
    """The thread count on_threads runs kernels on (every core, or what `threads` set)."""
    return _THREADS


def own_threads() -> int:
    """The calling thread's own Numba thread count (what kernels called directly run on)."""
    return _thread_count_calls()[0]()


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
