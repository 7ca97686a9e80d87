"""Predicted against measured seconds per step, on shapes the time model was not calibrated on.

    python bench/predict.py [--repeats R] [--measure [--careful]] [--only NAME,...] [--format table|json]

For each case (training steps, prefills and decode steps, from a 2-layer toy to GPT-2 124M's
shape, spanning well over 100x in FLOPs per step) it builds a GPT-2-initialised model, predicts one
step with the time model (minigpt.hardware.timing over closed_form.op_calls: what `minigpt costs
--config C --predict` prints), then runs the step R times (each right after an untimed step of the same case; the
cases interleaved) and takes the best wall seconds, the statistic the calibration takes too (the median is printed beside it): a training step is the trainer's forward, backward, clip and AdamW; a prefill is
one forward of seq tokens at batch 1 keeping the last position's logits; a decode step is one
token at batch 1 with the KV cache holding seq // 2 positions (the mean of DECODE_STEPS steps).
The calibration shapes (minigpt.train.timing_runs.QUICK_SHAPES, CAREFUL_SHAPES) are all 1- and
2-layer models; none of these cases is one of them.

The time model is the one a run would use (`minigpt calibrate`'s, else the cached quick one);
--measure takes a fresh quick one first (--careful: a careful one, as `minigpt calibrate` takes it),
in this process, just before the cases. The error is
(predicted - measured) / measured; the summary gives the largest and the median |error|.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt import config
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.energy import forecast
from minigpt.hardware import timing
from minigpt.train import timing_runs
from minigpt.train.timing_runs import DECODE_STEPS, Shape

# name -> (mode, shape): n_layer, n_embd, n_head, seq, batch, vocab
CASES = {
    "toy-train": ("train", Shape(2, 64, 2, 64, 4, 256)),
    "tiny-train": ("train", Shape(4, 128, 4, 64, 16, 256)),
    "mid-train": ("train", Shape(4, 192, 6, 128, 8, 512)),
    "wide-train": ("train", Shape(6, 384, 6, 256, 4, 2048)),
    "gpt2-124m-train": ("train", Shape(12, 768, 12, 128, 1, 50257)),
    "tiny-prefill": ("prefill", Shape(4, 128, 4, 64, 1, 256)),
    "wide-prefill": ("prefill", Shape(6, 384, 6, 256, 1, 2048)),
    "gpt2-124m-prefill": ("prefill", Shape(12, 768, 12, 512, 1, 50257)),
    "tiny-decode": ("decode", Shape(4, 128, 4, 64, 1, 256)),
    "wide-decode": ("decode", Shape(6, 384, 6, 256, 1, 2048)),
    "gpt2-124m-decode": ("decode", Shape(12, 768, 12, 512, 1, 50257)),
}


def _config(s: Shape) -> config.Config:
    cfg = config.Config()
    cfg.model = config.ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                   block_size=s.seq, vocab_size=s.vocab)
    cfg.train.batch_size = s.batch
    return cfg


def predicted(tm: timing.TimeModel, mode: str, s: Shape) -> tuple[float, int]:
    """(seconds per step, FLOPs per step) as `minigpt costs --predict` gives them."""
    cfg = _config(s)
    if mode == "decode":
        f = forecast.forecast(cfg, tm, "decode", steps=DECODE_STEPS, batch=1, seq=s.seq // 2)
        flops = sum(c.flops for c in closed_form.op_calls(cfg.model, "decode", 1, s.seq // 2))
    else:
        batch = s.batch if mode == "train" else 1
        f = forecast.forecast(cfg, tm, mode, steps=1, batch=batch, seq=s.seq)
        flops = sum(c.flops for c in closed_form.op_calls(cfg.model, mode, batch, s.seq))
    return f.seconds_per_step, flops


def measured(cases: list[tuple[str, Shape]], repeats: int) -> list[tuple[float, float]]:
    """(best, median) wall seconds of one step of each case over `repeats` runs, the cases
    interleaved (A B C A B C ...) so a disturbance from another process spreads over them rather
    than spoiling one case's every run. Each timed step follows an untimed one of its own case, as
    a run's steps follow each other: what it times is a run's step, its weights and buffers in
    the state the previous step left them, not the first step after another model's."""
    fns, walls = [], [[] for _ in cases]
    for mode, shape in cases:
        model, opt = timing_runs.build(shape)
        fns.append((timing_runs.step_functions(model, opt, shape)[mode],
                    DECODE_STEPS if mode == "decode" else 1))
    saved = METER.records
    for _ in range(repeats):
        for (fn, per), out in zip(fns, walls):
            fn()
            METER.reset()
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) / per)
    METER.records = saved
    return [(min(w), statistics.median(w)) for w in walls]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--measure", action="store_true", help="measure a fresh quick time model first")
    p.add_argument("--careful", action="store_true",
                   help="with --measure: a careful model (minigpt calibrate's: about a minute)")
    p.add_argument("--only", default="", help="comma-separated case names")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    tm = timing_runs.measure(quick=not args.careful) if args.measure else timing_runs.time_model()
    names = [n for n in args.only.split(",") if n] or list(CASES)
    results = []
    times = measured([CASES[n] for n in names], args.repeats)
    for name, (best, median) in zip(names, times):
        mode, shape = CASES[name]
        pred, flops = predicted(tm, mode, shape)
        results.append({"case": name, "mode": mode, "shape": shape._asdict(), "flops_per_step": flops,
                        "predicted_s": pred, "measured_s": best, "measured_median_s": median,
                        "error": forecast.error(pred, best)})
    errors = sorted(abs(r["error"]) for r in results)
    summary = {"max_abs_error": errors[-1], "median_abs_error": statistics.median(errors),
               "time_model": timing.provenance(tm), "suspect": timing.suspect(tm) or None,
               "repeats": args.repeats}
    if args.format == "json":
        print(json.dumps({"cases": results, "summary": summary}, indent=1))
        return 0
    print(f"{'case':<20} {'mode':<8} {'FLOPs/step':>11} {'predicted s':>12} {'measured s':>11} "
          f"{'error':>7} {'median s':>10}")
    for r in results:
        print(f"{r['case']:<20} {r['mode']:<8} {r['flops_per_step']:>11.3g} {r['predicted_s']:>12.4g} "
              f"{r['measured_s']:>11.4g} {100 * r['error']:>+6.1f}% {r['measured_median_s']:>10.4g}")
    print(f"|error|: max {100 * summary['max_abs_error']:.1f}%, median "
          f"{100 * summary['median_abs_error']:.1f}%  (time model: {summary['time_model']}; "
          f"measured: best of {args.repeats} runs each, the cases interleaved)")
    if summary["suspect"]:
        print(f"note: the time model was {summary['suspect']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
