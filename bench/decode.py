"""KV-cached decode against the memory-bandwidth and compute ceilings, at any weight width and
batch, and prefill against the compute ceiling, on a run folder (e.g. `minigpt init
configs/gpt2-124m.toml out/gpt2-124m`).

    python bench/decode.py RUN [--tokens N] [--prompt P] [--repeats R] [--bits 32|16|8|4]
                           [--batch B[,B...]] [--kernels numba|numpy] [--int8 MODE] [--format json]

--bits 16, 8 or 4 packs the weights (minigpt/nn/lowbit.py; --bits 32 is the float32 model, so a
script can loop over widths). --batch B decodes B sequences together (GPT.decode_step, one KV
cache each, each prompt --prompt random tokens): tokens/s counts all sequences; bytes and FLOPs
per step are the meter's; the bandwidth ceiling is B x bandwidth / bytes per step, the bandwidth
being the STREAM figure that fits that batch's own read/write mix (below), and the compute ceiling
B x peak(B) / FLOPs per step, the peak being that of the kernel the products run on at B rows
(kernel_peaks: the tiled float32 kernel or the packed ones, measured at 2 to 64 rows; OpenBLAS's
matmul peak on NumPy's path); the lower binds ("bound", and "ceiling" names it). Our kernels
multiply up to 8 rows (4 at 4 bits) at each pass over a weight tile, each row with its own
per-row work, so a few rows compute at a fraction of 64 rows' rate (our 2-core AMD EPYC: 4 bits,
2 rows 610-890 GFLOP/s and 64 rows 1,260; float32, 220-330 and 450-540). A list (1,8,64)
sweeps: the table gains a row per batch, and the batch at which decode turns compute-bound is predicted from the closed form and,
with two or more batches, measured (knee()). The first batch is the
headline of every other figure. The packed-weight kernels run on as many threads as OpenBLAS in
each --blas-threads pass (kernels/quant.threads); the fused kernels keep their own one thread.

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

predicted_tokens_per_s (each batch's) and predicted_prefill_tokens_per_s: what the time model
forecasts for the same prompt, tokens and batch (minigpt.energy.forecast.generation; `minigpt
costs --predict`). Prefill is forecast for one sequence, as each is prefilled here. The time model
has product rates for the float32 BLAS only: int8 and packed (--bits 16/8/4) products are
forecast at those rates with their own bytes, and predicted_how says so.

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
from minigpt import kernels
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER, matmul, packed_dtype
from minigpt.evaluate import weight_bytes
from minigpt.hardware import bandwidth, blas, calibrate, cpu_power, roofline, timing
from minigpt.kernels import quant as packed_kernels
from minigpt.nn import quant
from minigpt.nn.model import KVCache
from minigpt.units import rows_text


def decode_run(gpt, prompt: np.ndarray, tokens: int, kv_int8: bool):
    """Prefill each prompt (a row of prompt (B, P), or prompt (P,) for one) into its own KV
    cache, then `tokens` greedy decode steps of GPT.decode_step over all B sequences;
    (prefill seconds for all of them, decode seconds, the CPU seconds this process spent in
    the decode: over the decode seconds, the cores it kept busy)."""
    prompts = prompt.reshape(-1, prompt.shape[-1])
    caches = [KVCache(gpt.cfg, 1, gpt.params.data.dtype, int8=kv_int8) for _ in prompts]
    t0 = time.perf_counter()
    with METER.in_phase("prefill"):
        logits = np.stack([gpt.logits(p[None, :], kv, last_only=True)[0, -1] for p, kv in zip(prompts, caches)])
    t1, cpu1 = cpu_power.usage_now()
    with METER.in_phase("decode"):
        for _ in range(tokens):
            logits = gpt.decode_step(logits.argmax(axis=-1), caches)
    t2, cpu2 = cpu_power.usage_now()
    return t1 - t0, t2 - t1, cpu2 - cpu1


def best_run(gpt, prompt: np.ndarray, tokens: int, kv_int8: bool, repeats: int):
    """decode_run `repeats` times; (fastest prefill seconds, fastest decode seconds, the meter's
    records of the fastest decode's run, every run's decode seconds, the fastest decode's CPU
    seconds). The counts are the same in every run; only the seconds differ."""
    prefills, decodes, best_records, best_cpu = [], [], None, None
    for _ in range(repeats):
        METER.reset()
        prefill_s, decode_s, cpu_s = decode_run(gpt, prompt, tokens, kv_int8)
        if not decodes or decode_s < min(decodes):
            best_records, best_cpu = METER.records, cpu_s
        prefills.append(prefill_s)
        decodes.append(decode_s)
    return min(prefills), min(decodes), best_records, decodes, best_cpu


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


PEAK_N = {32: 2048, 16: 2048, 8: 4096, 4: 4096}  # a weight of 16 MiB or less: in the last-level cache
# kernel_peaks' row counts. Not 1: one row's call reads the weight from the cache in 50-80 us,
# and that call measured 15 to 172 GFLOP/s (16 bits) from one process to the next, as worker
# threads woke or not; one row is held at two rows' rate, a ceiling that never binds (one row is
# bandwidth-bound at every width by a factor of 2 or more)
PEAK_ROWS = (2, 4, 8, 16, 32, 64)


def kernel_peak(bits: int, rows: int = 64, n: int | None = None) -> float:
    """FLOP/s of the kernel that runs a decode step's products at `bits` (32: the tiled float32
    kernel of a prepared model, nn/tiled.py; 16, 8, 4: the packed kernels, nn/lowbit.py)
    computing rather than streaming: `rows` rows against one (n, n) weight that stays in the
    last-level cache (n = PEAK_N[bits] unless given), the best of 5 tries of 10 ms each. A
    decode step's products run on this kernel, not on OpenBLAS, so this is their compute
    ceiling: the w4a8 kernel's integer multiply-adds are not bounded by the float32 matmul peak,
    and OpenBLAS's own peak halves under OPENBLAS_CORETYPE=Haswell where these kernels' does
    not. (At one row the weight's read from the cache, not the arithmetic, may set the rate: a
    ceiling all the same, above the memory's.)"""
    from minigpt.kernels import tiles
    from minigpt.nn import lowbit

    n = PEAK_N[bits] if n is None else n
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n), dtype=np.float32)
    x = rng.standard_normal((rows, n), dtype=np.float32)
    if bits == 32:
        packed = tiles.pack(w)
        run = lambda: tiles.product(x, *packed)
    else:
        packed = lowbit.quantize(w, bits)
        run = lambda: lowbit.product(x, packed)
    best = float("inf")
    with METER.paused():
        run()  # loads the kernel and brings the weight into the cache
        for _ in range(5):  # each try repeats the call for 10 ms: a few rows take 0.1 ms a call
            reps, t0 = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - t0) < 0.01:
                run()
                reps += 1
            best = min(best, elapsed / reps)
    return 2 * rows * n * n / best


