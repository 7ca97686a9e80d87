"""Products of a few float32 rows and a float32 weight laid out in column tiles: a decode step's
products, where BLAS is slow.

For x (N, K) @ w (K, M) with N from 2 to a few dozen, OpenBLAS copies (packs) the whole weight
into its own layout on every call, as for any matrix product; a decode step's weights come from
memory once a step, so the copy costs as much again as the product's own reading: GPT-2 124M's
products at 8 rows ran at 17-18 GB/s of weight on our 2-core machine, a third of the memory's
bandwidth (docs/benchmarks.md). Its matrix-vector product (one row) does not copy, but reads a
row-major weight more slowly than this kernel reads its tiles (a GPT-2 step's products 14.4
against 8.6 ms). Here the weight is laid out once, when a model is prepared for decoding
(nn/tiled.py), the way the product reads it:

- Tiles of WIDTH = 32 output channels, each stored whole, row k after row k - 1:
  (M // 32, K, 32), so a tile streams from memory front to back. The M % 32 channels left over
  stay as they are, (K, M % 32), and a plain loop does them: nothing is padded, so a product
  reads exactly the weight's K M floats and does 2 N K M FLOPs, what the meter's record of
  np.matmul says.
- One thread takes one tile at a time. For up to 8 rows at once it keeps the rows x 32 sums in
  registers (two 16-float vectors a row: 16 registers for 8 rows) for the whole pass over k, and
  each step of k loads the tile's row once and multiplies it into every row's sums: a fused
  multiply-add per row and vector, against OpenBLAS's copy and its store of every partial sum.
  In the first-level cache that is 290 GFLOP/s for 8 rows on our two cores, where NumPy's
  product of the same shapes runs at 77.

The register block is written in LLVM's own terms (an llvmlite intrinsic: a loop whose 2 R
vector sums are carried in registers), since Numba's compiler vectorizes only innermost loops,
and an innermost loop over the tile's channels reloads and stores every sum at every k. Each sum
runs over k in order, one fused multiply-add a step (one rounding where x * w + s has two), so a
result is the same on any number of threads; it differs from BLAS's (whose order is its own) in
the last bits. np.matmul is the reference: tests/test_tiled.py compares them.
"""

import numpy as np

from minigpt.kernels import AVAILABLE

WIDTH = 32  # output channels a tile: two 16-float vectors
# rows a decode step's product takes this kernel for (nn/tiled.py): up to 32; from 64 OpenBLAS's
# copy pays for itself. GPT-2 124M's decode steps on our 2-core machine, against OpenBLAS: 1.66x
# at 1 row (its matrix-vector product streams the weight more slowly), 3.0x at 2, 1.5-1.7x at 8,
# 1.5x at 32, 0.8x at 64 (docs/benchmarks.md)
ROWS = range(1, 33)
VECTOR = 16  # floats a vector register holds (AVX-512; LLVM splits it where vectors are narrower)


def pack(w):
    """w (K, M) float32 (any strides) -> tiles (M // WIDTH, K, WIDTH) and the rest (K, M % WIDTH),
    both contiguous float32."""
    K, M = w.shape
    T = M // WIDTH
    tiles = np.ascontiguousarray(np.asarray(w[:, :T * WIDTH], np.float32).reshape(K, T, WIDTH).transpose(1, 0, 2))
    return tiles, np.ascontiguousarray(w[:, T * WIDTH:], dtype=np.float32)


