"""minigpt's training step under different kernels and thread settings, interleaved: which wins.

    python bench/train_step.py [--shape tiny|baby|gpt2] [--rounds 7] [--steps N]
                               [--variants numpy,fused,fused-2threads,...] [--format table|json]

Each variant runs in its own worker process (so thread settings taken at start-up apply), all
workers start, warm up (Numba's kernels compile or load from its cache), then take turns: one
round of --steps steps each, the order rotating every round, so a neighbour's load hits every
variant alike. A row: the median ms per step over the rounds, its ratio to the first variant's
(the median of the paired rounds' ratios, > 1: faster), and the metered seconds of the step's
elementwise passes and matrix products. The variants:

  numpy            NumPy's passes (kernels.use("numpy")), BLAS on every core
  fused            the fused Numba kernels (minigpt/kernels/fused.py) as minigpt runs them: one
                   thread unless NUMBA_NUM_THREADS is set
  fused-2threads   the fused kernels on two threads (NUMBA_NUM_THREADS=2)
  fused-active     the fused kernels, OpenMP threads spinning when idle (OMP_WAIT_POLICY=active;
                   minigpt sets passive unless the variable is set)
  fused-workqueue  the fused kernels on Numba's own thread pool (NUMBA_THREADING_LAYER=workqueue)
  numpy-blas1      NumPy's passes, BLAS on one thread (OPENBLAS_NUM_THREADS=1)
  fused-blas1      the fused kernels, BLAS on one thread
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: (kernels path, environment)
    "numpy": ("numpy", {}),
    "fused": ("numba", {}),
    "fused-2threads": ("numba", {"NUMBA_NUM_THREADS": "2"}),
    "fused-active": ("numba", {"OMP_WAIT_POLICY": "active"}),
    "fused-workqueue": ("numba", {"NUMBA_THREADING_LAYER": "workqueue"}),
    "numpy-blas1": ("numpy", {"OPENBLAS_NUM_THREADS": "1"}),
    "fused-blas1": ("numba", {"OPENBLAS_NUM_THREADS": "1"}),
}
SHAPES = {"tiny": (64, 64, 10), "baby": (16, 256, 3), "gpt2": (1, 256, 1)}  # batch, seq, steps


def model_config(shape: str):
    from minigpt import config
    from minigpt.config import ModelConfig

    if shape == "baby":
        return ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256)
    if shape == "gpt2":
        return ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    return config.load(ROOT / "configs" / "tiny.toml").model


def worker(spec: dict) -> None:
    """Build the model, warm up, then run rounds on request (JSON lines on stdin and stdout)."""
    import numpy as np

    from minigpt import backend, config, kernels
    from minigpt.counting.meter import METER
    from minigpt.nn.model import GPT
    from minigpt.nn.params import FlatBuffer, init
    from minigpt.train.optim import AdamW
    from minigpt.train.trainer import training_step

    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    backend.keep_freed_memory()
    kernels.use(spec["kernels"])
    t = config.load(ROOT / "configs" / "tiny.toml").train
    cfg, B, T = model_config(spec["shape"]), spec["batch"], spec["seq"]
    model = GPT(cfg, init(cfg, np.random.default_rng(1337)))
    model.grads = FlatBuffer(cfg)
    opt = AdamW(model.params, t.beta1, t.beta2, t.eps, t.weight_decay)
    rng = np.random.default_rng(1337)
    x, y = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))
    loss = training_step(model, opt, [(x, y)], t.min_lr, t.grad_clip)
    training_step(model, opt, [(x, y)], t.min_lr, t.grad_clip)
    out.write(json.dumps({"loss": loss}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "run" not in cmd:
            break
        METER.reset()
        t0 = time.perf_counter()
        for _ in range(cmd["run"]):
            training_step(model, opt, [(x, y)], t.min_lr, t.grad_clip)
        seconds = time.perf_counter() - t0
        matmul = sum(r.seconds for k, r in METER.records.items() if k.kind == "matmul")
        other = sum(r.seconds for k, r in METER.records.items() if k.kind != "matmul")
        out.write(json.dumps({"seconds": seconds, "matmul": matmul, "elementwise": other}) + "\n")


def start(name: str, spec: dict) -> subprocess.Popen:
    path, env = VARIANTS[name]
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps({**spec, "kernels": path})],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, **env})
    return proc


def ask(proc, cmd: dict) -> dict:
    if cmd is not None:
        proc.stdin.write(json.dumps(cmd) + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker died (exit {proc.wait()})")
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, help="steps per round (default: tiny 10, baby 3, gpt2 1)")
    ap.add_argument("--variants", default="numpy,fused,fused-2threads,fused-active")
    ap.add_argument("--format", default="table", choices=("table", "json"))
    args = ap.parse_args()
    names = args.variants.split(",")
    if set(names) - set(VARIANTS):
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    B, T, steps = SHAPES[args.shape]
    n = args.steps or steps
    spec = {"shape": args.shape, "batch": B, "seq": T}
    procs = {name: start(name, spec) for name in names}
    try:
        losses = {name: ask(p, None)["loss"] for name, p in procs.items()}
        rounds = {name: [] for name in names}
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                time.sleep(0.25)
                rounds[name].append(ask(procs[name], {"run": n}))
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for p in procs.values():
            p.stdin.close()
            p.wait()
    first = [x["seconds"] for x in rounds[names[0]]]
    rows = []
    for name in names:
        secs = [x["seconds"] for x in rounds[name]]
        rows.append({
            "variant": name, "ms_per_step": 1e3 * statistics.median(secs) / n,
            "ratio": statistics.median(f / s for f, s in zip(first, secs)),
            "matmul_ms": 1e3 * statistics.median(x["matmul"] for x in rounds[name]) / n,
            "elementwise_ms": 1e3 * statistics.median(x["elementwise"] for x in rounds[name]) / n,
            "spread": (max(secs) - min(secs)) / statistics.median(secs),
            "first_loss": losses[name],
        })
    if args.format == "json":
        print(json.dumps({"shape": args.shape, "batch": B, "seq": T, "rows": rows}, indent=1))
        return
    print(f"{args.shape}: batch {B} x {T}, {args.rounds} rounds of {n} steps, load average "
          f"{os.getloadavg()[0]:.2f}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    print(f"{'variant':<16} {'ms/step':>9} {'vs first':>9} {'matmul ms':>10} {'elementwise ms':>15} "
          f"{'spread':>7} {'first loss':>11}")
    for r in rows:
        print(f"{r['variant']:<16} {r['ms_per_step']:>9.1f} {r['ratio']:>9.2f} {r['matmul_ms']:>10.1f} "
              f"{r['elementwise_ms']:>15.1f} {100 * r['spread']:>6.0f}% {r['first_loss']:>11.6f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        main()
