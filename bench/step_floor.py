"""What a batch-1 decode step spends outside its kernels, on the Python step and on the compiled one.

    python bench/step_floor.py RUN [--bits 32,16,8,4] [--group-size G] [--prompt P] [--tokens N]
                               [--rounds R] [--threads N] [--format json]

For one sequence (batch 1) of RUN (e.g. `minigpt init configs/gpt2-124m.toml out/gpt2-124m`),
quantized at each width (32: the float32 model) and prepared as generation prepares it (packed
weights; float32 ones in the tiled kernel's layout), this times --tokens greedy decode steps
after a --prompt token prefill, four ways, interleaved round by round (best of --rounds):

    python     GPT.decode_step on nn/decode.py's Python step (nn/compiled.py's ENABLED off):
               some 170 kernel calls from Python, each with its dispatch and meter record
    model      GPT.decode_step as generate, serve and bench/decode.py run it: the blocks and
               the head in one compiled call (kernels/step.py), the records added after it
    unmetered  the same with the meter off
    call       the compiled call alone (timed around it inside the model's step): the kernels,
               with no Python between them

and checks that both steps give the same logits, bit for bit, at every step. "outside" is model
less call: the embedding, the step's Python and the records.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import minigpt
from minigpt import kernels  # (sets the OpenMP wait policy before Numba loads)
from minigpt.counting.meter import METER
from minigpt.nn import compiled
from minigpt.nn.model import KVCache
from minigpt.units import rows_text


def measure(args) -> list:
    from minigpt.kernels import quant as kq
    from minigpt.kernels import step

    kernels.use("numba")
    rng = np.random.default_rng(0)
    models = {}
    for bits in args.bits:
        model = minigpt.load(args.run)
        if bits != 32:
            model.quantize(bits=bits, group_size=args.group_size)
        model.gpt.prepare_decode()
        models[bits] = model.gpt
    prompt = rng.integers(0, models[args.bits[0]].cfg.vocab_size, size=args.prompt)
    calls = []  # seconds of each compiled call, while a run collects them
    kernel = step.decode_step

    def timed(*a):
        t0 = time.perf_counter()
        kernel(*a)
        calls.append(time.perf_counter() - t0)

    def run(gpt, on: bool, meter: bool) -> tuple:
        """(seconds a step, seconds a compiled call, the logits of every step)."""
        compiled.ENABLED = on
        kv = KVCache(gpt.cfg, 1, "float32")
        logits = gpt.logits(prompt[None], kv, last_only=True)[0, -1]
        METER.reset()
        METER.enabled = meter
        calls.clear()
        steps = []
        try:
            with kq.threads(args.threads), METER.in_phase("decode"):
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    logits = gpt.decode_step(np.array([int(logits.argmax())]), [kv])[0]
                    steps.append(logits)
                elapsed = (time.perf_counter() - t0) / args.tokens
        finally:
            METER.enabled = True
            compiled.ENABLED = True
        return elapsed, (sum(calls) / len(calls) if calls else float("nan")), steps

    step.decode_step = timed
    try:
        for bits in args.bits:  # compile, warm up, check
            _, _, python_steps = run(models[bits], False, True)
            _, _, model_steps = run(models[bits], True, True)
            if not all(np.array_equal(a, b) for a, b in zip(python_steps, model_steps)):
                raise SystemExit(f"{bits} bits: the compiled step's logits differ from the Python step's")
        best = {(bits, kind): float("inf") for bits in args.bits
                for kind in ("python", "model", "unmetered", "call")}
        for _ in range(args.rounds):
            for bits in args.bits:
                gpt = models[bits]
                best[bits, "python"] = min(best[bits, "python"], run(gpt, False, True)[0])
                model_s, call_s, _ = run(gpt, True, True)
                if model_s < best[bits, "model"]:
                    best[bits, "model"], best[bits, "call"] = model_s, call_s
                best[bits, "unmetered"] = min(best[bits, "unmetered"], run(gpt, True, False)[0])
    finally:
        step.decode_step = kernel
    rows = []
    for bits in args.bits:
        python_s, model_s, unmetered_s, call_s = (best[bits, k] for k in ("python", "model", "unmetered", "call"))
        rows.append({"bits": bits, "python_step_s": python_s, "model_step_s": model_s,
                     "unmetered_step_s": unmetered_s, "call_s": call_s, "outside_s": model_s - call_s,
                     "python_tokens_per_s": 1 / python_s, "model_tokens_per_s": 1 / model_s})
    if 32 in args.bits:  # each width's speed-up over float32, each way
        fp32 = next(r for r in rows if r["bits"] == 32)
        for r in rows:
            r["python_vs_fp32"] = fp32["python_step_s"] / r["python_step_s"]
            r["model_vs_fp32"] = fp32["model_step_s"] / r["model_step_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder or checkpoint file (GPT-2 124M's shape: configs/gpt2-124m.toml)")
    ap.add_argument("--bits", default="32,16,8,4", help="weight widths, comma-separated (default 32,16,8,4)")
    ap.add_argument("--group-size", type=int, default=32, help="4 bits: inputs a scale (default 32)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed steps (default 64)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps a run (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best counts (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="the kernels' threads (default: every core)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if not kernels.AVAILABLE:
        ap.error("needs Numba (the compiled step is Numba's)")
    args.bits = [int(b) for b in args.bits.split(",")]
    if any(b not in (32, 16, 8, 4) for b in args.bits) or args.prompt < 1 or args.tokens < 1 or args.rounds < 1:
        ap.error("--bits takes 32, 16, 8 and 4; --prompt, --tokens and --rounds must be at least 1")
    if args.threads is None:
        import numba

        args.threads = numba.config.NUMBA_NUM_THREADS  # every core, as the kernels default to
    rows = measure(args)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.run}: one sequence, {args.prompt}-token prompt, best of {args.rounds} rounds of "
          f"{args.tokens} steps; the compiled step's logits equal the Python step's")
    ratio = (lambda r, k: f"{r[k]:.2f}x" if k in r else "-")
    print("\n".join(rows_text(
        ("bits", "python ms", "model ms", "unmetered ms", "call ms", "outside ms", "python tok/s",
         "model tok/s", "python vs fp32", "model vs fp32"),
        [(str(r["bits"]), f"{1e3 * r['python_step_s']:.2f}", f"{1e3 * r['model_step_s']:.2f}",
          f"{1e3 * r['unmetered_step_s']:.2f}", f"{1e3 * r['call_s']:.2f}", f"{1e3 * r['outside_s']:.2f}",
          f"{r['python_tokens_per_s']:.1f}", f"{r['model_tokens_per_s']:.1f}", ratio(r, "python_vs_fp32"),
          ratio(r, "model_vs_fp32"))
         for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