def _build():
    """The Numba kernel, compiled on first use and cached on disk."""
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    def register_block(R: int):
        """block(x, n0, tile, out, c0): out[n0 + r, c0:c0 + WIDTH] = x[n0 + r] @ tile for r < R,
        x (N, K), tile (K, WIDTH), out (N, M) C-contiguous float32; the sums in registers."""

        @intrinsic
        def block(typingctx, x, n0, tile, out, c0):
            def codegen(context, builder, signature, args):
                i64, i32 = ir.IntType(64), ir.IntType(32)
                vec = ir.VectorType(ir.FloatType(), VECTOR)
                xa, ta, oa = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3))
                n0v, c0v = (builder.sext(args[i], i64) if args[i].type.width < 64 else args[i] for i in (1, 4))
                K = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
                M = cgutils.unpack_tuple(builder, oa.shape, 2)[1]
                fma = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{VECTOR}f32")
                rows = [builder.add(n0v, ir.Constant(i64, r)) for r in range(R)]
                x_rows = [builder.gep(xa.data, [builder.mul(n, K)]) for n in rows]
                entry = builder.block
                loop = builder.append_basic_block("tile.k")
                done = builder.append_basic_block("tile.done")
                builder.branch(loop)
                builder.position_at_end(loop)
                k = builder.phi(i64)
                k.add_incoming(ir.Constant(i64, 0), entry)
                sums = [builder.phi(vec) for _ in range(R * 2)]
                for s in sums:
                    s.add_incoming(ir.Constant(vec, [0.0] * VECTOR), entry)
                w_row = builder.gep(ta.data, [builder.mul(k, ir.Constant(i64, WIDTH))])
                w = [builder.load(builder.bitcast(builder.gep(w_row, [ir.Constant(i64, VECTOR * h)]),
                                                  vec.as_pointer()), align=4) for h in range(2)]
                new = []
                for r in range(R):
                    xk = builder.load(builder.gep(x_rows[r], [k]))
                    xv = builder.insert_element(ir.Constant(vec, ir.Undefined), xk, ir.Constant(i32, 0))
                    xv = builder.shuffle_vector(xv, ir.Constant(vec, ir.Undefined),
                                                ir.Constant(ir.VectorType(i32, VECTOR), [0] * VECTOR))
                    new += [builder.call(fma, [xv, w[h], sums[2 * r + h]]) for h in range(2)]
                k_next = builder.add(k, ir.Constant(i64, 1))
                for s, v in zip(sums, new):
                    s.add_incoming(v, builder.block)
                k.add_incoming(k_next, builder.block)
                builder.cbranch(builder.icmp_signed("<", k_next, K), loop, done)
                builder.position_at_end(done)
                for r in range(R):
                    o_row = builder.gep(oa.data, [builder.add(builder.mul(rows[r], M), c0v)])
                    for h in range(2):
                        builder.store(new[2 * r + h], builder.bitcast(
                            builder.gep(o_row, [ir.Constant(i64, VECTOR * h)]), vec.as_pointer()), align=4)
                return context.get_dummy_value()

            return types.void(x, n0, tile, out, c0), codegen

        return block

    block8, block4, block2, block1 = (register_block(R) for R in (8, 4, 2, 1))

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def product(x, tiles, rest, out):
        N, K = x.shape
        T = tiles.shape[0]
        r = rest.shape[1]
        for t in prange(T + min(r, 1)):  # the rest, if any, as one more
            if t < T:  # a tile: rows in register blocks of 8, then 4, 2, 1
                tile = tiles[t]
                n = 0
                while n + 8 <= N:
                    block8(x, n, tile, out, t * WIDTH)
                    n += 8
                if n + 4 <= N:
                    block4(x, n, tile, out, t * WIDTH)
                    n += 4
                if n + 2 <= N:
                    block2(x, n, tile, out, t * WIDTH)
                    n += 2
                if n < N:
                    block1(x, n, tile, out, t * WIDTH)
            else:  # the last M % WIDTH channels, in order over k as the tiles sum
                c0 = T * WIDTH
                for n in range(N):
                    acc = np.zeros(r, np.float32)
                    for k in range(K):
                        xk = x[n, k]
                        row = rest[k]
                        for j in range(r):
                            acc[j] += xk * row[j]
                    for j in range(r):
                        out[n, c0 + j] = acc[j]

    return product


_KERNEL = None


def product(x, tiles, rest):
    """x (N, K) float32 @ the tiled weight -> (N, M) float32 (Numba needed)."""
    global _KERNEL
    if _KERNEL is None:
        if not AVAILABLE:
            raise RuntimeError("the tiled float32 kernel needs Numba")
        _KERNEL = _build()
    from minigpt.kernels import quant

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], tiles.shape[0] * WIDTH + rest.shape[1]), np.float32)
    quant.on_threads(_KERNEL, x, tiles, rest, out)
    return out