def kernel_peaks(bits: int) -> list:
    """[[rows, FLOP/s]] of kernel_peak at each of PEAK_ROWS, the better of two sweeps over them:
    the kernel's compute ceiling at each batch (peak_at; below 2 rows, 2 rows'). For a tenth
    of a second after the STREAM figures free their 256 MiB arrays, the first row count ran at
    a third of its rate (16 bits, 2 rows: 121 against 320-340 GFLOP/s)."""
    sweeps = [[kernel_peak(bits, rows) for rows in PEAK_ROWS] for _ in range(2)]
    return [[rows, max(flops)] for rows, flops in zip(PEAK_ROWS, zip(*sweeps))]


def peak_at(peak, rows: float) -> float:
    """The compute peak at `rows` rows: peak itself where it is one figure (OpenBLAS's), else
    kernel_peaks' points interpolated log-log in rows and held beyond the first and last."""
    if isinstance(peak, (int, float)):
        return float(peak)
    rows = min(max(rows, peak[0][0]), peak[-1][0])
    measured = {r: f for r, f in peak}
    return measured[rows] if rows in measured else timing.log_linear(peak, rows)  # a point: exactly it


def bandwidths() -> dict:
    """Every STREAM figure ("read.all_cores" -> StreamFigure): 256 MiB arrays, best of 5."""
    return {f.key: f for f in bandwidth.measure_stream()}


