"""Where a packed-weight decode step's time goes: each kernel against the read bandwidth, and the
step with and without the meter against its products alone.

    python bench/packed_decode.py [RUN] [--bits 16,8,4] [--batch 1,8] [--rounds 4] [--steps 24]
                                  [--threads N] [--format json]

Products: every weight shape of a GPT-2 124M step (c_attn 768x2304, attn c_proj 768x768, c_fc
768x3072, mlp c_proj 3072x768, the LM head 768x50257), random weights packed at each width, timed
through minigpt.kernels.quant.product (the kernel and its call, nothing else). A row gives one
call's best time, the GB/s of packed weight it streams (the bytes the meter counts for it) and that
as a fraction of the read bandwidth; the "step" row weights each shape by the calls a step makes
(12 blocks, one head). The small matrices fit in the last-level cache when one is called again and
again, so their rows can pass the memory's read bandwidth; the head (19 to 77 MB) cannot. Where
the CPU has AVX-512 VNNI (the 4-bit kernel then multiplies four inputs a lane: kernels/tiles.py),
rows "4 lanes" time the same 4-bit products on the 16-bit lanes other CPUs run.

Steps (with RUN, e.g. `minigpt init configs/gpt2-124m.toml out/gpt2-124m`): GPT.decode_step on
RUN at float32 and at each width, each model prepared as generation prepares it (GPT.prepare_decode:
float32 weights in the tiled kernel's layout, nn/tiled.py), for each batch: the step's best time with the meter on and off,
its packed (or float32 tiled) products alone (the same calls, no model around them), the rest (the step without the
meter less its products: Python, attention, layer norms, GELU, dispatch), tokens/s, and the
fraction of the read ceiling (batch x read bandwidth / the meter's bytes per step).

Everything runs interleaved in one process, round by round (A B A B ...), best of --rounds, so that
a slow moment of a shared machine hits every variant alike. The read bandwidth is
minigpt.kernels.stream.read over 256 MiB on 1 and on --threads threads, best of 5; the higher is
the ceiling. --threads sets the products' threads (default: all Numba has).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from minigpt import kernels  # (sets the OpenMP wait policy before Numba loads)
from minigpt.counting.meter import METER
from minigpt.kernels import quant as kq
from minigpt.kernels import stream, tiles
from minigpt.nn import lowbit
from minigpt.units import rows_text

SHAPES = (("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("c_fc", 768, 3072),
          ("mlp.c_proj", 3072, 768), ("lm_head", 768, 50257))
CALLS = {"lm_head": 1}  # calls a step makes of each shape; the rest: one a block
N_LAYER = 12


def read_bandwidth(threads: int) -> float:
    """Best bytes/s of stream.read over 256 MiB on 1 and on `threads` threads."""
    a = np.ones(32 << 20)
    best = {}
    for n in sorted({1, threads}):
        stream.read(a, n)
        for _ in range(5):
            t0 = time.perf_counter()
            stream.read(a, n)
            best[n] = min(best.get(n, float("inf")), time.perf_counter() - t0)
    return max(a.nbytes / s for s in best.values())


LANES = "4 lanes"  # the 4-bit kernel on its 16-bit lanes, where it would take the VNNI blocks


def lanes_product(x, w):
    """x @ the 4-bit weight w on the 16-bit lanes (kernels/tiles.py's int4_block without dot), as
    kq.product runs the default kernel: for comparison on a CPU with AVX-512 VNNI."""
    out = np.empty((x.shape[0], w.M), np.float32)
    kq.on_threads(tiles.kernels(vnni=False)[4], x, w.data, w.tile_scale,
                  kq.chunk(x.shape[1] // w.tile_scale.shape[1]), np.empty(0, np.float32), out)
    return out


def products(bits_list, batches, rounds) -> list:
    rng = np.random.default_rng(0)
    ws = {(b, K, M): lowbit.quantize(rng.standard_normal((K, M), dtype=np.float32) * 0.02, b)
          for b in bits_list for _, K, M in SHAPES}
    xs = {(N, K): rng.standard_normal((N, K), dtype=np.float32) for N in batches for _, K, _ in SHAPES}
    run = {(b, K, M): (lambda x, w=w, b=b, M=M: kq.product(x, b, w.data, w.tile_scale, w.bf16, M))
           for (b, K, M), w in ws.items()}
    if 4 in bits_list and tiles.dot_instructions():  # the default takes the VNNI blocks: both
        run |= {(LANES, K, M): (lambda x, w=ws[4, K, M]: lanes_product(x, w)) for _, K, M in SHAPES}
        ws |= {(LANES, K, M): ws[4, K, M] for _, K, M in SHAPES}
        bits_list = [*bits_list, LANES]
    best = {}
    for _ in range(rounds):
        for (b, K, M), product in run.items():
            for N in batches:
                x = xs[N, K]
                reps = 3 if M > 10000 else 30
                product(x)
                t0 = time.perf_counter()
                for _ in range(reps):
                    product(x)
                s = (time.perf_counter() - t0) / reps
                best[b, N, K, M] = min(best.get((b, N, K, M), float("inf")), s)
    rows = []
    for b in bits_list:
        for N in batches:
            step_s = step_bytes = 0
            for name, K, M in SHAPES:
                s, nbytes = best[b, N, K, M], ws[b, K, M].nbytes
                calls = CALLS.get(name, N_LAYER)
                step_s += calls * s
                step_bytes += calls * nbytes
                rows.append({"bits": b, "batch": N, "shape": f"{name} {K}x{M}", "seconds": s,
                             "bytes": nbytes})
            rows.append({"bits": b, "batch": N, "shape": "step (all products)", "seconds": step_s,
                         "bytes": step_bytes})
    return rows


def steps(run, bits_list, batches, rounds, n_steps) -> list:
    import minigpt
    from minigpt.nn.model import KVCache

    models = {}
    for b in (32, *bits_list):
        m = minigpt.load(run)
        if b != 32:
            m.quantize(bits=b, group_size=32, storage16="fp16", kv_int8=False)
        m.gpt.prepare_decode()  # float32: the tiled weights (nn/tiled.py), as generate and serve run
        models[b] = m.gpt

    def decode(gpt, B, meter):
        caches = [KVCache(gpt.cfg, 1, gpt.params.data.dtype) for _ in range(B)]
        tokens = np.arange(B)
        gpt.decode_step(tokens, caches)
        METER.reset()
        outer, METER.enabled = METER.enabled, meter
        try:
            t0 = time.perf_counter()
            for _ in range(n_steps):
                gpt.decode_step(tokens, caches)
            s = (time.perf_counter() - t0) / n_steps
        finally:
            METER.enabled = outer
        moved = sum(r.bytes_read + r.bytes_written for r in METER.records.values()) / n_steps
        return s, moved

    def products_alone(gpt, B):
        if gpt.quant is None:  # float32: the tiled weights' products
            ws = [w for block in gpt._tiled for w in block.values()] + [gpt._head]
            xs = {w.shape[0]: np.ones((B, w.shape[0]), np.float32) for w in ws}
            t0 = time.perf_counter()
            for w in ws:
                tiles.product(xs[w.shape[0]], w.tiles, w.rest)
            return time.perf_counter() - t0
        ws = list(gpt.quant.weights.values())
        xs = {w.K: np.ones((B, w.K), np.float32) for w in ws}
        t0 = time.perf_counter()
        for w in ws:
            kq.product(xs[w.K], w.bits, w.data, w.tile_scale, w.bf16, w.M)
        return time.perf_counter() - t0

    best, moved = {}, {}
    for _ in range(rounds):
        for b, gpt in models.items():
            for B in batches:
                for meter in (True, False):
                    s, nbytes = decode(gpt, B, meter)
                    best[b, B, meter] = min(best.get((b, B, meter), float("inf")), s)
                    if meter:
                        moved[b, B] = nbytes
                if b != 32 or gpt._tiled is not None:
                    best[b, B, "p"] = min(best.get((b, B, "p"), float("inf")), products_alone(gpt, B))
    return [{"bits": b, "batch": B, "step_s_meter": best[b, B, True], "step_s": best[b, B, False],
             "products_s": best.get((b, B, "p")), "bytes_per_step": moved[b, B]}
            for b in models for B in batches]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="a run folder: also time its decode steps")
    ap.add_argument("--bits", default="16,8,4")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    try:
        bits_list = [int(b) for b in args.bits.split(",")]
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        ap.error("--bits and --batch take comma-separated integers")
    if any(b not in lowbit.BITS for b in bits_list) or min(batches) < 1 or args.rounds < 1 or args.steps < 1:
        ap.error("--bits from 16,8,4; --batch, --rounds and --steps >= 1")
    if not kernels.AVAILABLE:
        ap.error("the packed-weight kernels need Numba")
    import numba
    # the packed and tiled products' thread count (kq.threads), not this thread's Numba count,
    # which minigpt's fused training kernels set to one on import
    threads = max(1, min(args.threads or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS))
    kernels.use("numba")
    with kq.threads(threads):
        bw = read_bandwidth(threads)
        prod = products(bits_list, batches, args.rounds)
        step_rows = steps(args.run, bits_list, batches, args.rounds, args.steps) if args.run else []
    for r in prod:
        r["gb_per_s"] = r["bytes"] / r["seconds"] / 1e9
        r["fraction_of_read"] = r["bytes"] / r["seconds"] / bw
    fp32 = {r["batch"]: r["step_s"] for r in step_rows if r["bits"] == 32}
    for r in step_rows:
        r["tokens_per_s"] = r["batch"] / r["step_s"]
        r["tokens_per_s_meter"] = r["batch"] / r["step_s_meter"]
        r["fraction_of_read_ceiling"] = r["bytes_per_step"] / bw / r["step_s"]
        r["speedup_vs_fp32"] = fp32[r["batch"]] / r["step_s"]
        r["rest_s"] = None if r["products_s"] is None else r["step_s"] - r["products_s"]
    info = {"read_bandwidth": bw, "numba_threads": threads, "threading_layer": numba.threading_layer(),
            "products": prod, "steps": step_rows}
    if args.format == "json":
        print(json.dumps(info, indent=1))
        return 0
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (stream.read, 256 MiB, best of 1 and {threads} threads); "
          f"Numba threads {threads}, layer {info['threading_layer']}")
    print()
    print("\n".join(rows_text(("bits", "batch", "product", "us", "GB/s", "of read"), [
        (str(r["bits"]), str(r["batch"]), r["shape"], f"{r['seconds'] * 1e6:.1f}", f"{r['gb_per_s']:.1f}",
         f"{r['fraction_of_read']:.0%}") for r in prod])))
    if step_rows:
        ms = lambda s: "-" if s is None else f"{s * 1e3:.2f}"
        print()
        print("\n".join(rows_text(
            ("bits", "batch", "step ms", "no meter", "products", "rest", "tokens/s", "x fp32",
             "MB/step", "of read ceiling"),
            [(str(r["bits"]), str(r["batch"]), ms(r["step_s_meter"]), ms(r["step_s"]), ms(r["products_s"]),
              ms(r["rest_s"]), f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_fp32']:.2f}",
              f"{r['bytes_per_step'] / 1e6:.0f}", f"{r['fraction_of_read_ceiling']:.0%}") for r in step_rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
