"""minigpt against PyTorch on this CPU: training-step and generation throughput, peak memory, MFU.

    python bench/compare_torch.py [--shapes tiny,baby,gpt2] [--steps N] [--rounds 7]
                                  [--baby-batch 16] [--gpt2-batch 1] [--gpt2-seq 256]
                                  [--variants fused,numpy,eager,sdpa] [--gen-tokens 256]
                                  [--peak profile|measure] [--quick] [--json PATH]

The defaults take 3 to 4 minutes on our 2-core machine; --quick (a smoke run) under a minute.

What runs. The identical GPT-2 in both frameworks: the same config, the same initial weights (ours,
copied into PyTorch leaf tensors; bench/_torch_gpt.py is the PyTorch model), the same batch of
random token ids every step (data loading is left out of both), float32.
- train, shape "tiny": configs/tiny.toml (4 layers, 2 heads, 128 wide, batch 64 x block 64);
- train, shape "baby": nanoGPT's character-level "baby GPT" (6 layers, 6 heads, 384 wide, context
  256), vocab 256, dropout 0; batch --baby-batch, 16 by default: 4,096 tokens a step, as tiny's
  (nanoGPT's 64 would take about 8 s a step here).
- train, shape "gpt2": GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50,257, 1,024 positions),
  batch --gpt2-batch x --gpt2-seq tokens (1 x 256 by default: a step of a few seconds here); not
  in the default --shapes (each of its workers holds about 2 GiB).
  One step is forward, backward, gradient clipping to norm 1 and AdamW (betas and eps and weight
  decay from tiny.toml, decay on matrices only), at a constant learning rate. Ours is the
  trainer's train_step (GPT.loss, GPT.backward, clip_grad_norm, AdamW.step under the meter's
  phases, after backend.keep_freed_memory()); PyTorch's is zero_grad, loss.backward(),
  clip_grad_norm_, torch.optim.AdamW.step().
- generate: 256 new tokens, greedy, batch 1, KV-cached, from the tiny model and a fixed prompt;
  ours is minigpt.sampling.generate, PyTorch's is the same loop over its own preallocated KV cache.
minigpt runs twice: "fused" (minigpt/kernels/fused.py's Numba kernels for the elementwise passes,
the default where Numba is installed) and "numpy" (NumPy's passes, kernels.use("numpy")); "ours"
in the ratio column is the fused one. PyTorch runs twice: "eager" attention (matmul, masked_fill,
softmax, matmul: the same work as ours) and "sdpa" (F.scaled_dot_product_attention, PyTorch's fused
fast path). --variants picks which of the four run.

How it is measured. Every (framework, task) runs in its own fresh worker process, so its peak
resident set (VmHWM) belongs to that framework alone. The workers of one task start one after
another, warm up, and then wait; the parent hands out rounds in turn (the order rotating each
round, with a short pause between hand-offs so the previous worker's threads go idle), so drift in
the machine's speed, or a neighbour's load, hits every framework alike. Each row is the median
over rounds; "ours/torch" is the median of the per-round ratios (paired rounds); "spread" is the
range of the rounds as a share of the median. Both frameworks use the same number of threads: the
number numpy's BLAS uses, given to torch.set_num_threads. MFU is the cost model's FLOPs
(minigpt.counting.closed_form: predict_training_step, or the prefill and decode steps of the generation)
over the time, against calibrate's measured float32 matmul peak: local_peak(), which reads the
local-cpu profile `minigpt calibrate` saved (--peak measure: calibrate's measurement, taken now).
"""

import argparse
import ctypes
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minigpt import config
from minigpt.config import ModelConfig

SEED = 1337
PROMPT = list(b"def generate(model, prompt):\n")  # byte ids
BABY = ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256, dropout=0.0)
GPT2 = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0)
VARIANTS = {"fused": ("ours", "numba"), "numpy": ("ours", "numpy"), "eager": ("torch", "eager"),
            "sdpa": ("torch", "sdpa")}  # name: (framework, minigpt's kernels or torch's attention)
LABELS = {"numba": "minigpt (fused)", "numpy": "minigpt (numpy)", "eager": "torch eager",
          "sdpa": "torch sdpa"}
PAUSE_S = 0.25  # between hand-offs: OpenBLAS and OpenMP threads stop spinning well within this


# ----------------------------------------------------------------------------- the machine