def load_model(args):
    """The run, quantized as asked: --int8 MODE, or --bits 16/8/4 (32: the float32 model)."""
    model = minigpt.load(args.run)
    bits = getattr(args, "bits", 32)
    if args.int8:
        model.quantize(args.int8, kv_int8=args.kv_int8)
    elif bits != 32:
        model.quantize(bits=bits, group_size=getattr(args, "group_size", 32),
                       storage16=getattr(args, "storage16", "fp16"), kv_int8=args.kv_int8)
    return model


def measure(args) -> dict:
    """Load once; then, for each thread count asked for (OpenBLAS's and Numba's), bandwidth,
    prefill + decode at each batch, bandwidth again, and the compute peak. The headline is the
    thread count that decoded fastest at the first batch."""
    kernels.use(getattr(args, "kernels", kernels.active()))
    model = load_model(args)
    gpt, cfg = model.gpt, model.config.model
    gpt.prepare_decode()
    if args.prompt + args.tokens > cfg.block_size:
        print(f"error: --prompt {args.prompt} + --tokens {args.tokens} exceed {args.run}'s block_size "
              f"{cfg.block_size}", file=sys.stderr)
        raise SystemExit(2)  # bad input: exit 2, as argparse's errors
    from minigpt.train import timing_runs

    # found (or measured) before any thread count is imposed: a time model measured on one
    # thread would be cached and predict every later run from one thread's figures
    tm = timing_runs.time_model()
    runs = []
    for n in args.blas_threads:
        with blas.threads(n) as applied, packed_kernels.threads(n):
            r = _measure(gpt, cfg, args, tm)
        r["blas_threads"] = n if applied else blas.current()
        runs.append(r)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    best["by_blas_threads"] = [{k: r[k] for k in ("blas_threads", "tokens_per_s", "fraction_of_ceiling",
                                                  "prefill_tokens_per_s", "bandwidth",
                                                  "plain_matvec_tokens_per_s")} for r in runs]
    best["int8_split"] = int8_split(gpt)
    return best


KNEE_SEARCH_LIMIT = 1024


def knee(points: list, peak, memory) -> dict:
    """The batch at which decode turns compute-bound: past it, a step's time grows with its
    sequences' own work; below it, it is the weights' one read, whatever the batch.

    peak: a FLOP/s figure, or kernel_peaks' points (each batch's ceiling: peak_at).
    memory: a bandwidth in bytes/s, or a profile (bandwidth.as_profile) whose STREAM figure
    nearest the step's read/write mix is the bandwidth (roofline.memory_ceiling).
    Predicted, from the closed form's counts of a step at 1 and 2 sequences: a sequence adds its
    FLOPs (2 a weight) and its own bytes (its KV cache, its activations); the rest of a step's
    bytes, the weights, are read once whatever the batch. The knee is the smallest batch B at
    which B sequences' own work, their FLOPs at the kernel's peak at B rows plus their bytes at
    the bandwidth, takes as long as reading the weights: doubling, then bisecting. None if not
    by KNEE_SEARCH_LIMIT sequences. (Counting a sequence's KV cache as its own work, not as the
    step's bandwidth: every sequence reads its own cache, so the cache's time grows with the
    batch as the arithmetic's does. Comparing all of a step's FLOPs with all of its bytes, as
    before, put GPT-2's 4-bit knee at 14-30 sequences where it measured 3.4-3.8: at 64
    sequences the caches are 380 MB a step against 78 MB of weights.)
    Measured: the same crossing on the measured step times. Below the knee a step takes the first
    batch's time, whatever its batch (every weight read once); past it, the time its sequences'
    own work takes, in proportion to the batch: the largest batch's step time over its batch is
    that cost per sequence. Their crossing, first step time / (largest step time / largest
    batch), at least 1 (compute-bound from the first batch on). None with one batch, or where the
    crossing is above half the largest batch: that batch's time is then not mostly its
    sequences' own (at the knee itself it is still the first batch's time), so a larger batch is
    needed to locate it. (A line through the two largest batches' times, used before, put a
    bandwidth-bound second largest batch on the compute line: with batches 1, 8, 64 it could not
    find a knee above 8.)"""
    cfg, pos, quant_cfg = points[0]["_cfg"], points[0]["_position"], points[0]["_quant"]

    def counts(B):
        recs = cost_model.predict_decode_batch(cfg, [pos] * B, quant=quant_cfg).values()
        return (sum(r.flops for r in recs), sum(r.bytes_read for r in recs),
                sum(r.bytes_written for r in recs))

    (f1, r1, w1), (f2, r2, w2) = counts(1), counts(2)
    flops_each, bytes_each = f2 - f1, (r2 + w2) - (r1 + w1)  # what each sequence adds
    weights = r1 + w1 - bytes_each
    bw = memory if isinstance(memory, (int, float)) else roofline.memory_ceiling(memory, r1, w1).value

    def compute_bound(B):
        return B * (flops_each / peak_at(peak, B) + bytes_each / bw) >= weights / bw

    hi = 1
    while not compute_bound(hi) and hi < KNEE_SEARCH_LIMIT:
        hi *= 2
    if compute_bound(hi):
        lo = hi // 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if compute_bound(mid) else (mid, hi)
    else:
        hi = None
    measured = None
    if len(points) >= 2:
        t1 = points[0]["step_s"]
        largest = max(points, key=lambda p: p["batch"])
        crossing = t1 / (largest["step_s"] / largest["batch"])
        if crossing <= largest["batch"] / 2:
            measured = max(1.0, crossing)
    return {"knee_batch_predicted": hi, "knee_batch_measured": measured}


