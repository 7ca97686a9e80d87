"""The most two data-parallel ranks can gain over one process on this machine, for a config.

    python bench/dist_bound.py [--case tiny --case wide] [--repeats 5] [--format json]

Two ranks on a 2-core machine each run a training step on half the batch with one thread (what
`mpiexec -n 2 python train.py` does: minigpt.hardware.blas plans a thread per rank), then add
their gradients. One process runs the whole batch with the libraries' two threads. So, however
good the communication, two ranks are faster by at most

    bound = step(whole batch, 2 threads) / step(half the batch, 1 thread)

and only by that if the allreduce costs nothing. This script measures the four steps in one
process (the trainer's forward, backward, clip and AdamW on the case's shape, best of --repeats
after a warm-up, through minigpt.train.timing_runs) and prints the bound beside what each
thread count does on its own: where the libraries already run the whole batch nearly twice as
fast on two threads as on one, two ranks have little left to win (bench/dist.py measures what they
do win). The cases are bench/dist.py's.

A rank's half-batch step is also timed with both cores busy: two processes run it at once (no
MPI, nothing exchanged), as two ranks do. Two busy cores share the memory, the last-level cache
and the chip's power, so each step is slower than with the other core idle; one process's
two-thread step already pays that. The "busy" bound, step(whole batch, 2 threads) / step(half the
batch, 1 thread, both cores busy), is the most two ranks can gain here, however good the
allreduce.
"""

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist import CASES

from minigpt import config
from minigpt.hardware import blas
from minigpt.train import timing_runs
from minigpt.train.timing_runs import Shape


def shape_of(case: str, batch: int | None = None) -> Shape:
    path, overrides = CASES[case]
    cfg = config.load(Path(__file__).resolve().parents[1] / path, overrides)
    m = cfg.model
    return Shape(m.n_layer, m.n_embd, m.n_head, m.block_size, batch or cfg.train.batch_size,
                 m.vocab_size)


def step_seconds(shape: Shape, threads: int, repeats: int) -> float:
    """Best wall seconds of one training step of the shape on `threads` BLAS threads."""
    model, opt = timing_runs.build(shape)
    step = timing_runs.step_functions(model, opt, shape)["train"]
    with blas.threads(threads):
        step()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
    return best


def _busy(shape: dict, repeats: int, start, results) -> None:
    """One of two processes timing the same step at once (started with spawn)."""
    model, opt = timing_runs.build(Shape(**shape))
    step = timing_runs.step_functions(model, opt, Shape(**shape))["train"]
    with blas.threads(1):
        step()
        start.wait()  # both warmed up: from here on both cores are busy
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - t0)
    results.put(best)


def step_seconds_both_busy(shape: Shape, repeats: int, processes: int = 2) -> float:
    """Best wall seconds of the shape's step on 1 thread while `processes` processes run it at
    once (the mean over the processes of each one's best)."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_busy, args=(shape._asdict(), repeats, start, results))
             for _ in range(processes)]
    for p in procs:
        p.start()
    bests = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sum(bests) / len(bests)


def measure(case: str, repeats: int) -> dict:
    whole = shape_of(case)
    half = whole._replace(batch=whole.batch // 2)
    s = {(b, n): step_seconds(sh, n, repeats) for b, sh in (("whole", whole), ("half", half))
         for n in (1, 2)}
    busy = step_seconds_both_busy(half, repeats)
    return {"case": case, "shape": whole._asdict(),
            "whole_1_thread_s": s["whole", 1], "whole_2_threads_s": s["whole", 2],
            "half_1_thread_s": s["half", 1], "half_2_threads_s": s["half", 2],
            "half_1_thread_both_busy_s": busy,
            "two_thread_speedup": s["whole", 1] / s["whole", 2],
            "bound": s["whole", 2] / s["half", 1],
            "bound_both_busy": s["whole", 2] / busy}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", action="append", choices=sorted(CASES),
                   help="tiny or wide (repeatable; default both)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    results = [measure(c, args.repeats) for c in args.case or ["tiny", "wide"]]
    if args.format == "json":
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'case':<6} {'batch':>5} {'1 thread s':>11} {'2 threads s':>12} {'2 vs 1':>7} "
          f"{'half, 1 thread s':>17} {'bound':>6} {'half, both busy s':>18} {'bound, busy':>12}")
    for r in results:
        print(f"{r['case']:<6} {r['shape']['batch']:>5} {r['whole_1_thread_s']:>11.4f} "
              f"{r['whole_2_threads_s']:>12.4f} {r['two_thread_speedup']:>6.2f}x "
              f"{r['half_1_thread_s']:>17.4f} {r['bound']:>5.2f}x "
              f"{r['half_1_thread_both_busy_s']:>18.4f} {r['bound_both_busy']:>11.2f}x")
    print("bound = one process's step on 2 threads / one rank's (half the batch, 1 thread, the other "
          "core idle); bound, busy = the same with two such steps running at once, as two ranks "
          "run: what 2 ranks gain with a free allreduce")
    return 0


if __name__ == "__main__":
    sys.exit(main())
