"""Where a training step's gap to PyTorch comes from: each layer kernel, ours against PyTorch's.

    python bench/kernels.py [--shapes tiny,baby] [--reps 15] [--json PATH]

bench/compare_torch.py times whole training steps; this script times their pieces, at the same two
shapes (tiny.toml's, and nanoGPT's "baby GPT" at batch 16), so the step's gap can be read off
kernel by kernel. For every kernel a row gives the median time of one call in each framework, their
ratio, and the time per training step (one call's time x the calls a step makes).

What is compared. Ours: the layer functions of minigpt/nn/layers.py, metered, exactly as a step
calls them (strided head views, in-place backward passes). PyTorch: the same work as its eager
model (bench/_torch_gpt.py) does it: F.linear (one addmm with the bias), F.layer_norm, F.gelu
(tanh), the eager attention path (matmul, scale, masked_fill, softmax, matmul), and each backward
through autograd (a fresh graph per call, built outside the timed region, .grad set to None first
as zero_grad does). Inputs are random float32 of the step's shapes; every call gets fresh copies,
made outside the timed region, of whatever the kernel writes over.

The optimizer, embedding, LM head and loss are left out (a few percent of a step; compare_torch's
meter breakdown has them), so the kernels' per-step sum is a little under a whole step.

How it is measured. One process; the two frameworks take turns round by round with a pause
between (so the other's idle BLAS or OpenMP threads have stopped spinning), both on the same
number of threads (numpy's BLAS count, given to torch.set_num_threads). Each row is the median
over all calls of all rounds.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_torch import PAUSE_S, blas_threads, header, matmul_peak, shape_config

from minigpt import backend
from minigpt.counting.meter import matmul
from minigpt.nn import layers as nn

SEED = 1337


class Shape:
    """A training step's sizes: batch B, context T, width C, heads H, layers L."""

    def __init__(self, name: str, batch: int | None):
        cfg, B, T = shape_config(name)
        self.name, self.B, self.T = name, batch or B, T
        self.C, self.H, self.L = cfg.n_embd, cfg.n_head, cfg.n_layer
        self.hs = self.C // self.H


def call(fn, *args, fresh=()):
    """A prepare function: fn on args, the arguments at the positions in `fresh` copied anew for
    each call (the kernel writes over them)."""

    def prepare():
        a = [x.copy() if i in fresh else x for i, x in enumerate(args)]
        return lambda: fn(*a)

    return prepare


def autograd(forward, leaves, grad):
    """A prepare function for a PyTorch backward: clear the leaves' .grad (as zero_grad does),
    build the graph with forward() (untimed), and return its backward from grad."""
    import torch

    def prepare():
        for t in leaves:
            t.grad = None
        y = forward()
        if isinstance(y, tuple):
            return lambda: torch.autograd.backward(y, grad)
        return lambda: y.backward(grad)

    return prepare


