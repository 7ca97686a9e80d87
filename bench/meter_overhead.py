"""What the meter costs: training steps at configs/tiny.toml's shape with the meter on and off.

    python bench/meter_overhead.py [--steps 20] [--rounds 5]

Alternates rounds of steps with METER.enabled True and False (so drift in the machine's speed hits
both alike) and prints a table: median seconds per step each way and the overhead. With the meter
off, each op still enters its `with METER.op(...)` block; the last line prices that residue with a
micro-benchmark, so the total bookkeeping cost is on the table too.
"""

import argparse
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt import backend, config
from minigpt.counting.meter import METER
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    ap.add_argument("--steps", type=int, default=20, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="rounds each way")
    args = ap.parse_args()

    backend.keep_freed_memory()
    cfg = config.load(args.config)
    m, B, T = cfg.model, cfg.train.batch_size, cfg.model.block_size
    model = GPT(m, init(m, np.random.default_rng(0)))
    model.grads = FlatBuffer(m)
    opt = AdamW(model.params)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, m.vocab_size, (B, T)), rng.integers(0, m.vocab_size, (B, T))

    def step():
        training_step(model, opt, [(idx, targets)], lr=1e-4)

    for _ in range(3):
        step()
    METER.reset()
    step()
    ops_per_step = sum(r.calls for r in METER.records.values())
    times = {True: [], False: []}
    for _ in range(args.rounds):
        for enabled in (True, False):
            METER.enabled = enabled
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[enabled].append((time.perf_counter() - t0) / args.steps)
    METER.enabled = True

    t0 = time.perf_counter()
    n = 100_000
    METER.enabled = False
    for _ in range(n):
        with METER.op(kind="bias", op="add"):
            pass
    METER.enabled = True
    residue = (time.perf_counter() - t0) / n * ops_per_step

    on, off = statistics.median(times[True]), statistics.median(times[False])
    print(f"meter overhead, {args.config}: batch {B} x {T}, {ops_per_step} metered ops per step, "
          f"{args.rounds} x {args.steps} steps each way")
    print(f"{'meter':<28} {'s/step':>9}")
    print(f"{'on':<28} {on:9.4f}")
    print(f"{'off':<28} {off:9.4f}")
    print(f"{'overhead (on - off) / off':<28} {100 * (on - off) / off:8.2f}%")
    print(f"{'residue with meter off':<28} {1000 * residue:8.3f} ms/step "
          f"({100 * residue / off:.3f}% of a step)")


if __name__ == "__main__":
    main()