def rss_mib(field: str = "VmHWM") -> float:
    """This process's resident set from /proc/self/status (VmHWM: its peak), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource  # ru_maxrss: the peak, in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def blas_threads() -> tuple[int, str]:
    """numpy's OpenBLAS: its thread count and the core kernel it chose, through its C API."""
    with open("/proc/self/maps") as f:
        paths = {line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line}
    for path in sorted(paths):
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_openblas_", "openblas_"):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
                core = getattr(lib, f"{prefix}get_corename{suffix}", None)
                if get is not None:
                    name = "?"
                    if core is not None:
                        core.restype = ctypes.c_char_p
                        name = core().decode()
                    return int(get()), f"OpenBLAS core {name}"
    return len(os.sched_getaffinity(0)), "BLAS not found: threads = available cores"


def matmul_peak(source: str) -> tuple[float, str, str]:
    """MFU's float32 matmul peak, where it came from, and a warning ("" if none).

    source "profile": calibrate's local_peak() (the local-cpu profile, else a quick measurement);
    "measure": calibrate's 2048^3 measurement, taken now. Both figures are shown, since a profile
    measured while the machine was busy reads low (and every MFU then reads high)."""
    from minigpt.hardware.calibrate import local_peak, matmul_flops

    profile, note = local_peak()
    now = matmul_flops("float32", 2048, 5)
    both = f"local_peak() {profile / 1e9:.1f} {note}, measured now {now / 1e9:.1f}"
    if source == "measure":
        return now, f"(measured now; {both})", ""
    warning = ""
    if now > 1.2 * profile:
        warning = (
            f"warning: a float32 matmul runs {now / profile:.1f}x faster now than "
            f"local_peak() says, so every MFU reads high: rerun `minigpt calibrate` on an "
            f"idle machine, or pass --peak measure"
        )
    return profile, f"({both})", warning


def numba_threads() -> str:
    if importlib.util.find_spec("numba") is None:
        return "(Numba not installed)"
    return os.environ.get("NUMBA_NUM_THREADS", "1 (minigpt's default)")


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def header(threads: int, blas: str, peak: float, peak_note: str) -> str:
    """Date, CPU, threads, versions and the BLAS environment variables, in two lines."""
    env = "  ".join(
        f"{k}={os.environ.get(k, '(unset)')}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    )
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return (
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}  {cpu_name()}, "
        f"{len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.2f}  "
        f"threads {threads} (numpy's BLAS; torch.set_num_threads({threads}); NumPy's "
        f"elementwise passes run on one thread, the fused kernels on Numba's {numba_threads()})\n"
        f"numpy {np.__version__} ({blas})  torch {torch_version}  {env}  "
        f"MFU's fp32 matmul peak {peak / 1e9:.1f} GFLOP/s {peak_note}"
    )


# ----------------------------------------------------------------------------- what is timed


def shape_config(shape: str) -> tuple[ModelConfig, int, int]:
    """(model config, batch, sequence length) of a shape, before any --baby-batch."""
    if shape == "baby":
        return BABY, 64, BABY.block_size
    if shape == "gpt2":
        return GPT2, 1, 256
    cfg = config.load(ROOT / "configs" / "tiny.toml")
    return cfg.model, cfg.train.batch_size, cfg.model.block_size


def training_flops(cfg: ModelConfig, B: int, T: int) -> int:
    """Model FLOPs of one training step (forward, backward, clip, AdamW) from the cost model."""
    from minigpt.counting.closed_form import predict_training_step

    return sum(r.flops for r in predict_training_step(cfg, B, T).values())


def generation_flops(cfg: ModelConfig, prompt_len: int, n_new: int) -> int:
    """Model FLOPs of minigpt.sampling.generate's schedule: prefill, decode, rebuild when full."""
    from minigpt.counting.closed_form import predict_decode, predict_forward

    def total(records):
        return sum(r.flops for r in records.values())

    flops, length = total(predict_forward(cfg, 1, prompt_len, "prefill")), prompt_len
    for _ in range(n_new - 1):
        if length == cfg.block_size:
            length = cfg.block_size // 2
            flops += total(predict_forward(cfg, 1, length, "prefill"))
        else:
            flops += total(predict_decode(cfg, 1, length))
            length += 1
    return flops