def _measure(gpt, cfg, args, tm) -> dict:
    batches = getattr(args, "batch", [1])
    rng = np.random.default_rng(0)
    prompts = {B: rng.integers(0, cfg.vocab_size, size=(B, args.prompt)) for B in batches}
    with METER.paused():
        decode_run(gpt, prompts[batches[0]][:, :8], 2, args.kv_int8)  # warm up: page faults, BLAS buffers
    before = bandwidths()
    timed = {B: best_run(gpt, prompts[B], args.tokens, args.kv_int8, args.repeats) for B in batches}
    plain_s = plain_matvec(gpt, args.tokens, args.repeats) if gpt.quant is None else None
    plain2_s = plain_matvec_two_threads(gpt, args.tokens) if gpt.quant is None else None
    after = bandwidths()
    bits = 8 if args.int8 else getattr(args, "bits", 32)
    blas_peak = calibrate.matmul_flops("float32", 2048, 3)
    blas_name = "float32 matmul peak"
    blas_how = "calibrate.matmul_flops: float32 2048 x 2048 products, best of 3, in this process"
    peak, peak_name, peak_how = blas_peak, blas_name, blas_how
    if kernels.active() == "numba" and not args.int8:  # the products run on our kernels
        n = PEAK_N[bits]
        peak = kernel_peaks(bits)
        peak_name = f"{bits}-bit kernel peak"
        peak_how = (f"kernel_peaks: the {bits}-bit decode kernel at the batch's rows (measured at "
                    f"{', '.join(map(str, PEAK_ROWS))}) against a {n} x {n} weight in cache, best of 5")
    # a float32 prefill's block products run on OpenBLAS (only decode steps take the tiles)
    prefill_peak, prefill_name = (blas_peak, blas_name) if bits == 32 else (peak_at(peak, 64), peak_name)
    means = {k: (before[k].bytes_per_s + after[k].bytes_per_s) / 2 for k in before}
    measured = bandwidth.as_profile(means, {k: f.method() for k, f in before.items()})
    copy_bw = roofline.memory_ceiling(measured, 1, 1)  # a copy's mix, for comparison
    read_bw = roofline.memory_ceiling(measured, 1, 0)
    qcfg = gpt.quant.qcfg if gpt.quant is not None else None
    forecasts = predicted_rates(cfg, qcfg, args, batches, tm)
    points = []
    for B in batches:
        prefill_s, decode_s, records, decode_runs, cpu_s = timed[B]
        pre, dec = phase_totals(records, "prefill"), phase_totals(records, "decode")
        steps = args.tokens
        step_s = decode_s / steps
        bytes_per_step, flops_per_step = dec["bytes"] / steps, dec["flops"] / steps
        # this batch's own read/write mix picks the STREAM kind (more sequences: more written)
        memory = roofline.memory_ceiling(measured, dec["bytes_read"], dec["bytes_written"])
        bw_ceiling = B * memory.value / bytes_per_step  # tokens/s over all sequences
        compute_ceiling = B * peak_at(peak, B) / flops_per_step
        tokens_per_s = B * steps / decode_s
        ceiling = min(bw_ceiling, compute_ceiling)
        bound = "bandwidth" if bw_ceiling <= compute_ceiling else "compute"
        points.append({
            "batch": B, "tokens_per_s": tokens_per_s, "step_s": step_s,
            "bytes_per_step": bytes_per_step, "bytes_per_token": bytes_per_step / B,
            "decode_bytes_read_per_token": dec["bytes_read"] / (steps * B),
            "decode_bytes_written_per_token": dec["bytes_written"] / (steps * B),
            "flops_per_step": flops_per_step,
            "bandwidth_ceiling": memory.name, "bandwidth": memory.value,
            "bandwidth_ceiling_tokens_per_s": bw_ceiling, "compute_ceiling_tokens_per_s": compute_ceiling,
            "peak_flops": peak_at(peak, B),
            "ceiling_tokens_per_s": ceiling, "fraction_of_ceiling": tokens_per_s / ceiling,
            "bound": bound,
            "ceiling": memory.name if bound == "bandwidth" else peak_name,
            "ceiling_how": memory.how if bound == "bandwidth" else peak_how,
            **forecasts[B],
            "overhead_per_step_s": max(0.0, step_s - dec["seconds"] / steps),
            "decode_metered_fraction": dec["seconds"] / decode_s,
            "decode_runs_tokens_per_s": [B * steps / s for s in decode_runs],
            "busy_cores": cpu_s / decode_s,  # CPU seconds over wall seconds, the fastest run's
            "decode_seconds_by_kind": {k: v / steps for k, v in sorted(
                dec["by_kind"].items(), key=lambda kv: -kv[1])},
            "prefill_s": prefill_s, "_pre": pre,
            "_cfg": cfg, "_position": args.prompt + args.tokens // 2, "_quant": qcfg,
        })
    first = points[0]
    B = first["batch"]
    pre = first["_pre"]
    prefill_tokens = B * args.prompt
    prefill_flops_per_token = pre["flops"] / prefill_tokens
    tokens_per_s = first["tokens_per_s"]
    bytes_per_token = first["bytes_per_token"]
    here_bytes = bytes_per_token + widened_bytes(gpt) / B
    out = {
        "run": str(args.run), "mode": args.int8 or (qcfg.name if qcfg is not None else "fp32"),
        "kv_int8": args.kv_int8, "bits": bits, "batch": B, "kernels": kernels.active(),
        "params": gpt.params.size, "weight_bytes": weight_bytes(gpt),
        "prompt_tokens": args.prompt, "new_tokens": args.tokens,
        "repeats": args.repeats,
        "bandwidth_before": {k: f.bytes_per_s for k, f in before.items()},
        "bandwidth_after": {k: f.bytes_per_s for k, f in after.items()},
        "bandwidth_source": f"{first['bandwidth_ceiling']}: the STREAM kind nearest the decode step's "
                            "read/write mix; the mean of the measurements right before and right after "
                            "the decode, in this process",
        "copy_bandwidth": copy_bw.value,
        "fraction_of_copy_ceiling": tokens_per_s * bytes_per_token / copy_bw.value,
        "bytes_per_token_here": here_bytes,
        "ceiling_here_tokens_per_s": first["bandwidth"] / here_bytes,
        "predicted_prefill_tokens_per_s": forecasts["prefill_tokens_per_s"],
        "predicted_how": forecasts["how"],
        "prefill_tokens_per_s": prefill_tokens / first["prefill_s"],
        "prefill_flops_per_token": prefill_flops_per_token,
        "matmul_peak_flops": first["peak_flops"], "compute_peak": peak_name, "compute_peak_how": peak_how,
        "kernel_peaks": None if isinstance(peak, (int, float)) else peak,
        "prefill_peak_flops": prefill_peak, "prefill_compute_peak": prefill_name,
        "prefill_ceiling_tokens_per_s": prefill_peak / prefill_flops_per_token,
        "prefill_fraction_of_ceiling": (prefill_tokens / first["prefill_s"]) / (prefill_peak / prefill_flops_per_token),
        "environment": calibrate._environment(),
        "plain_matvec_tokens_per_s": 1 / plain_s if plain_s else None,
        "fraction_of_plain_matvec": tokens_per_s / B * plain_s if plain_s else None,
        "plain_matvec_two_threads_tokens_per_s": 1 / plain2_s if plain2_s else None,
        "read_bandwidth": read_bw.value,
        "fraction_of_read_ceiling": tokens_per_s * bytes_per_token / read_bw.value,
    }
    out |= {k: v for k, v in first.items() if not k.startswith("_") and k != "prefill_s"}
    out |= knee(points, peak, measured)
    out["batches"] = [{k: v for k, v in p.items() if not k.startswith("_") and k not in (
        "decode_seconds_by_kind", "prefill_s")} for p in points]
    return out


