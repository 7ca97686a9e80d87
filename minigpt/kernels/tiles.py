"""Products of a few float32 rows and a weight laid out in column tiles: a decode step's products.
The float32 weights' (nn/tiled.py), where BLAS is slow, and the packed 16-, 8- and 4-bit weights'
(kernels/quant.py: their formats and layouts).

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
  product of the same shapes runs at 77. From memory, a GPT-2 step's 49 products, against
  OpenBLAS (docs/benchmarks.md): 1 row 1.7x, 8 rows 3x, 64 rows 1.4x (433 against 311 GFLOP/s),
  512 rows 1.09x (503 against 461, this machine's float32 peak about 510).

The register block is written in LLVM's own terms (an llvmlite intrinsic: a loop whose 2 R
vector sums are carried in registers), since Numba's compiler vectorizes only innermost loops,
and an innermost loop over the tile's channels reloads and stores every sum at every k. Each sum
runs over k in order, one fused multiply-add a step (one rounding where x * w + s has two); for 1
and 2 rows the inputs are dealt round-robin to 4 / R such sums, added in order at the end (one
row's two chains of multiply-adds would each wait on the last one's latency, and a narrow weight
arrives faster than that). So a result is the same on any number of threads; it differs from
BLAS's (whose order is its own) in the last bits. np.matmul is the reference:
tests/test_tiled.py compares them. The 4-bit block (int4_block) keeps its integer chunk sums in
registers too, and its float steps are kernels/quant.py's, exactly. Where the CPU has AVX-512
VNNI and VBMI (dot_instructions(): Intel since Ice Lake, AMD since Zen 4), its dot form takes
four inputs a lane with one instruction (vpdpbusd) and gives the same bits: on our 2-core AMD
EPYC, 3072 outputs of one row 1.9x faster in the cache, a 4-bit step of 64 sequences 60 -> 36
ms (docs/benchmarks.md). LLVM's generic terms have no way to say that instruction, so it is
called by name, and a CPU without it gets the 16-bit lanes; the tests compare the two where
both run.
"""

from functools import cache

import numpy as np

from minigpt.kernels import AVAILABLE

WIDTH = 32  # output channels a tile: two 16-float vectors
VECTOR = 16  # floats a vector register holds (AVX-512; LLVM splits it where vectors are narrower)


def pack(w):
    """w (K, M) float32 (any strides) -> tiles (M // WIDTH, K, WIDTH) and the rest (K, M % WIDTH),
    both contiguous float32."""
    K, M = w.shape
    T = M // WIDTH
    tiles = np.ascontiguousarray(np.asarray(w[:, :T * WIDTH], np.float32).reshape(K, T, WIDTH).transpose(1, 0, 2))
    return tiles, np.ascontiguousarray(w[:, T * WIDTH:], dtype=np.float32)


@cache
def dot_instructions() -> bool:
    """Whether Numba compiles for a CPU with AVX-512 VNNI and VBMI (Intel since Ice Lake, AMD
    since Zen 4), whose instructions the 4-bit kernel's dot blocks use (int4_block(vnni=True)).
    Where Numba is told another CPU than this one (NUMBA_CPU_NAME), only NUMBA_CPU_FEATURES
    counts."""
    from llvmlite import binding
    from numba.core import config

    if config.CPU_FEATURES is not None:
        features = config.CPU_FEATURES
    elif config.CPU_NAME not in (None, "host"):
        return False
    else:
        features = binding.get_host_cpu_features().flatten()
    return {"+avx512bw", "+avx512vnni", "+avx512vbmi"} <= set(features.split(","))


