"""Batch-1 KV-cached decode against the memory-bandwidth ceiling, and prefill against the compute
ceiling, on a run folder (e.g. `minigpt init configs/gpt2-124m.toml out/gpt2-124m`).

    python bench/decode.py RUN [--tokens N] [--prompt P] [--repeats R] [--int8 MODE] [--format json]

Generating one token at batch 1 reads every weight once and does two FLOPs per weight: far too
little arithmetic to keep the cores busy, so its speed is bounded by memory bandwidth. The ceiling
is bandwidth / bytes moved per token, where:
- bytes per token is the meter's count (bytes read + bytes written by every op of the decode
  steps, divided by the steps: the weights, the KV cache, the activations);
- bandwidth is the STREAM figure that fits the decode step's read/write mix
  (minigpt.hardware.roofline.memory_ceiling on the meter's bytes read and bytes written: nearly
  all reads, so the read bandwidth), the better of 1 thread and all cores; every STREAM figure
  (minigpt.hardware.bandwidth: 256 MiB arrays, best of 5) is taken in this process right before
  the decode and again right after, so the ceiling is measured under the same load as the decode
  (other processes on a shared machine slow both); the ceiling uses the mean of the two, and both
  are printed, with the fraction of the copy bandwidth for comparison.
Timings are the best of --repeats runs (default 3; each run prefills the prompt into a fresh
cache and decodes --tokens tokens), the same statistic as the bandwidth's best of 5: on a shared
machine a run can lose a step or two to another process (a 20 ms stall is 3% of a 64-token run),
and the ceiling is what the memory does undisturbed. Every run's figure is printed and kept in the
JSON (`decode_runs_tokens_per_s`).
Each --blas-threads count (default 1 and 2) gets its own bandwidth, prefill, decode and peak
measurements; the headline is the count that decoded fastest, and both are printed. Under load
from other processes, one thread often wins by far (minigpt/hardware/blas.py says why).
Prefill (the prompt in one forward) is compared with the compute ceiling: calibrate's float32
matmul FLOP/s over the meter's FLOPs per prompt token, also measured in this process.

predicted_tokens_per_s (and predicted_prefill_tokens_per_s): what the time model forecasts for
the same prompt and tokens (minigpt.energy.forecast.generation; `minigpt costs --predict`).

--int8 MODE quantizes on load. NumPy has no int8 matrix kernel: w8a32 widens each int8 weight
matrix to float32 inside every product (reading 1 byte, writing 4 and reading 4 again per weight),
w8a8 runs its integer products on the float64 BLAS. The table then says what a kernel that reads
the int8 weights directly would move (the meter's bytes) and its ceiling, beside what the widening
moves here, and where the decode step's time went (the meter's seconds by op kind).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import minigpt
from minigpt.counting.meter import METER, matmul
from minigpt.hardware import bandwidth, blas, calibrate, roofline
from minigpt.nn import quant
from minigpt.nn.model import KVCache


def decode_run(gpt, prompt: np.ndarray, tokens: int, kv_int8: bool):
    """Prefill prompt, then `tokens` greedy decode steps; (prefill seconds, decode seconds)."""
    kv = KVCache(gpt.cfg, 1, gpt.params.data.dtype, int8=kv_int8)
    t0 = time.perf_counter()
    with METER.in_phase("prefill"):
        logits = gpt.logits(prompt[None, :], kv, last_only=True)
    t1 = time.perf_counter()
    token = np.empty((1, 1), dtype=np.int64)
    with METER.in_phase("decode"):
        for _ in range(tokens):
            token[0, 0] = int(np.argmax(logits[0, -1]))
            logits = gpt.logits(token, kv)
    return t1 - t0, time.perf_counter() - t1


def best_run(gpt, prompt: np.ndarray, tokens: int, kv_int8: bool, repeats: int):
    """decode_run `repeats` times; (fastest prefill seconds, fastest decode seconds, the meter's
    records of the fastest decode's run, every run's decode seconds). The counts are the same in
    every run; only the seconds differ."""
    prefills, decodes, best_records = [], [], None
    for _ in range(repeats):
        METER.reset()
        prefill_s, decode_s = decode_run(gpt, prompt, tokens, kv_int8)
        if not decodes or decode_s < min(decodes):
            best_records = METER.records
        prefills.append(prefill_s)
        decodes.append(decode_s)
    return min(prefills), min(decodes), best_records, decodes


def phase_totals(records: dict, phase: str) -> dict:
    out = {"flops": 0, "bytes": 0, "bytes_read": 0, "bytes_written": 0, "seconds": 0.0, "by_kind": {}}
    for k, r in records.items():
        if k.phase != phase:
            continue
        out["flops"] += r.flops
        out["bytes"] += r.bytes_read + r.bytes_written
        out["bytes_read"] += r.bytes_read
        out["bytes_written"] += r.bytes_written
        out["seconds"] += r.seconds
        key = f"{k.kind}/{k.dtype}" if k.kind == "matmul" else k.kind
        out["by_kind"][key] = out["by_kind"].get(key, 0.0) + r.seconds
    return out


def widened_bytes(gpt) -> int:
    """Bytes a w8a32 decode step moves here beyond the meter's count: each int8 weight matrix is
    widened to a float32 copy (4 bytes written) that the product then reads (4 bytes)."""
    if gpt.quant is None or gpt.quant.qcfg.mode != quant.W8A32:
        return 0
    return sum(8 * q.size for q, _ in gpt.quant.tables.values())


def plain_matvec(gpt, passes: int, repeats: int = 1) -> float:
    """Mean seconds for one token's worth of plain NumPy matrix-vector products over the same
    weights (every block's four matrices, then the tied LM head), nothing else, over as many
    passes as tokens decoded (a mean, like the decode's; the best of `repeats` such means, like
    the decode's): the reference the model's decode step is compared with, in the same process
    and conditions."""
    p, C = gpt.params, gpt.cfg.n_embd
    mats = [w for name, w in p.views.items() if w.ndim == 2 and ".h." in name]
    xs = {w.shape[0]: np.ones(w.shape[0], dtype=w.dtype) for w in mats}
    wte = p["transformer.wte.weight"]
    x_head = np.ones(C, dtype=wte.dtype)
    best = float("inf")
    with METER.paused():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(passes):
                for w in mats:
                    matmul(xs[w.shape[0]], w)
                matmul(x_head, wte.T)
            best = min(best, (time.perf_counter() - t0) / passes)
    return best


def plain_matvec_two_threads(gpt, passes: int) -> float:
    """plain_matvec with the matrices dealt to 2 Python threads (each product single-threaded,
    NumPy releases the GIL inside it): whether a second core reading at the same time adds
    bandwidth. Not something the model can do (its products depend on each other); a probe of
    the machine."""
    from concurrent.futures import ThreadPoolExecutor

    p = gpt.params
    mats = [w for name, w in p.views.items() if w.ndim == 2 and ".h." in name]
    mats.append(p["transformer.wte.weight"].T)
    halves = (mats[0::2], mats[1::2])
    xs = {w.shape[0]: np.ones(w.shape[0], dtype=w.dtype) for w in mats}

    def work(ws):
        for w in ws:
            matmul(xs[w.shape[0]], w)

    with METER.paused(), blas.threads(1), ThreadPoolExecutor(2) as pool:
        list(pool.map(work, halves))
        t0 = time.perf_counter()
        for _ in range(passes):
            list(pool.map(work, halves))
        return (time.perf_counter() - t0) / passes


def int8_split(gpt, repeats: int = 3) -> dict | None:
    """For w8a32: seconds per token spent widening every int8 table to float32 (what NumPy must do
    before its float BLAS can multiply) against the float32 products of the widened tables."""
    if gpt.quant is None or gpt.quant.qcfg.mode != quant.W8A32:
        return None
    tables = [q for q, _ in gpt.quant.tables.values()]
    x = {q.shape[0]: np.ones((1, q.shape[0]), np.float32) for q in tables}
    widen = product = float("inf")
    with METER.paused():
        for _ in range(repeats):
            t0 = time.perf_counter()
            wide = [q.astype(np.float32) for q in tables]
            t1 = time.perf_counter()
            for q, w in zip(tables, wide):
                # the lm_head's table is (V, C), multiplied transposed, like the model's
                if q.shape[0] == gpt.cfg.vocab_size:
                    matmul(x[gpt.cfg.n_embd], w.T)
                else:
                    matmul(x[q.shape[0]], w)
            t2 = time.perf_counter()
            widen, product = min(widen, t1 - t0), min(product, t2 - t1)
            del wide
    return {"widen_s": widen, "float_products_s": product, "int8_bytes": sum(q.nbytes for q in tables)}


def bandwidths() -> dict:
    """Every STREAM figure ("read.all_cores" -> StreamFigure): 256 MiB arrays, best of 5."""
    return {f.key: f for f in bandwidth.measure_stream()}


def measure(args) -> dict:
    """Load once; then, for each OpenBLAS thread count asked for, bandwidth, prefill + decode,
    bandwidth again, and the compute peak. The headline is the thread count that decoded fastest."""
    model = minigpt.load(args.run)
    if args.int8:
        model.quantize(args.int8, kv_int8=args.kv_int8)
    gpt, cfg = model.gpt, model.config.model
    if args.prompt + args.tokens > cfg.block_size:
        raise SystemExit(f"--prompt {args.prompt} + --tokens {args.tokens} exceed block_size {cfg.block_size}")
    runs = []
    for n in args.blas_threads:
        with blas.threads(n) as applied:
            r = _measure(gpt, cfg, args)
        r["blas_threads"] = n if applied else blas.current()
        runs.append(r)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    best["by_blas_threads"] = [{k: r[k] for k in ("blas_threads", "tokens_per_s", "fraction_of_ceiling",
                                                  "prefill_tokens_per_s", "bandwidth",
                                                  "plain_matvec_tokens_per_s")} for r in runs]
    best["int8_split"] = int8_split(gpt)
    return best


def _measure(gpt, cfg, args) -> dict:
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=args.prompt)
    with METER.paused():
        decode_run(gpt, prompt[:8], 2, args.kv_int8)  # warm up: page faults, BLAS buffers
    before = bandwidths()
    prefill_s, decode_s, records, decode_runs = best_run(gpt, prompt, args.tokens, args.kv_int8, args.repeats)
    plain_s = plain_matvec(gpt, args.tokens, args.repeats) if gpt.quant is None else None
    plain2_s = plain_matvec_two_threads(gpt, args.tokens) if gpt.quant is None else None
    after = bandwidths()
    peak = calibrate.matmul_flops("float32", 2048, 3)
    pre, dec = phase_totals(records, "prefill"), phase_totals(records, "decode")
    means = {k: (before[k].bytes_per_s + after[k].bytes_per_s) / 2 for k in before}
    measured = bandwidth.as_profile(means, {k: f.method() for k, f in before.items()})
    ceiling_bw = roofline.memory_ceiling(measured, dec["bytes_read"], dec["bytes_written"])
    copy_bw = roofline.memory_ceiling(measured, 1, 1)  # a copy's mix, for comparison
    read_bw = roofline.memory_ceiling(measured, 1, 0)
    bandwidth_bps = ceiling_bw.value
    bytes_per_token = dec["bytes"] / args.tokens
    tokens_per_s = args.tokens / decode_s
    ceiling = bandwidth_bps / bytes_per_token
    here_bytes = bytes_per_token + widened_bytes(gpt)
    prefill_flops_per_token = pre["flops"] / args.prompt
    return {
        "run": str(args.run), "mode": args.int8 or "fp32", "kv_int8": args.kv_int8,
        "params": gpt.params.size, "prompt_tokens": args.prompt, "new_tokens": args.tokens,
        "tokens_per_s": tokens_per_s, "bytes_per_token": bytes_per_token, "repeats": args.repeats,
        "decode_runs_tokens_per_s": [args.tokens / s for s in decode_runs],
        "ceiling_tokens_per_s": ceiling, "fraction_of_ceiling": tokens_per_s / ceiling,
        "ceiling": ceiling_bw.name, "ceiling_how": ceiling_bw.how,
        "decode_bytes_read_per_token": dec["bytes_read"] / args.tokens,
        "decode_bytes_written_per_token": dec["bytes_written"] / args.tokens,
        "bandwidth": bandwidth_bps,
        "bandwidth_before": {k: f.bytes_per_s for k, f in before.items()},
        "bandwidth_after": {k: f.bytes_per_s for k, f in after.items()},
        "bandwidth_source": f"{ceiling_bw.name}: {ceiling_bw.how}; the mean of the measurements "
                            "right before and right after the decode, in this process",
        "copy_bandwidth": copy_bw.value,
        "fraction_of_copy_ceiling": tokens_per_s * bytes_per_token / copy_bw.value,
        "bytes_per_token_here": here_bytes,
        "ceiling_here_tokens_per_s": bandwidth_bps / here_bytes,
        "decode_seconds_by_kind": {k: v / args.tokens for k, v in sorted(
            dec["by_kind"].items(), key=lambda kv: -kv[1])},
        "decode_metered_fraction": dec["seconds"] / decode_s,
        "prefill_tokens_per_s": args.prompt / prefill_s,
        "prefill_flops_per_token": prefill_flops_per_token,
        "matmul_peak_flops": peak,
        "prefill_ceiling_tokens_per_s": peak / prefill_flops_per_token,
        "prefill_fraction_of_ceiling": (args.prompt / prefill_s) / (peak / prefill_flops_per_token),
        "environment": calibrate._environment(),
        "plain_matvec_tokens_per_s": 1 / plain_s if plain_s else None,
        "fraction_of_plain_matvec": tokens_per_s * plain_s if plain_s else None,
        "plain_matvec_two_threads_tokens_per_s": 1 / plain2_s if plain2_s else None,
        "read_bandwidth": read_bw.value,
        "fraction_of_read_ceiling": tokens_per_s * bytes_per_token / read_bw.value,
        **predicted_rates(gpt, args),
    }


def predicted_rates(gpt, args) -> dict:
    """The time model's decode and prefill rates for this run (minigpt.energy.forecast)."""
    from minigpt.energy import forecast
    from minigpt.train import timing_runs

    qcfg = gpt.quant.qcfg if gpt.quant is not None else None
    g = forecast.generation(gpt.cfg, timing_runs.time_model(), args.prompt, args.tokens, quant=qcfg)
    return {"predicted_tokens_per_s": g.tokens_per_s,
            "predicted_prefill_tokens_per_s": args.prompt / g.prefill_s}


def print_table(r: dict) -> None:
    gb = 1e9
    print(f"{r['run']}: {r['params']:,} parameters, {r['mode']}"
          f"{' + int8 KV cache' if r['kv_int8'] else ''}, batch 1, prompt {r['prompt_tokens']} tokens, "
          f"{r['new_tokens']} decoded ({r['environment']}; OpenBLAS threads: {r['blas_threads']})")
    for k in r["bandwidth_before"]:
        print(f"bandwidth, {k} (read + written): {r['bandwidth_before'][k] / gb:.2f} GB/s before the decode, "
              f"{r['bandwidth_after'][k] / gb:.2f} GB/s after")
    print(f"ceiling: the {r['ceiling']}, {r['bandwidth'] / gb:.2f} GB/s (the mean), the STREAM kind nearest "
          f"the decode step's mix ({r['decode_bytes_read_per_token'] / 1e6:.2f} MB read, "
          f"{r['decode_bytes_written_per_token'] / 1e6:.3f} MB written per token); {r['ceiling_how']}")
    print()
    print(f"decode    {r['tokens_per_s']:10.2f} tokens/s   {r['bytes_per_token'] / 1e6:9.2f} MB/token (meter)"
          f"   ceiling {r['ceiling_tokens_per_s']:8.2f} tokens/s   achieved {100 * r['fraction_of_ceiling']:5.1f}%")
    if r["repeats"] > 1:
        runs = ", ".join(f"{t:.2f}" for t in r["decode_runs_tokens_per_s"])
        print(f"          the best of {r['repeats']} runs ({runs} tokens/s; the mean "
              f"{100 * np.mean(r['decode_runs_tokens_per_s']) / r['ceiling_tokens_per_s']:.1f}% of the ceiling)")
    print(f"          against the copy bandwidth ({r['copy_bandwidth'] / gb:.2f} GB/s, read + write counted) "
          f"the decode would be {100 * r['fraction_of_copy_ceiling']:.1f}%: a copy is not what a decode does")
    print(f"          predicted {r['predicted_tokens_per_s']:.2f} tokens/s by the time model "
          f"({100 * (r['predicted_tokens_per_s'] / r['tokens_per_s'] - 1):+.1f}%; prefill "
          f"{r['predicted_prefill_tokens_per_s']:.1f} tokens/s predicted)")
    if r["plain_matvec_tokens_per_s"]:
        print(f"          plain NumPy matrix-vector products over the same weights, nothing else: "
              f"{r['plain_matvec_tokens_per_s']:.2f} tokens/s ({100 * r['plain_matvec_tokens_per_s'] / r['ceiling_tokens_per_s']:.1f}% "
              f"of the ceiling); the model's decode runs at {100 * r['fraction_of_plain_matvec']:.1f}% of that")
        print(f"          the same products dealt to 2 threads (a probe of the machine, not the model): "
              f"{r['plain_matvec_two_threads_tokens_per_s']:.2f} tokens/s "
              f"({100 * r['plain_matvec_two_threads_tokens_per_s'] / r['ceiling_tokens_per_s']:.1f}% of the ceiling)")
    if r["bytes_per_token_here"] != r["bytes_per_token"]:
        print(f"          the int8 widening here moves {r['bytes_per_token_here'] / 1e6:.2f} MB/token: "
              f"ceiling {r['ceiling_here_tokens_per_s']:.2f} tokens/s for that traffic; a kernel reading "
              f"int8 directly moves the meter's {r['bytes_per_token'] / 1e6:.2f} MB")
    if r["int8_split"]:
        sp = r["int8_split"]
        print(f"          what bounds w8a32 here: widening the {sp['int8_bytes'] / 1e6:.1f} MB of int8 tables to "
              f"float32 takes {1e3 * sp['widen_s']:.1f} ms a token, the float32 products of the widened "
              f"tables {1e3 * sp['float_products_s']:.1f} ms (a kernel reading int8 needs neither: "
              f"{r['bytes_per_token'] / r['bandwidth'] * 1e3:.1f} ms at the {r['ceiling']})")
    print(f"prefill   {r['prefill_tokens_per_s']:10.1f} tokens/s   {r['prefill_flops_per_token'] / 1e9:9.3f} "
          f"GFLOP/token       ceiling {r['prefill_ceiling_tokens_per_s']:8.1f} tokens/s   achieved "
          f"{100 * r['prefill_fraction_of_ceiling']:5.1f}%  (matmul peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)")
    print()
    if len(r["by_blas_threads"]) > 1:
        print("by OpenBLAS thread count (the headline above is the fastest decode):")
        for b in r["by_blas_threads"]:
            print(f"  {b['blas_threads']} thread(s): decode {b['tokens_per_s']:8.2f} tokens/s, "
                  f"{100 * b['fraction_of_ceiling']:5.1f}% of its ceiling ({b['bandwidth'] / gb:.2f} GB/s); "
                  f"prefill {b['prefill_tokens_per_s']:.1f} tokens/s")
        print()
    print(f"one decode step's time by op kind (the meter's seconds; {100 * r['decode_metered_fraction']:.0f}% "
          "of the step is inside metered ops):")
    for kind, s in r["decode_seconds_by_kind"].items():
        print(f"  {kind:<22} {1e3 * s:8.3f} ms")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: python bench/decode.py out/gpt2-124m --tokens 64")
    ap.add_argument("run", help="a run folder or checkpoint file")
    ap.add_argument("--tokens", type=int, default=64, help="tokens to decode (default 64)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length in tokens (default 64)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of prefill + decode (and of the plain products); each figure is the best "
                    "run's, like the bandwidth's best of 5 (default 3)")
    ap.add_argument("--int8", choices=quant.MODES, default=None, help="quantize on load")
    ap.add_argument("--kv-int8", action="store_true", help="with --int8: keep the KV cache in int8")
    ap.add_argument("--blas-threads", default="1,2",
                    help="OpenBLAS thread counts to measure with, comma-separated (default 1,2: the "
                    "headline is the faster; see minigpt/hardware/blas.py for why one thread can win)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    try:
        args.blas_threads = [int(n) for n in args.blas_threads.split(",")]
    except ValueError:
        ap.error(f"--blas-threads {args.blas_threads!r}: expected counts like 1,2")
    if min(args.tokens, args.prompt, args.repeats, *args.blas_threads) < 1:
        ap.error("--tokens, --prompt, --repeats and --blas-threads must be >= 1")
    if args.kv_int8 and not args.int8:
        ap.error("--kv-int8 needs --int8 MODE")
    r = measure(args)
    if args.format == "json":
        print(json.dumps(r, indent=1))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