def predicted_rates(cfg, qcfg, args, batches, model) -> dict:
    """The time model's forecast (minigpt.energy.forecast.generation) for this run: {B:
    {"predicted_tokens_per_s"}} for each batch, the prefill rate of one sequence (each is
    prefilled on its own here) and how the forecast treats this run's products."""
    from minigpt.energy import forecast

    out = {}
    for B in batches:
        g = forecast.generation(cfg, model, args.prompt, args.tokens, batch=B, quant=qcfg)
        out[B] = {"predicted_tokens_per_s": g.tokens_per_s}
    one = forecast.generation(cfg, model, args.prompt, args.tokens, batch=1, quant=qcfg)
    out["prefill_tokens_per_s"] = args.prompt / one.prefill_s
    if qcfg is None:
        out["how"] = "the time model's float32 product rates and stream bandwidth"
    elif qcfg.bits and model.packed_rate(packed_dtype(qcfg.bits), 1) is not None \
            and forecast.packed_kernels():
        out["how"] = (f"the time model's {qcfg.bits}-bit packed-kernel rates (measured streaming a "
                      f"{timing.PACKED_BYTES >> 20} MiB packed weight) and float32 rates elsewhere")
    else:
        width = f"{qcfg.bits}-bit packed" if qcfg.bits else f"int8 {qcfg.mode}"
        out["how"] = (f"the time model has no rate for {width} products: forecast at its float32 product "
                      "rates, with their own bytes")
    return out