def ours_task(spec: dict):
    """minigpt's training step (or generation) as (step function, meter breakdown function);
    notes the resident set after the imports in spec["import_rss"]."""
    from minigpt import backend, kernels
    from minigpt.counting.meter import METER
    from minigpt.nn.model import GPT
    from minigpt.nn.params import FlatBuffer, init
    from minigpt.sampling import generate
    from minigpt.train.optim import AdamW
    from minigpt.train.trainer import training_step

    backend.keep_freed_memory()
    kernels.use(spec["attention"])  # "numba" or "numpy"
    spec["import_rss"] = rss_mib("VmRSS")
    t = config.load(ROOT / "configs" / "tiny.toml").train
    cfg, B, T = spec["cfg"], spec["batch"], spec["seq"]
    model = GPT(cfg, init(cfg, np.random.default_rng(SEED)))
    if spec["task"] == "generate":
        gen_tokens = spec["gen_tokens"]
        return lambda: generate(model, PROMPT, gen_tokens, temperature=0).tokens.tolist(), None

    model.grads = FlatBuffer(cfg)
    opt = AdamW(model.params, t.beta1, t.beta2, t.eps, t.weight_decay)
    rng = np.random.default_rng(SEED)
    x, y = rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))

    def step():  # minigpt.train.trainer.Trainer.train_step, less data loading and the schedule
        return training_step(model, opt, [(x, y)], t.min_lr, t.grad_clip)

    def breakdown() -> dict:
        """Seconds by 'phase kind' since the last call (the meter is reset after each)."""
        out = {}
        for k, r in METER.records.items():
            out[f"{k.phase} {k.kind}"] = out.get(f"{k.phase} {k.kind}", 0.0) + r.seconds
        METER.reset()
        return out

    return step, breakdown


