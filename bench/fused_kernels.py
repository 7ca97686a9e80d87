"""Each fused kernel against the NumPy passes it replaces, at a training step's shapes.

    python bench/fused_kernels.py [--shape tiny|baby|gpt2] [--repeats 30] [--format table|json]

The layer functions are called as a training step calls them (minigpt.nn.layers, under the meter),
once on NumPy's path and once on the fused one (kernels.use), alternating call by call; a row is
the best of --repeats calls each (the best is what the code costs; a busy machine only adds to it),
on one Numba thread and on all of them. "numpy" includes what the fused kernel folds in: the bias
add before the GELU, the bias gradient after it, the residual add before ln_2 and the residual
gradient after a LayerNorm's backward. Bytes: what each path's records say it moved.
"""

import argparse
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt import kernels
from minigpt.counting.meter import METER
from minigpt.nn import layers as nn

SHAPES = {"tiny": (64, 64, 128, 2, 256), "baby": (16, 256, 384, 6, 256), "gpt2": (1, 256, 768, 12, 50257)}


def cases(B, T, C, H, V, rng):
    """{name: function(path) running that kernel's work once on the current path}."""
    N = B * T
    f32 = np.float32
    x, a = rng.normal(0, 1, (N, C)).astype(f32), rng.normal(0, 1, (N, C)).astype(f32)
    w, b = rng.normal(1, 0.1, C).astype(f32), rng.normal(0, 0.1, C).astype(f32)
    h, b4 = rng.normal(0, 1, (N, 4 * C)).astype(f32), rng.normal(0, 0.1, 4 * C).astype(f32)
    scores = rng.normal(0, 1, (B, H, T, T)).astype(f32)
    logits, targets = rng.normal(0, 1, (B, T, V)).astype(f32), rng.integers(0, V, (B, T))
    dw, db, db4 = np.zeros(C, f32), np.zeros(C, f32), np.zeros(4 * C, f32)
    scale = 1 / math.sqrt(C // H)

    def layernorm():
        out, cache = nn.layernorm_forward(x, w, b)
        nn.layernorm_backward(out, cache, dw, db)

    def residual_layernorm():
        if nn.fused():
            stream, out, cache = nn.residual_layernorm_forward(x, a.copy(), w, b)
            nn.layernorm_backward(out, cache, dw, db, into=stream)
        else:
            stream = nn.residual_forward(x, a.copy())
            out, cache = nn.layernorm_forward(stream, w, b)
            nn.residual_backward(stream, nn.layernorm_backward(out, cache, dw, db))

    def bias_gelu():
        if nn.fused():
            out, cache = nn.bias_gelu_forward(h, b4)
            nn.bias_gelu_backward(out, cache, db4)
        else:
            pre = h + b4  # linear_forward's bias add, on the product
            out, cache = nn.gelu_forward(pre)
            d = nn.gelu_backward(out, cache)
            np.add(db4, d.sum(axis=0), out=db4)  # linear_backward's bias gradient

    def softmax():
        att = nn.causal_softmax_forward(scores.copy(), scale)
        nn.causal_softmax_backward(att.copy(), att, scale)

    def cross_entropy():
        _, cache = nn.cross_entropy_forward(logits, targets)
        nn.cross_entropy_backward(cache)

    return {"layernorm fwd+bwd": layernorm, "residual + ln_2 fwd+bwd": residual_layernorm,
            "bias + gelu fwd+bwd": bias_gelu, "causal softmax fwd+bwd": softmax,
            "cross-entropy fwd+bwd": cross_entropy}


def timed(fn, path: str, store: dict) -> None:
    """One call of fn on `path`: its seconds appended to store['s'], the bytes its records moved."""
    kernels.use(path)
    METER.reset()
    t0 = time.perf_counter()
    fn()
    store.setdefault("s", []).append(time.perf_counter() - t0)
    store["bytes"] = sum(r.bytes_read + r.bytes_written for r in METER.records.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--format", default="table", choices=("table", "json"))
    args = ap.parse_args()
    if not kernels.AVAILABLE:
        sys.exit("bench/fused_kernels.py: Numba is not installed")
    import numba

    B, T, C, H, V = SHAPES[args.shape]
    rows = []
    all_threads = numba.config.NUMBA_NUM_THREADS
    for name, fn in cases(B, T, C, H, V, np.random.default_rng(0)).items():
        row = {"kernel": name}
        for threads in sorted({1, all_threads}):
            numba.set_num_threads(threads)
            runs = {"numpy": {}, "numba": {}}
            for path in runs:  # compile and warm up
                timed(fn, path, {})
            for _ in range(args.repeats):
                for path, store in runs.items():
                    timed(fn, path, store)
            row["numpy_ms"] = 1e3 * min(runs["numpy"]["s"])
            row[f"fused_ms_{threads}_threads"] = 1e3 * min(runs["numba"]["s"])
            row["numpy_bytes"], row["fused_bytes"] = runs["numpy"]["bytes"], runs["numba"]["bytes"]
        rows.append(row)
    if args.format == "json":
        print(json.dumps({"shape": args.shape, "batch": B, "seq": T, "rows": rows}, indent=1))
        return
    print(f"{args.shape}: B {B}, T {T}, C {C}, H {H}, V {V}; best of {args.repeats} calls each, "
          f"alternating; load average {os.getloadavg()[0]:.2f}; Numba threads 1 and {all_threads}")
    keys = [k for k in rows[0] if k.startswith("fused_ms")]
    print(f"{'kernel':<26} {'numpy ms':>9} " + " ".join(f"{k[9:]:>14}" for k in keys)
          + f" {'speed-up':>9} {'numpy MB':>9} {'fused MB':>9}")
    for r in rows:
        fastest = min(r[k] for k in keys)
        print(f"{r['kernel']:<26} {r['numpy_ms']:>9.3f} " + " ".join(f"{r[k]:>14.3f}" for k in keys)
              + f" {r['numpy_ms'] / fastest:>8.2f}x {r['numpy_bytes'] / 1e6:>9.2f} {r['fused_bytes'] / 1e6:>9.2f}")


if __name__ == "__main__":
    main()