def _build(vnni: bool):
    """The Numba kernels, compiled on first use and cached on disk: {"f32": float32 tiles (and
    the rest), 8: int8 tiles with their channels' scales, 16: fp16 or bf16 tiles, 4: nibble
    pairs with fp16 group scales}. vnni: the 4-bit kernel uses int4_block(vnni=True) where it can
    (only where dot_instructions(); otherwise LLVM cannot compile it)."""
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    from minigpt.kernels.quant import TINY

    def named(obj, name: str):
        """obj (an intrinsic or a Numba function the kernels call) under a fixed name. Numba
        pickles such an object with a random uuid1 of its own, and its disk cache finds a
        kernel by a hash of the kernel's pickled closure, which holds them: so every process
        missed the cache, compiled the 4-bit kernel again (1.7 s before its first product) and
        wrote one more file (112 of w4's here). Named, the closure pickles the same in every
        process. (Numba's own _set_uuid; where a Numba lacks it, the cache misses as before.)"""
        if hasattr(obj, "_set_uuid"):
            obj._set_uuid(f"minigpt.kernels.tiles.{'vnni' if vnni else 'lanes'}.{name}")
        return obj

    def llvm_type(t):
        """t with its text made now: llvmlite keeps an ir type's str() once asked, which would
        change how the kernels' closures pickle between a process's first call and its cache
        save (named, above)."""
        str(t)
        return t

    i64, i32 = llvm_type(ir.IntType(64)), llvm_type(ir.IntType(32))
    vec = llvm_type(ir.VectorType(ir.FloatType(), VECTOR))

    def widen(builder, kind, ptr):
        """The VECTOR weights at ptr (of the tile's element type) as float32s: exact for each."""
        if kind == "f32":
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)
        if kind == "f16":  # LLVM's half to float: one F16C conversion on x86-64
            half = ir.VectorType(ir.HalfType(), VECTOR)
            return builder.fpext(builder.load(builder.bitcast(ptr, half.as_pointer()), align=2), vec)
        if kind == "bf16":  # the top half of a float32: shift the bits up
            bits = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(16), VECTOR).as_pointer()), align=2)
            wide = builder.shl(builder.zext(bits, ir.VectorType(i32, VECTOR)), ir.Constant(ir.VectorType(i32, VECTOR), [16] * VECTOR))
            return builder.bitcast(wide, vec)
        q = builder.load(builder.bitcast(ptr, ir.VectorType(ir.IntType(8), VECTOR).as_pointer()), align=1)
        return builder.sitofp(q, vec)  # int8

    def register_block(R: int, kind: str):
        """block(x, n0, tile, out, c0, scale): out[n0 + r, c0:c0 + WIDTH] = x[n0 + r] @ tile for
        r < R (times scale[0:WIDTH], int8's channel scales, for kind "i8"; other kinds ignore it),
        x (N, K), tile (K, WIDTH), out (N, M) C-contiguous; the sums in registers."""

        @intrinsic
        def block(typingctx, x, n0, tile, out, c0, scale):
            def codegen(context, builder, signature, args):
                xa, ta, oa, sa = (context.make_array(signature.args[i])(context, builder, args[i])
                                  for i in (0, 2, 3, 5))
                n0v, c0v = (builder.sext(args[i], i64) if args[i].type.width < 64 else args[i] for i in (1, 4))
                K = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
                M = cgutils.unpack_tuple(builder, oa.shape, 2)[1]
                fma = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{VECTOR}f32")
                rows = [builder.add(n0v, ir.Constant(i64, r)) for r in range(R)]
                x_rows = [builder.gep(xa.data, [builder.mul(n, K)]) for n in rows]
                splat = ir.Constant(ir.VectorType(i32, VECTOR), [0] * VECTOR)

                def step(k, sums):  # the sums after input k: one multiply-add a row and vector
                    w_row = builder.gep(ta.data, [builder.mul(k, ir.Constant(i64, WIDTH))])
                    w = [widen(builder, kind, builder.gep(w_row, [ir.Constant(i64, VECTOR * h)])) for h in range(2)]
                    new = []
                    for r in range(R):
                        xk = builder.load(builder.gep(x_rows[r], [k]))
                        xv = builder.insert_element(ir.Constant(vec, ir.Undefined), xk, ir.Constant(i32, 0))
                        xv = builder.shuffle_vector(xv, ir.Constant(vec, ir.Undefined), splat)
                        new += [builder.call(fma, [xv, w[h], sums[2 * r + h]]) for h in range(2)]
                    return new

                # U sets of sums, set u taking the inputs k = u (mod U) of the first K - K % U,
                # set 0 the rest; added in order at the end. U * 2R chains of multiply-adds in
                # flight: one row's two would wait on each addition's latency (4 cycles), and
                # narrow weights arrive faster than that
                U = max(1, 4 // R)
                zero = ir.Constant(vec, [0.0] * VECTOR)
                entry = builder.block
                main = builder.append_basic_block("tile.k")
                tail = builder.append_basic_block("tile.tail")
                tail_step = builder.append_basic_block("tile.tail_k")
                done = builder.append_basic_block("tile.done")
                K_main = builder.sub(K, builder.srem(K, ir.Constant(i64, U)))
                builder.cbranch(builder.icmp_signed(">", K_main, ir.Constant(i64, 0)), main, tail)
                builder.position_at_end(main)
                k = builder.phi(i64)
                k.add_incoming(ir.Constant(i64, 0), entry)
                sets = [[builder.phi(vec) for _ in range(2 * R)] for _ in range(U)]
                for phis in sets:
                    for phi in phis:
                        phi.add_incoming(zero, entry)
                stepped = [step(builder.add(k, ir.Constant(i64, u)), sets[u]) for u in range(U)]
                k_next = builder.add(k, ir.Constant(i64, U))
                for phis, values in zip(sets, stepped):
                    for phi, v in zip(phis, values):
                        phi.add_incoming(v, builder.block)
                k.add_incoming(k_next, builder.block)
                main_end = builder.block
                builder.cbranch(builder.icmp_signed("<", k_next, K_main), main, tail)
                builder.position_at_end(tail)
                kt = builder.phi(i64)
                kt.add_incoming(ir.Constant(i64, 0), entry)
                kt.add_incoming(K_main, main_end)
                tail_sets = [[builder.phi(vec) for _ in range(2 * R)] for _ in range(U)]
                for u in range(U):
                    for phi, v in zip(tail_sets[u], stepped[u]):
                        phi.add_incoming(zero, entry)
                        phi.add_incoming(v, main_end)
                builder.cbranch(builder.icmp_signed("<", kt, K), tail_step, done)
                builder.position_at_end(tail_step)
                last = step(kt, tail_sets[0])
                for u in range(U):
                    for phi, v in zip(tail_sets[u], last if u == 0 else tail_sets[u]):
                        phi.add_incoming(v, tail_step)
                kt.add_incoming(builder.add(kt, ir.Constant(i64, 1)), tail_step)
                builder.branch(tail)
                builder.position_at_end(done)
                new = list(tail_sets[0])
                for u in range(1, U):
                    new = [builder.fadd(a, b) for a, b in zip(new, tail_sets[u])]
                scales = [builder.load(builder.bitcast(builder.gep(sa.data, [ir.Constant(i64, VECTOR * h)]),
                                                       vec.as_pointer()), align=4)
                          for h in range(2)] if kind == "i8" else None
                for r in range(R):
                    o_row = builder.gep(oa.data, [builder.add(builder.mul(rows[r], M), c0v)])
                    for h in range(2):
                        v = new[2 * r + h] if scales is None else builder.fmul(new[2 * r + h], scales[h])
                        builder.store(v, builder.bitcast(builder.gep(o_row, [ir.Constant(i64, VECTOR * h)]),
                                                         vec.as_pointer()), align=4)
                return context.get_dummy_value()

            return types.void(x, n0, tile, out, c0, scale), codegen

        return named(block, f"block.{R}.{kind}")

    def rows_of(kind: str):
        """all_rows(x, tile, out, c0, scale): every row of x against one tile, in register blocks
        of 8 rows, then 4, 2 and 1."""
        b8, b4, b2, b1 = (register_block(R, kind) for R in (8, 4, 2, 1))

        @njit(inline="always")
        def all_rows(x, tile, out, c0, scale):
            N = x.shape[0]
            n = 0
            while n + 8 <= N:
                b8(x, n, tile, out, c0, scale)
                n += 8
            if n + 4 <= N:
                b4(x, n, tile, out, c0, scale)
                n += 4
            if n + 2 <= N:
                b2(x, n, tile, out, c0, scale)
                n += 2
            if n < N:
                b1(x, n, tile, out, c0, scale)

        return named(all_rows, f"rows.{kind}")

    f32_rows, f16_rows, bf16_rows, i8_rows = (rows_of(kind) for kind in ("f32", "f16", "bf16", "i8"))

    short, half32 = llvm_type(ir.VectorType(ir.IntType(16), WIDTH)), llvm_type(ir.VectorType(ir.HalfType(), WIDTH))
    wide = llvm_type(ir.VectorType(ir.FloatType(), WIDTH))  # one tile's channels: two float registers

    bytes64 = llvm_type(ir.VectorType(ir.IntType(8), 2 * WIDTH))
    ints16 = llvm_type(ir.VectorType(i32, VECTOR))

    def int4_block(R: int, vnni: bool = False):
        """block(xq, bias, xs, tile, tile_scale, out, n0, c0, chunk): out[n0 + r, c0:c0 + WIDTH]
        for r < R, kernels/quant.py's 4-bit product of the rounded activations xq (N, K) int8
        (their scales xs (N, K / G), each chunk's nibble bias (N, K / chunk) int32) and one tile
        of nibble pairs (K / 2, WIDTH) uint8 with its fp16 scales (K / G, WIDTH): each row's
        chunk sums and its float32 sums (two registers) held in registers for the whole tile;
        the same integer and float steps as the loop it replaced, so the same bits.

        The chunk sums: one byte row (inputs 2i, 2i + 1 of the 32 channels) at a time into 16-bit
        lanes, one register a row, two multiplies and adds a row. vnni (AVX-512 VNNI and VBMI;
        the dot block): two byte rows at a time as 64 bytes, their nibbles split and laid by
        one byte permutation a 16 channels (vpermt2b) so that each channel's four nibbles stand
        side by side in input order, as the activations' four int8 values stand in memory; then
        one vpdpbusd a 16 channels multiplies the four pairs and adds them into a 32-bit lane
        (exact: at most 32 x 15 x 127 a chunk), where the 16-bit lanes take two multiplies and
        two adds a row for half as many weights. One row against a 768 x 3072 weight in the
        cache: 35 -> 16-19 us; eight rows 176 -> 64 us."""
        step = 2 if vnni else 1  # byte rows an iteration
        sum_types = [ints16] * 2 if vnni else [short]  # one row's chunk sums

        @intrinsic
        def block(typingctx, xq, bias, xs, tile, tile_scale, out, n0, c0, chunk):
            def codegen(context, builder, signature, args):
                xa, ba, sa, ta, ga, oa = (context.make_array(signature.args[i])(context, builder, args[i])
                                          for i in range(6))
                n0v, c0v, cv = (builder.sext(a, i64) if a.type.width < 64 else a for a in args[6:9])
                K = cgutils.unpack_tuple(builder, xa.shape, 2)[1]
                n_chunks = cgutils.unpack_tuple(builder, ba.shape, 2)[1]
                n_groups = cgutils.unpack_tuple(builder, sa.shape, 2)[1]
                M = cgutils.unpack_tuple(builder, oa.shape, 2)[1]
                G = builder.sdiv(K, n_groups)
                byte_rows = builder.sdiv(cv, ir.Constant(i64, 2))
                rows = [builder.add(n0v, ir.Constant(i64, r)) for r in range(R)]

                def splat(value, vtype):
                    v = builder.insert_element(ir.Constant(vtype, ir.Undefined), value, ir.Constant(i32, 0))
                    return builder.shuffle_vector(v, ir.Constant(vtype, ir.Undefined),
                                                  ir.Constant(ir.VectorType(i32, vtype.count), [0] * vtype.count))

                def at(array, row, col, ncols):  # &array[row, col] of a C-contiguous 2-D array
                    return builder.gep(array.data, [builder.add(builder.mul(row, ncols), col)])

                def sixteen_bit(i, sums):  # the sums after byte row i: the biased nibbles times xq
                    byte_ptr = builder.gep(ta.data, [builder.mul(i, ir.Constant(i64, WIDTH))])
                    u = builder.zext(builder.load(builder.bitcast(byte_ptr, ir.VectorType(ir.IntType(8), WIDTH).as_pointer()),
                                                  align=1), short)
                    lo = builder.and_(u, ir.Constant(short, [15] * WIDTH))
                    hi = builder.lshr(u, ir.Constant(short, [4] * WIDTH))
                    k0 = builder.mul(i, ir.Constant(i64, 2))
                    new = []
                    for r in range(R):  # nibbles in [0, 15] times xq; wraps mod 2**16
                        x0, x1 = (splat(builder.sext(builder.load(at(xa, rows[r], builder.add(k0, ir.Constant(i64, j)), K)),
                                                     ir.IntType(16)), short) for j in range(2))
                        new.append(builder.add(sums[r], builder.add(builder.mul(lo, x0), builder.mul(hi, x1))))
                    return new

                if vnni:
                    dpbusd = cgutils.get_or_insert_function(  # (its <16 x i32> form: LLVM upgrades it)
                        builder.module, ir.FunctionType(ints16, [ints16] * 3), "llvm.x86.avx512.vpdpbusd.512")
                    # channel c's four nibbles: row i's low and high, row i + 1's low and high (of
                    # the shuffle's two operands lo and hi, 64 bytes each; row i + 1 from byte 32)
                    quads = [ir.Constant(ir.VectorType(i32, 2 * WIDTH),
                                         [j for c in range(h * VECTOR, (h + 1) * VECTOR)
                                          for j in (c, 2 * WIDTH + c, WIDTH + c, 3 * WIDTH + c)])
                             for h in range(2)]

                def four_at_a_time(i, sums):  # the sums after byte rows i and i + 1
                    byte_ptr = builder.gep(ta.data, [builder.mul(i, ir.Constant(i64, WIDTH))])
                    u = builder.load(builder.bitcast(byte_ptr, bytes64.as_pointer()), align=1)
                    lo = builder.and_(u, ir.Constant(bytes64, [15] * 2 * WIDTH))
                    hi = builder.lshr(u, ir.Constant(bytes64, [4] * 2 * WIDTH))
                    w = [builder.bitcast(builder.shuffle_vector(lo, hi, m), ints16) for m in quads]
                    k0 = builder.mul(i, ir.Constant(i64, 2))
                    new = []
                    for r in range(R):  # xq[k0:k0 + 4] as one 32-bit lane, in every lane
                        x4 = builder.load(builder.bitcast(at(xa, rows[r], k0, K), i32.as_pointer()), align=1)
                        new += [builder.call(dpbusd, [sums[2 * r + h], w[h], splat(x4, ints16)]) for h in range(2)]
                    return new

                entry = builder.block
                chunk_loop = builder.append_basic_block("int4.chunk")
                row_loop = builder.append_basic_block("int4.row")
                chunk_end = builder.append_basic_block("int4.chunk_end")
                done = builder.append_basic_block("int4.done")
                builder.branch(chunk_loop)
                builder.position_at_end(chunk_loop)
                ci = builder.phi(i64)
                ci.add_incoming(ir.Constant(i64, 0), entry)
                accs = [builder.phi(wide) for _ in range(R)]
                for a in accs:
                    a.add_incoming(ir.Constant(wide, [0.0] * WIDTH), entry)
                i0 = builder.mul(ci, byte_rows)
                builder.branch(row_loop)
                builder.position_at_end(row_loop)
                i = builder.phi(i64)
                i.add_incoming(i0, chunk_loop)
                sums = [builder.phi(t) for _ in range(R) for t in sum_types]
                for s in sums:
                    s.add_incoming(ir.Constant(s.type, [0] * s.type.count), chunk_loop)
                new_sums = (four_at_a_time if vnni else sixteen_bit)(i, sums)
                i_next = builder.add(i, ir.Constant(i64, step))
                for s, v in zip(sums, new_sums):
                    s.add_incoming(v, row_loop)
                i.add_incoming(i_next, row_loop)
                builder.cbranch(builder.icmp_signed("<", i_next, builder.add(i0, byte_rows)), row_loop, chunk_end)
                builder.position_at_end(chunk_end)
                g = builder.sdiv(builder.mul(ci, cv), G)
                scale_ptr = builder.gep(ga.data, [builder.mul(g, ir.Constant(i64, WIDTH))])
                scale = builder.fpext(builder.load(builder.bitcast(scale_ptr, half32.as_pointer()), align=2), wide)
                both = ir.Constant(ir.VectorType(i32, WIDTH), list(range(WIDTH)))
                new_accs = []
                for r in range(R):  # the bias off, the exact sum back, into float32
                    b = builder.load(at(ba, rows[r], ci, n_chunks))
                    if vnni:  # the row's two registers of 16 channels as one of 32
                        total = builder.shuffle_vector(new_sums[2 * r], new_sums[2 * r + 1], both)
                    else:
                        total, b = new_sums[r], builder.trunc(b, ir.IntType(16))
                    exact = builder.sub(total, splat(b, total.type))
                    sx = builder.load(at(sa, rows[r], g, n_groups))
                    step_ = builder.fmul(builder.sitofp(exact, wide), builder.fmul(scale, splat(sx, wide)))
                    new_accs.append(builder.fadd(accs[r], step_))
                ci_next = builder.add(ci, ir.Constant(i64, 1))
                for a, v in zip(accs, new_accs):
                    a.add_incoming(v, chunk_end)
                ci.add_incoming(ci_next, chunk_end)
                builder.cbranch(builder.icmp_signed("<", ci_next, n_chunks), chunk_loop, done)
                builder.position_at_end(done)
                for r in range(R):
                    builder.store(new_accs[r], builder.bitcast(at(oa, rows[r], c0v, M), wide.as_pointer()), align=4)
                return context.get_dummy_value()

            return types.void(xq, bias, xs, tile, tile_scale, out, n0, c0, chunk), codegen

        return named(block, f"int4.{R}.{vnni}")

    def int4_rows(vnni: bool):
        """all_rows(xq, bias, xs, tile, tile_scale, out, c0, chunk): every row against one tile,
        in register blocks of 4 rows, then 2 and 1."""
        b4, b2, b1 = (int4_block(R, vnni) for R in (4, 2, 1))

        @njit(inline="always")
        def all_rows(xq, bias, xs, tile, tile_scale, out, c0, chunk):
            N = xq.shape[0]
            n = 0
            while n + 4 <= N:
                b4(xq, bias, xs, tile, tile_scale, out, n, c0, chunk)
                n += 4
            if n + 2 <= N:
                b2(xq, bias, xs, tile, tile_scale, out, n, c0, chunk)
                n += 2
            if n < N:
                b1(xq, bias, xs, tile, tile_scale, out, n, c0, chunk)

        return named(all_rows, f"int4_rows.{vnni}")

    sixteen_bit_rows = int4_rows(False)
    # the dot blocks only where the CPU has their instructions (w4 calls them only where vnni)
    dot_rows = int4_rows(True) if vnni else sixteen_bit_rows

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def product(x, tiles, rest, out):
        N, K = x.shape
        T = tiles.shape[0]
        r = rest.shape[1]
        none = np.empty(0, np.float32)
        for t in prange(T + min(r, 1)):  # the rest, if any, as one more
            if t < T:
                f32_rows(x, tiles[t], out, t * WIDTH, none)
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

    # The packed weights' tiles (kernels/quant.py) are padded to whole tiles: a tile whose
    # channels run past M sums into a scratch block, and its real channels are copied out. A
    # layer's bias (M floats; none: an empty array) is added to the tile's outputs as they stand
    # in the first-level cache, rounded once as a separate float32 add rounds it.

    @njit(inline="always")
    def add_bias(out, c0, bias):
        if bias.shape[0] > 0:
            for n in range(out.shape[0]):
                for j in range(c0, min(c0 + WIDTH, out.shape[1])):
                    out[n, j] += bias[j]

    named(add_bias, "add_bias")

    @njit(parallel=True, cache=True)
    def w8(x, q, scale, bias, out):
        N = x.shape[0]
        M = out.shape[1]
        for t in prange(q.shape[0]):
            c0 = t * WIDTH
            if c0 + WIDTH <= M:
                i8_rows(x, q[t], out, c0, scale[t])
            else:
                part = np.empty((N, WIDTH), np.float32)
                i8_rows(x, q[t], part, 0, scale[t])
                for n in range(N):
                    for j in range(M - c0):
                        out[n, c0 + j] = part[n, j]
            add_bias(out, c0, bias)

    @njit(parallel=True, cache=True)
    def w16(x, q, bf16, bias, out):
        N = x.shape[0]
        M = out.shape[1]
        none = np.empty(0, np.float32)
        for t in prange(q.shape[0]):
            c0 = t * WIDTH
            whole = c0 + WIDTH <= M
            part = out if whole else np.empty((N, WIDTH), np.float32)
            at = c0 if whole else 0
            if bf16:
                bf16_rows(x, q[t], part, at, none)
            else:
                f16_rows(x, q[t], part, at, none)
            if not whole:
                for n in range(N):
                    for j in range(M - c0):
                        out[n, c0 + j] = part[n, j]
            add_bias(out, c0, bias)

    @njit(inline="always")
    def round_group(x, n, g, G, xq, xs):
        """Row n's group g of G inputs rounded to int8 values (xq) and their scale (xs). On
        slices indexed from 0 the division vectorises: 3072 inputs in 0.9 us, where indexing
        the rows from g * G took 2.9 (and a constant G of 32, fully unrolled, 2.7)."""
        row, qrow = x[n, g * G:(g + 1) * G], xq[n, g * G:(g + 1) * G]
        m = np.float32(0.0)
        for k in range(G):
            m = max(m, abs(row[k]))
        s = max(m / np.float32(127.0), TINY) if m > 0 else np.float32(1.0)
        xs[n, g] = s
        for k in range(G):
            qrow[k] = np.int8(np.rint(row[k] / s))

    named(round_group, "round_group")

    @njit(parallel=True, cache=True)
    def w4(x, q, scale, chunk, bias, out):
        N, K = x.shape
        n_groups = scale.shape[1]
        G = K // n_groups
        M = out.shape[1]
        xq = np.empty((N, K), np.int8)  # the activations' int8 values
        xs = np.empty((N, n_groups), np.float32)  # and their scales
        for n in range(N):
            for g in range(n_groups):
                round_group(x, n, g, G, xq, xs)
        n_chunks = K // chunk
        dots = vnni and chunk % 4 == 0  # the dot blocks take four inputs at a time
        nibble_bias = np.empty((N, n_chunks), np.int32)  # 8 x each chunk's sum of xq
        for n in range(N):
            for c in range(n_chunks):
                part = xq[n, c * chunk:(c + 1) * chunk]  # a slice from 0, as round_group's
                total = 0
                for k in range(chunk):
                    total += part[k]
                nibble_bias[n, c] = 8 * total
        for t in prange(q.shape[0]):
            c0 = t * WIDTH
            whole = c0 + WIDTH <= M
            part = out if whole else np.empty((N, WIDTH), np.float32)
            at = c0 if whole else 0
            if dots:
                dot_rows(xq, nibble_bias, xs, q[t], scale[t], part, at, chunk)
            else:
                sixteen_bit_rows(xq, nibble_bias, xs, q[t], scale[t], part, at, chunk)
            if not whole:
                for n in range(N):
                    for j in range(M - c0):
                        out[n, c0 + j] = part[n, j]
            add_bias(out, c0, bias)

    return {"f32": product, 8: w8, 16: w16, 4: w4}


_KERNELS: dict = {}


def kernels(vnni: bool | None = None) -> dict:
    """_build's kernels, compiled (or loaded from Numba's cache) on first call; needs Numba.
    vnni: whether the 4-bit kernel uses the VNNI block (default: where this CPU has it; the
    tests take both)."""
    if not AVAILABLE:
        raise RuntimeError("the tiled kernels need Numba")
    if vnni is None:
        vnni = dot_instructions()
    elif vnni and not dot_instructions():
        raise RuntimeError("the 4-bit VNNI block needs AVX-512 VNNI and VBMI, which Numba's target CPU lacks")
    if vnni not in _KERNELS:
        _KERNELS[vnni] = _build(vnni)
    return _KERNELS[vnni]


def product(x, tiles, rest):
    """x (N, K) float32 @ the tiled weight -> (N, M) float32 (Numba needed)."""
    from minigpt.kernels import quant

    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty((x.shape[0], tiles.shape[0] * WIDTH + rest.shape[1]), np.float32)
    quant.on_threads(kernels()["f32"], x, tiles, rest, out)
    return out