def torch_task(spec: dict):
    """PyTorch's training step (or generation), eager or sdpa attention, as (step function,
    None); notes the resident set after the imports in spec["import_rss"]."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import _torch_gpt as tg

    from minigpt.nn.params import init

    torch.set_num_threads(spec["threads"])
    spec["import_rss"] = rss_mib("VmRSS")
    t = config.load(ROOT / "configs" / "tiny.toml").train
    cfg, B, T, path = spec["cfg"], spec["batch"], spec["seq"], spec["attention"]
    P = tg.params_from(init(cfg, np.random.default_rng(SEED)))  # ours, copied; ours then freed
    if spec["task"] == "generate":
        return lambda: tg.generate(P, cfg, PROMPT, spec["gen_tokens"], path), None

    opt = tg.adamw(P, t.min_lr, (t.beta1, t.beta2), t.eps, t.weight_decay)
    params = list(P.values())
    rng = np.random.default_rng(SEED)
    x, y = (torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T))) for _ in range(2))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tg.loss(P, cfg, x, y, path)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        return loss.item()

    return step, None


def worker(spec: dict) -> None:
    """A worker process: set up, warm up, then run timed rounds on request (JSON lines on stdin
    and stdout) until told to stop, and report its peak resident set."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol's own copy of stdout
    os.dup2(2, 1)  # anything else printed goes to stderr
    spec["cfg"] = ModelConfig(**spec["cfg"])
    step, breakdown = (ours_task if spec["framework"] == "ours" else torch_task)(spec)
    check = step()  # the first call: loss before any update, or the generated tokens
    for _ in range(spec["warmup"] - 1):
        step()
    if breakdown is not None:
        breakdown()  # the meter counts the timed rounds only
    out.write(json.dumps({"check": check, "import_rss": spec["import_rss"]}) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "run" not in cmd:
            break
        t0 = time.perf_counter()
        for _ in range(cmd["run"]):
            step()
        seconds = time.perf_counter() - t0
        meter = breakdown() if breakdown else None
        out.write(json.dumps({"seconds": seconds, "meter": meter}) + "\n")
    out.write(json.dumps({"peak_rss": rss_mib()}) + "\n")


# ----------------------------------------------------------------------------- the parent


class Worker:
    """A worker process seen from the parent."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.ready = self.receive()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec['label']} died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, cmd: dict) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def close(self) -> None:
        """End of input: a worker still waiting for rounds stops; one that hangs is killed."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_task(task: str, shape: str, cfg, B: int, T: int, n: int, args, threads: int) -> list:
    """Start the workers of one task (one per --variants) in turn, alternate --rounds rounds of n
    calls among them, and return one result row per framework."""
    workers = []
    try:
        for framework, attention in (VARIANTS[v] for v in args.variants.split(",")):
            spec = {
                "task": task,
                "framework": framework,
                "attention": attention,
                "label": LABELS[attention],
                "cfg": vars(cfg),
                "batch": B,
                "seq": T,
                "threads": threads,
                "warmup": args.warmup,
                "gen_tokens": args.gen_tokens,
            }
            workers.append(Worker(spec))
        seconds = {w.spec["label"]: [] for w in workers}
        meters = {w.spec["label"]: [] for w in workers}  # minigpt's seconds by kind, per round
        for r in range(args.rounds):
            k = r % len(workers)
            for w in workers[k:] + workers[:k]:
                time.sleep(PAUSE_S)
                reply = w.ask({"run": n})
                seconds[w.spec["label"]].append(reply["seconds"])
                if reply["meter"]:
                    meters[w.spec["label"]].append(reply["meter"])
            print(f"  {shape} {task}: round {r + 1}/{args.rounds} done", file=sys.stderr)
        final = [w.ask({"stop": True}) for w in workers]
    finally:
        for w in workers:
            w.close()
    tokens = n * (B * T if task == "train" else args.gen_tokens)
    ours = [tokens / s for s in seconds[workers[0].spec["label"]]]  # the first variant's
    rows = []
    for w, end in zip(workers, final):
        tps = [tokens / s for s in seconds[w.spec["label"]]]
        mine = meters[w.spec["label"]]
        rows.append(
            {
                "shape": shape,
                "task": task,
                "framework": w.spec["label"],
                "batch": f"{B} x {T}" if task == "train" else f"1, {args.gen_tokens} new",
                "tokens_per_s": statistics.median(tps),
                "spread": (max(tps) - min(tps)) / statistics.median(tps),
                "ratio": statistics.median(o / x for o, x in zip(ours, tps)),
                "ms_per_step": 1e3 * statistics.median(seconds[w.spec["label"]]) / n,
                "round_seconds": seconds[w.spec["label"]],
                "calls_per_round": n,
                "import_rss_mib": w.ready["import_rss"],
                "peak_rss_mib": end["peak_rss"],
                "check": w.ready["check"],
                "meter_s_per_call": {
                    k: statistics.median(m.get(k, 0.0) for m in mine) / n for k in mine[0]
                }
                if mine
                else None,
            }
        )
    return rows


def table(rows: list) -> str:
    """The results, one line per row."""
    cols = [
        "shape",
        "framework",
        "batch",
        "ms/call",
        "tokens/s",
        "spread",
        "ours/torch",
        "import MiB",
        "peak RSS MiB",
        "MFU",
    ]
    lines = [f"{cols[0]:<9} {cols[1]:<16} {cols[2]:<12} " + " ".join(f"{c:>12}" for c in cols[3:])]
    first = {}
    for r in rows:
        first.setdefault(r["shape"], r["framework"])
        ratio = "" if r["framework"] == first[r["shape"]] else f"{r['ratio']:.2f}"
        lines.append(
            f"{r['shape']:<9} {r['framework']:<16} {r['batch']:<12} "
            f"{r['ms_per_step']:>12,.1f} {r['tokens_per_s']:>12,.0f} {100 * r['spread']:>11.0f}% {ratio:>12} "
            f"{r['import_rss_mib']:>12.0f} {r['peak_rss_mib']:>12.0f} "
            f"{100 * r['mfu']:>11.1f}%"
        )
    return "\n".join(lines)


def notes(rows: list) -> list:
    """Checks (same loss, same tokens) and where our time goes, as printable lines."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        if group[0]["task"] == "train":
            losses = ", ".join(f"{r['framework']} {r['check']:.6f}" for r in group)
            out.append(f"{shape}: first-step loss (same weights, same batch): {losses}")
            for r in group:
                if not r["meter_s_per_call"]:
                    continue
                kinds = sorted(r["meter_s_per_call"].items(), key=lambda kv: -kv[1])
                out.append(
                    f"{shape}: {r['framework']}'s metered seconds per step (share of the step): "
                    + ", ".join(f"{k} {v:.3f} ({100 * v / r['s_per_call']:.0f}%)" for k, v in kinds[:10])
                    + f"; of {r['s_per_call']:.3f} s a step (medians of the rounds)"
                )
        else:
            ref = group[0]["check"]
            same = ", ".join(
                f"{r['framework']} {sum(a == b for a, b in zip(ref, r['check']))}/{len(ref)}"
                for r in group[1:]
            )
            out.append(f"{shape}: greedy tokens equal to minigpt's: {same}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,baby", help="training shapes: tiny, baby, gpt2")
    ap.add_argument("--steps", type=int, help="timed steps per round (default: tiny 10, baby 3, gpt2 1)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per framework")
    ap.add_argument("--baby-batch", type=int, default=16, help="batch of the baby shape")
    ap.add_argument("--gpt2-batch", type=int, default=1, help="batch of the gpt2 shape")
    ap.add_argument("--gpt2-seq", type=int, default=256, help="sequence length of the gpt2 shape")
    ap.add_argument("--variants", default="fused,numpy,eager,sdpa",
                    help="which run, the first the others are compared with: fused, numpy, eager, sdpa")
    ap.add_argument("--gen-tokens", type=int, default=256, help="tokens to generate; 0: skip")
    ap.add_argument("--gen-runs", type=int, default=2, help="generations per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    ap.add_argument(
        "--peak",
        choices=("profile", "measure"),
        default="profile",
        help="MFU's matmul peak: calibrate's local_peak() (the local-cpu profile), "
        "or a measurement now",
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps and rounds")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.quick:
        args.rounds, args.warmup, args.gen_runs = 2, 1, 1
    steps = {"tiny": 10, "baby": 3, "gpt2": 1} if not args.quick else {"tiny": 2, "baby": 1, "gpt2": 1}
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or not variants:
        ap.error(f"--variants: choose from {', '.join(VARIANTS)}")
    shapes = args.shapes.split(",") if args.shapes else []
    if set(shapes) - set(steps):
        ap.error(
            f"--shapes: unknown {', '.join(sorted(set(shapes) - set(steps)))} "
            f"(choose from tiny, baby, gpt2)"
        )

    threads, blas = blas_threads()
    peak, peak_note, warning = matmul_peak(args.peak)
    head = header(threads, blas, peak, peak_note)
    t_start = time.perf_counter()
    print(head, flush=True)
    if warning:
        print(warning, flush=True)

    rows = []
    for shape in shapes:
        cfg, B, T = shape_config(shape)
        B = {"baby": args.baby_batch, "gpt2": args.gpt2_batch}.get(shape, B)
        T = args.gpt2_seq if shape == "gpt2" else T
        n = args.steps or steps[shape]
        for r in run_task("train", shape, cfg, B, T, n, args, threads):
            r["s_per_call"] = B * T / r["tokens_per_s"]
            r["mfu"] = training_flops(cfg, B, T) / r["s_per_call"] / peak
            rows.append(r)
    if args.gen_tokens:
        cfg, _, _ = shape_config("tiny")
        for r in run_task("generate", "tiny-gen", cfg, 1, 1, args.gen_runs, args, threads):
            r["s_per_call"] = args.gen_tokens / r["tokens_per_s"]
            r["mfu"] = generation_flops(cfg, len(PROMPT), args.gen_tokens) / r["s_per_call"] / peak
            rows.append(r)

    elapsed = time.perf_counter() - t_start
    print()
    print(head)
    print(table(rows))
    print(
        "tokens/s: median of the rounds; spread: their range / median; ours/torch: median of the "
        "paired rounds' ratios (> 1: ours faster); MFU: cost-model FLOPs / time / peak above"
    )
    print(
        f"{args.rounds} rounds; steps per round: "
        + ", ".join(f"{s} {args.steps or steps[s]}" for s in shapes)
        + f"; {args.gen_runs} generation(s) per round; {args.warmup} warm-up call(s) each; "
        f"took {elapsed:.0f} s; load average at the end {os.getloadavg()[0]:.2f}"
    )
    if args.gen_tokens:
        print(
            f"tiny-gen: {args.gen_tokens} new tokens after a {len(PROMPT)}-token prompt, greedy, "
            f"batch 1; torch keeps its own preallocated KV cache (L, B, H, block_size, hs) as "
            f"ours does, and both rebuild it from the last {cfg.block_size // 2} tokens when "
            f"it is full (block_size {cfg.block_size})"
        )
    for line in notes(rows) + ([warning] if warning else []):
        print(line)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"header": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