def print_table(r: dict) -> None:
    gb = 1e9
    print(f"{r['run']}: {r['params']:,} parameters, {r['mode']}"
          f"{' + int8 KV cache' if r['kv_int8'] else ''}, weights {r['weight_bytes'] / 1e6:.1f} MB, "
          f"batch {r['batch']}, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} decoded "
          f"({r['environment']}; threads: {r['blas_threads']}; kernels: {r['kernels']})")
    for k in r["bandwidth_before"]:
        print(f"bandwidth, {k} (read + written): {r['bandwidth_before'][k] / gb:.2f} GB/s before the decode, "
              f"{r['bandwidth_after'][k] / gb:.2f} GB/s after")
    print(f"bandwidth ceiling: the {r['bandwidth_ceiling']}, {r['bandwidth'] / gb:.2f} GB/s (the mean), the STREAM "
          f"kind nearest the decode step's mix ({r['decode_bytes_read_per_token'] / 1e6:.2f} MB read, "
          f"{r['decode_bytes_written_per_token'] / 1e6:.3f} MB written per token); {r['ceiling_how']}"
          if r["bound"] == "bandwidth" else
          f"bandwidth ceiling: the {r['bandwidth_ceiling']}, {r['bandwidth'] / gb:.2f} GB/s (the mean), the STREAM "
          f"kind nearest the decode step's mix; the {r['ceiling']} binds ({r['ceiling_how']})")
    print()
    print(f"decode    {r['tokens_per_s']:10.2f} tokens/s   {r['bytes_per_token'] / 1e6:9.2f} MB/token (meter)"
          f"   ceiling {r['ceiling_tokens_per_s']:8.2f} tokens/s   achieved {100 * r['fraction_of_ceiling']:5.1f}%")
    print(f"          compute ceiling {r['compute_ceiling_tokens_per_s']:.2f} tokens/s "
          f"({r['flops_per_step'] / 1e9:.3f} GFLOP a step at the {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s "
          f"{r['compute_peak']}): {r['bound']}-bound; {1e3 * r['overhead_per_step_s']:.2f} ms a step outside "
          "the metered ops (Python between them)")
    if r["repeats"] > 1:
        runs = ", ".join(f"{t:.2f}" for t in r["decode_runs_tokens_per_s"])
        print(f"          the best of {r['repeats']} runs ({runs} tokens/s; the mean "
              f"{100 * np.mean(r['decode_runs_tokens_per_s']) / r['ceiling_tokens_per_s']:.1f}% of the ceiling)")
    print(f"          against the copy bandwidth ({r['copy_bandwidth'] / gb:.2f} GB/s, read + write counted) "
          f"the decode would be {100 * r['fraction_of_copy_ceiling']:.1f}%: a copy is not what a decode does")
    print(f"          predicted {r['predicted_tokens_per_s']:.2f} tokens/s by the time model "
          f"({100 * (r['predicted_tokens_per_s'] / r['tokens_per_s'] - 1):+.1f}%; prefill "
          f"{r['predicted_prefill_tokens_per_s']:.1f} tokens/s predicted; {r['predicted_how']})")
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
              f"{r['bytes_per_token'] / r['bandwidth'] * 1e3:.1f} ms at the {r['bandwidth_ceiling']})")
    if len(r["batches"]) > 1:
        print()
        print("\n".join(rows_text(
            ("batch", "tokens/s", "predicted", "ms/step", "MB/token", "GFLOP/step", "bw ceiling", "at",
             "compute ceiling", "bound", "of ceiling"),
            [(str(p["batch"]), f"{p['tokens_per_s']:.1f}", f"{p['predicted_tokens_per_s']:.1f}",
              f"{1e3 * p['step_s']:.2f}", f"{p['bytes_per_token'] / 1e6:.2f}", f"{p['flops_per_step'] / 1e9:.3f}",
              f"{p['bandwidth_ceiling_tokens_per_s']:.1f}",
              f"{p['bandwidth_ceiling'].replace(' bandwidth', '')} {p['bandwidth'] / gb:.2f} GB/s",
              f"{p['compute_ceiling_tokens_per_s']:.1f}", p["bound"], f"{100 * p['fraction_of_ceiling']:.1f}%")
             for p in r["batches"]])))
        measured = r["knee_batch_measured"]
        predicted = r["knee_batch_predicted"]
        print(f"decode turns compute-bound at batch "
              f"{f'> {KNEE_SEARCH_LIMIT}' if predicted is None else predicted} (predicted: the closed form's "
              f"FLOPs and each sequence's own bytes against the weights' read, at the kernel's peak at that batch and "
              f"the STREAM bandwidth); measured "
              f"{'-' if measured is None else f'{measured:.1f}'} (where the first batch's step time meets "
              "the largest batch's time per sequence times the batch)")
    print(f"prefill   {r['prefill_tokens_per_s']:10.1f} tokens/s   {r['prefill_flops_per_token'] / 1e9:9.3f} "
          f"GFLOP/token       ceiling {r['prefill_ceiling_tokens_per_s']:8.1f} tokens/s   achieved "
          f"{100 * r['prefill_fraction_of_ceiling']:5.1f}%  ({r['prefill_compute_peak']} {r['prefill_peak_flops'] / 1e9:.0f} GFLOP/s)")
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
    ap.add_argument("--bits", type=int, choices=(32, 16, 8, 4), default=32,
                    help="weight width: 32 = the float32 model; 16, 8, 4 = packed weight-only (default 32)")
    ap.add_argument("--group-size", type=int, default=32, help="--bits 4: inputs sharing a scale (default 32)")
    ap.add_argument("--storage16", choices=("fp16", "bf16"), default="fp16", help="--bits 16: the format")
    ap.add_argument("--batch", default="1",
                    help="sequences decoded together, comma-separated to sweep (e.g. 1,8,64; two or "
                    "more give a measured knee); the first is the headline (default 1)")
    ap.add_argument("--kernels", choices=kernels.CHOICES, default=kernels.active(),
                    help=f"the packed products' path (default {kernels.active()})")
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
    try:
        args.batch = [int(n) for n in args.batch.split(",")]
    except ValueError:
        ap.error(f"--batch {args.batch!r}: expected sizes like 1,8,64")
    if min(args.batch) < 1:
        ap.error("--batch sizes must be >= 1")
    if args.kv_int8 and not (args.int8 or args.bits != 32):
        ap.error("--kv-int8 needs --int8 MODE or --bits 16|8|4")
    if args.int8 and args.bits != 32:
        ap.error("--int8 MODE and --bits are two ways to quantize: give one")
    r = measure(args)
    if args.format == "json":
        print(json.dumps(r, indent=1))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
