"""What sampling one token costs, by sampler setting: microseconds a call of sample_next.

    python bench/sampling.py [RUN] [--vocab V] [--calls N] [--rounds R] [--format json]

A server samples every sequence of every decode step, so at 4 bits (a GPT-2 step of about 2 ms)
a sampler that takes milliseconds is most of a token. The logits: RUN's next-token logits after
a few random prompt tokens (e.g. out/gpt2-124m), or, without RUN, --vocab (default 50,257: GPT-2's)
standard normal logits times 3. Rows: greedy (temperature 0), temperature 1, top-k 40, top-p 0.9
and 0.95 at temperature 0.8, and top-p 0.95 done the way it was before nucleus_dropped (a stable
sort of every probability; minigpt/sampling.py), for comparison. Best of --rounds rounds of
--calls calls each.
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from minigpt import sampling
from minigpt.units import rows_text

SETTINGS = (  # (name, temperature, top_k, top_p)
    ("greedy", 0.0, None, None),
    ("temperature 1", 1.0, None, None),
    ("top-k 40", 1.0, 40, None),
    ("top-p 0.9, t 0.8", 0.8, None, 0.9),
    ("top-p 0.95, t 0.8", 0.8, None, 0.95),
)


def _full_sort_dropped(p, top_p):
    """top-p's dropped ids as sample_next found them before: a stable sort of all of p."""
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    dropped = np.zeros(p.size, dtype=bool)
    dropped[order[before >= top_p]] = True
    return dropped


def logits_of(args) -> np.ndarray:
    if args.run is None:
        return (np.random.default_rng(0).standard_normal(args.vocab) * 3).astype(np.float32)
    import minigpt

    model = minigpt.load(args.run)
    prompt = np.random.default_rng(0).integers(0, model.gpt.cfg.vocab_size, size=8)
    return np.asarray(model.gpt.logits(prompt[None], last_only=True)[0, -1], dtype=np.float32)


def measure(args) -> list:
    logits = logits_of(args)
    rng = np.random.default_rng(1)

    def timed(temperature, top_k, top_p) -> float:
        best = float("inf")
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                sampling.sample_next(logits, temperature, top_k, top_p, rng)
            best = min(best, (time.perf_counter() - t0) / args.calls)
        return best

    rows = [{"setting": name, "us_per_call": 1e6 * timed(t, k, p)} for name, t, k, p in SETTINGS]
    kept = sampling.nucleus_dropped
    sampling.nucleus_dropped = _full_sort_dropped
    try:
        rows.append({"setting": "top-p 0.95, t 0.8, full sort", "us_per_call": 1e6 * timed(0.8, None, 0.95)})
    finally:
        sampling.nucleus_dropped = kept
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=None, help="a run folder whose logits to sample (default: random)")
    ap.add_argument("--vocab", type=int, default=50257, help="random logits' count without RUN (default 50257)")
    ap.add_argument("--calls", type=int, default=200, help="calls a round (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the best counts (default 3)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if args.vocab < 2 or args.calls < 1 or args.rounds < 1:
        ap.error("--vocab must be at least 2, --calls and --rounds at least 1")
    rows = measure(args)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    source = args.run or f"{args.vocab} random logits"
    print(f"sample_next on {source}: best of {args.rounds} rounds of {args.calls} calls")
    print("\n".join(rows_text(("setting", "us a call"), [(r["setting"], f"{r['us_per_call']:.1f}") for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