def kernels(s: Shape) -> list:
    """(name, calls per training step, ours, torch's) for every kernel; the last two are
    prepare functions (see call and autograd)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(SEED)
    B, T, C, H, hs, L = s.B, s.T, s.C, s.H, s.hs, s.L
    scale = 1.0 / math.sqrt(hs)

    def rand(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def leaf(a):
        return torch.tensor(a, requires_grad=True)

    t = torch.from_numpy  # a tensor sharing the array's memory
    out = []

    # LayerNorm: ln_1 and ln_2 in every block, ln_f once
    x, w, b, d = rand(B, T, C), 1 + 0.1 * rand(C), 0.1 * rand(C), rand(B, T, C)
    _, cache = nn.layernorm_forward(x, w, b)
    lx, lw, lb = leaf(x), leaf(w), leaf(b)
    out += [
        ("layernorm forward", 2 * L + 1, call(nn.layernorm_forward, x, w, b),
         call(F.layer_norm, t(x), (C,), t(w), t(b), 1e-5)),
        ("layernorm backward", 2 * L + 1,
         call(nn.layernorm_backward, d, cache, np.zeros_like(w), np.zeros_like(b), fresh=(0,)),
         autograd(lambda lx=lx, lw=lw, lb=lb: F.layer_norm(lx, (C,), lw, lb, 1e-5), (lx, lw, lb), t(d))),
    ]

    # the four linear layers of a block, forward (bias included) and backward (dx, dW, db)
    for name, c_in, c_out in (("attn.c_attn", C, 3 * C), ("attn.c_proj", C, C),
                              ("mlp.c_fc", C, 4 * C), ("mlp.c_proj", 4 * C, C)):
        x, w, b, d = rand(B, T, c_in), 0.02 * rand(c_in, c_out), 0.1 * rand(c_out), rand(B, T, c_out)
        _, cache = nn.linear_forward(x, w, b)
        lx, lw, lb = leaf(x), leaf(w), leaf(b)
        out += [
            (f"{name} forward", L, call(nn.linear_forward, x, w, b),
             call(lambda x, w, b: F.linear(x, w.t(), b), t(x), t(w), t(b))),
            (f"{name} backward", L,
             call(nn.linear_backward, d, cache, np.zeros_like(w), np.zeros_like(b)),
             autograd(lambda lx=lx, lw=lw, lb=lb: F.linear(lx, lw.t(), lb), (lx, lw, lb), t(d))),
        ]

    # attention: its four products forward and backward, and the causal softmax between them
    qkv = rand(B, T, 3, H, hs)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # (B, H, T, hs) strided views, as the layer makes them
    scores = matmul(q, k.swapaxes(-1, -2))
    att = nn.causal_softmax_forward(scores.copy(), scale)
    dy, datt = rand(B, H, T, hs), rand(B, H, T, T)
    tq, tk, tv = (t(qkv)[:, :, i].transpose(1, 2) for i in range(3))  # the same views in torch
    keep = torch.ones(T, T, dtype=torch.bool).tril()

    def ours_products_forward(y):
        matmul(q, k.swapaxes(-1, -2))
        matmul(att, v, out=y.transpose(0, 2, 1, 3))

    def ours_products_backward(dqkv):
        dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)
        matmul(dy, v.swapaxes(-1, -2))
        matmul(att.swapaxes(-1, -2), dy, out=dv)
        matmul(datt, k, out=dq)
        matmul(datt.swapaxes(-1, -2), q, out=dk)

    def torch_softmax(scores):
        return (scores * scale).masked_fill(~keep, float("-inf")).softmax(-1)

    lqkv, latt, lscores = leaf(qkv), leaf(att), leaf(scores)

    def torch_products():  # into q, k, v as views of one qkv tensor, as its model does
        lq, lk, lv = (lqkv[:, :, i].transpose(1, 2) for i in range(3))
        return lq @ lk.transpose(-2, -1), latt @ lv

    out += [
        ("attention products forward (2)", L,
         call(ours_products_forward, np.empty((B, T, H, hs), np.float32)),
         call(lambda: (tq @ tk.transpose(-2, -1), t(att) @ tv))),
        ("causal softmax forward", L, call(nn.causal_softmax_forward, scores, scale, fresh=(0,)),
         call(torch_softmax, t(scores))),
        ("attention products backward (4)", L,
         call(ours_products_backward, np.empty((B, T, 3, H, hs), np.float32)),
         autograd(torch_products, (lqkv, latt), (t(datt), t(dy)))),
        ("causal softmax backward", L, call(nn.causal_softmax_backward, datt, att, scale, fresh=(0,)),
         autograd(lambda: torch_softmax(lscores), (lscores,), t(datt))),
    ]

    # GELU on the MLP's 4C-wide hidden layer
    h, d = rand(B, T, 4 * C), rand(B, T, 4 * C)
    _, cache = nn.gelu_forward(h)
    lh = leaf(h)
    out += [
        ("gelu forward", L, call(nn.gelu_forward, h), call(lambda h: F.gelu(h, approximate="tanh"), t(h))),
        ("gelu backward", L, call(nn.gelu_backward, d, cache, fresh=(0,)),
         autograd(lambda: F.gelu(lh, approximate="tanh"), (lh,), t(d))),
    ]

    # residual adds: two a block forward, two backward (ours add in place, as a step does)
    x, r = rand(B, T, C), rand(B, T, C)
    out.append(("residual add", 4 * L, call(nn.residual_forward, x, r, fresh=(1,)),
                call(torch.add, t(x), t(r))))
    return out


def time_calls(prepare, reps: int) -> list:
    """Seconds of reps calls, each on inputs prepare() made fresh (untimed)."""
    seconds = []
    for _ in range(reps):
        call = prepare()
        t0 = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - t0)
    return seconds


def measure(shape: Shape, rounds: int, reps: int, warmup: int) -> list:
    """Rows (kernel, calls per step, ours seconds, torch seconds): medians over rounds x reps."""
    rows = kernels(shape)
    times = {(name, fw): [] for name, *_ in rows for fw in ("ours", "torch")}
    for r in range(rounds):
        order = ("ours", "torch") if r % 2 == 0 else ("torch", "ours")
        for fw in order:
            time.sleep(PAUSE_S)
            for name, _, ours, theirs in rows:
                prepare = ours if fw == "ours" else theirs
                time_calls(prepare, warmup)
                times[name, fw] += time_calls(prepare, reps)
        print(f"  {shape.name}: round {r + 1}/{rounds} done", file=sys.stderr)
    return [(name, n, statistics.median(times[name, "ours"]), statistics.median(times[name, "torch"]))
            for name, n, *_ in rows]


def table(shape: Shape, rows: list) -> str:
    lines = [f"{shape.name}: B={shape.B} T={shape.T} C={shape.C} heads={shape.H} layers={shape.L}",
             (f"{'kernel':34s} {'calls/step':>10s} {'ours ms':>9s} {'torch ms':>9s} {'ours/torch':>10s}"
              f" {'ours ms/step':>12s} {'torch ms/step':>13s}")]
    total_ours = total_torch = 0.0
    for name, n, ours, theirs in rows:
        total_ours, total_torch = total_ours + n * ours, total_torch + n * theirs
        lines.append(f"{name:34s} {n:10d} {ours * 1e3:9.3f} {theirs * 1e3:9.3f} {ours / theirs:10.2f}"
                     f" {n * ours * 1e3:12.1f} {n * theirs * 1e3:13.1f}")
    lines.append(f"{'these kernels in one step':34s} {'':10s} {'':9s} {'':9s} "
                 f"{total_ours / total_torch:10.2f} {total_ours * 1e3:12.1f} {total_torch * 1e3:13.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,baby", help="comma-separated: tiny, baby")
    ap.add_argument("--baby-batch", type=int, default=16, help="batch of the baby shape")
    ap.add_argument("--rounds", type=int, default=4, help="rounds, the frameworks alternating")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per kernel per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per kernel per round")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit('bench/kernels.py needs PyTorch: pip install -e ".[compare]"')
    backend.keep_freed_memory()
    threads, blas = blas_threads()
    torch.set_num_threads(threads)
    peak, note, _ = matmul_peak("profile")
    print(header(threads, blas, peak, note))
    results = {}
    for name in args.shapes.split(","):
        if name not in ("tiny", "baby"):
            sys.exit(f"--shapes: unknown shape {name!r} (tiny, baby)")
        shape = Shape(name, args.baby_batch if name == "baby" else None)
        rows = measure(shape, args.rounds, args.reps, args.warmup)
        results[name] = rows
        print(table(shape, rows))
    print("ms: median of one call; ms/step: that x the calls a training step makes; "
          "ours/torch > 1: ours slower")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
