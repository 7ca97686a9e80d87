"""minigpt on CuPy against PyTorch on the same GPU: training tokens/s, MFU, counts and energy.

    python bench/gpu.py [--out DIR] [--only tiny,gpt2-small-width] [--steps-tiny 100]
                        [--steps-small 20] [--warmup 3] [--min-seconds 2] [--batch-small 8]
                        [--vocab-small 50304] [--budget-s 300] [--dry-run]

bash bench/gpu.sh runs tests/test_backends.py, then this, then train.py and generate.py on the GPU.

What runs. The identical GPT-2 in both frameworks (our initial weights copied into PyTorch leaf
tensors; bench/_torch_gpt.py is the PyTorch model), the same batch of random token ids every
step (data loading left out of both), float32, at two shapes:
- "tiny": configs/tiny.toml (4 layers, 2 heads, 128 wide, context 64, vocab 256), its batch 64;
- "gpt2-small-width": 12 layers, 12 heads, 768 wide, context 1024, vocab 50304 (GPT-2's 50257
  padded to a multiple of 64, as nanoGPT does: GPT-2 small's 124M parameters), batch 8.
One step is forward, backward, clipping to norm 1 and AdamW (tiny.toml's betas, eps and weight
decay, on matrices only) at a constant learning rate. Rows:
- "minigpt cupy": the trainer's step (GPT.loss, GPT.backward, clip_grad_norm, AdamW.step under
  the meter's phases) on CuPy, with the fused kernels of minigpt/nn/cuda_kernels.py;
- "minigpt cupy unfused": the same with those kernels off (the NumPy-style chains on CuPy);
- "torch eager": attention as matmul, masked_fill, softmax, matmul (the same work as ours);
- "torch sdpa": F.scaled_dot_product_attention, PyTorch's fused attention.
TF32 is off everywhere, for a float32 comparison: CUPY_TF32=0 (CuPy's default, set here before
CuPy loads) and torch.backends.cuda.matmul.allow_tf32 = False (PyTorch's default, set here).

How it is measured. After --warmup steps (the first compiles CuPy's kernels), N steps run between
two synchronizations: N is --steps-*, or more where needed to fill --min-seconds, so that NVML's
energy counter (which ticks coarsely) sees a long enough window. tokens/s = N * B * T / seconds.
MFU = the closed form's matmul FLOPs of forward and backward per step (6 N_matmul + 12 L T C per
token, minigpt.counting.closed_form) * steps/s / the profile's dense fp32 peak (the profile is chosen from
the GPU's name: minigpt.hardware.gpu). Counts: the meter's records over the N steps, key by key,
against N * predict_training_step (which tests/test_costs.py proves equal to the CPU's meter);
for tiny, also against one step of ours on the CPU. Energy: NVML's total-energy counter around the
N steps (the GPU board alone), per token, beside two models at the profile's rated power, no PUE:
time x power (measured seconds x watts) and roofline (sum over the predicted records of
max(FLOPs / peak, bytes / bandwidth), x watts). Then --profile-steps more steps of ours under
METER.synchronizing() give seconds by kind (matmul, softmax, gelu, ...).

Fails soft: every row runs on its own; a missing piece (no GPU, no CuPy, no NVML, no profile, an
error) is said in its row and the rest goes on. Results: DIR/gpu_bench.json (everything) and
DIR/gpu_bench.txt (the table, also printed last); DIR is --out, else $OUT, else out/gpu_bench.
--dry-run runs the whole script on this CPU (NumPy and torch CPU), with 2 steps and a small
stand-in for the big shape, against h100-sxm's figures: to check the script, not to measure.
"""

import argparse
import gc
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass

os.environ["CUPY_TF32"] = "0"  # before anything loads CuPy: plain float32 products

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np

from minigpt import backend, config
from minigpt.config import ModelConfig
from minigpt.counting import closed_form as cost_model
from minigpt.counting import tables
from minigpt.counting.meter import METER
from minigpt.hardware import counters, gpu, profiles, roofline
from minigpt.nn import cuda_kernels
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step

SEED = 1337
LR, BETAS, EPS, WEIGHT_DECAY = 6e-4, (0.9, 0.99), 1e-8, 0.1  # tiny.toml's, constant lr
TARGET = 0.7  # the issue's: minigpt cupy tokens/s >= 0.7 x torch eager at gpt2-small-width
ROWS = ("minigpt cupy", "torch eager", "torch sdpa", "minigpt cupy unfused")


@dataclass
class Shape:
    name: str
    cfg: ModelConfig
    batch: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.batch * self.cfg.block_size


def shapes(args) -> list[Shape]:
    tiny = config.load(ROOT / "configs" / "tiny.toml")
    if args.dry_run:  # a stand-in small enough for a CPU
        small, batch = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512), 2
    else:
        small = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                            vocab_size=args.vocab_small)
        batch = args.batch_small
    out = [Shape("tiny", tiny.model, tiny.train.batch_size, args.steps_tiny),
           Shape("gpt2-small-width", small, batch, args.steps_small)]
    return [s for s in out if not args.only or s.name in args.only.split(",")]


# ----------------------------------------------------------------------------- the machine


def machine(dry_run: bool) -> dict:
    """GPU, driver, library versions, TF32 settings and the chosen profile, where found."""
    info = {"dry_run": dry_run, "python": platform.python_version(), "numpy": np.__version__,
            "cupy_tf32": os.environ.get("CUPY_TF32")}
    info["gpu"] = None if dry_run else gpu.gpu_name()
    info["profile"] = "h100-sxm" if dry_run else gpu.profile_for(info["gpu"])
    try:
        info["cupy"] = backend.cupy().__version__
    except ImportError as e:
        info["cupy"] = f"not installed ({e})"
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        info["torch"] = torch.__version__
        info["torch_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        info["torch_cuda"] = torch.cuda.is_available()
    except ImportError as e:
        info["torch"] = f"not installed ({e})"
    return info


def load_profile(name: str | None):
    if name is None:
        return None, "no hardware profile matches this GPU's name (minigpt.hardware.gpu)"
    try:
        return profiles.load_profile(name), ""
    except Exception as e:  # noqa: BLE001 -- fail soft: say why, go on
        return None, f"profile {name}: {e}"


# ----------------------------------------------------------------------------- the closed form


def prediction(s: Shape, profile) -> dict:
    """Per step: FLOPs, matmul FLOPs (forward + backward), bytes, and the roofline."""
    records = cost_model.predict_training_step(s.cfg, s.batch, s.cfg.block_size)
    rows = tables.rows_from_records(records)
    out = {"records": records,
           "flops": sum(r["flops"] for r in rows),
           "matmul_flops": sum(r["flops"] for r in rows
                               if r["kind"] == "matmul" and r["phase"] in ("forward", "backward")),
           "bytes": sum(r["bytes_read"] + r["bytes_written"] for r in rows)}
    if profile is not None:
        try:
            out["roofline_s"] = roofline.roofline_seconds(rows, profile)
            if profile.power_watts is not None:
                out["roofline_j_per_token"] = out["roofline_s"] * profile.power_watts / s.tokens
        except Exception as e:  # noqa: BLE001
            out["roofline_error"] = str(e)
    return out


def compare_counts(records: dict, reference: dict, times: int) -> dict:
    """Measured records against times x reference records, key by key (seconds aside)."""
    fields = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")
    bad = []
    for key in sorted(set(records) | set(reference)):
        got = tuple(getattr(records[key], f) for f in fields) if key in records else None
        want = tuple(times * getattr(reference[key], f) for f in fields) if key in reference else None
        if got != want:
            bad.append({"key": list(key), "measured": got, "expected": want})
    return {"keys": len(reference), "mismatched": len(bad), "first_mismatches": bad[:5],
            "measured_flops_per_step": sum(r.flops for r in records.values()) / times,
            "expected_flops_per_step": sum(r.flops for r in reference.values())}


# ----------------------------------------------------------------------------- timing


def timed(step, n: int, sync) -> dict:
    """n steps between synchronizations, NVML's counter read around them."""
    with counters.measure([counters.NvmlReader()]) as m:
        t0 = time.perf_counter()
        for _ in range(n):
            last = step()
        sync()
        seconds = time.perf_counter() - t0
    return {"steps": n, "seconds": seconds, "last_loss": float(last),
            "joules": m.joules.get("nvml"), "nvml": m.reasons.get("nvml", "measured")}


def warm_up(step, warmup: int, sync) -> tuple[float, float]:
    """Run the warm-up steps: (the first step's loss, seconds of the last warm-up step)."""
    first = float(step())
    sync()
    t0 = time.perf_counter()
    for _ in range(max(1, warmup - 1)):
        step()
    sync()
    return first, (time.perf_counter() - t0) / max(1, warmup - 1)


def steps_for(s: Shape, step_s: float, args) -> int:
    """At least s.steps; more to fill --min-seconds, at most 50 x s.steps."""
    wanted = math.ceil(args.min_seconds / step_s) if step_s > 0 else s.steps
    return int(min(max(s.steps, wanted), 50 * s.steps))


# ----------------------------------------------------------------------------- the rows


def run_ours(s: Shape, host: FlatBuffer, x, y, device: str, fused: bool, args) -> dict:
    cuda_kernels.ENABLED = fused
    backend.use(device)
    try:
        data = backend.asarray(host.data.copy())
        model = GPT(s.cfg, FlatBuffer(s.cfg, "float32", data))
        model.grads = FlatBuffer(s.cfg, "float32")
        opt = AdamW(model.params, *BETAS, EPS, WEIGHT_DECAY)
        xb, yb = backend.asarray(x), backend.asarray(y)

        def step() -> float:
            return training_step(model, opt, [(xb, yb)], LR)

        calls = Counter(cuda_kernels.CALLS)
        first, step_s = warm_up(step, args.warmup, backend.synchronize)
        METER.reset()
        row = {"first_loss": first, **timed(step, steps_for(s, step_s, args), backend.synchronize)}
        row["records"] = dict(METER.records)
        row["fused_calls"] = dict(Counter(cuda_kernels.CALLS) - calls)
        row["profile_s_by_kind"] = profile_kinds(step, args.profile_steps)
        return row
    finally:
        METER.reset()
        cuda_kernels.ENABLED = True
        backend.use("cpu")


def profile_kinds(step, n: int) -> dict:
    """Seconds per step by kind, with the meter's synchronizing clock (profiling mode)."""
    if n <= 0:
        return {}
    METER.reset()
    with METER.synchronizing():
        for _ in range(n):
            step()
    groups = tables.group(tables.rows_from_records(METER.records), "kind")
    return {g["name"]: g["seconds"] / n for g in sorted(groups, key=lambda g: -g["seconds"])}


def run_torch(s: Shape, host: FlatBuffer, x, y, device: str, path: str, args) -> dict:
    import _torch_gpt as tg
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with dev:  # factory calls default to the device (the twin builds its masks with arange)
        P = tg.params_from(host)
        opt = tg.adamw(P, LR, BETAS, EPS, WEIGHT_DECAY)
        xt, yt = torch.as_tensor(x, device=dev), torch.as_tensor(y, device=dev)
        params = list(P.values())

        def step():
            opt.zero_grad(set_to_none=True)
            loss = tg.loss(P, s.cfg, xt, yt, path)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            return loss

        first, step_s = warm_up(step, args.warmup, sync)
        return {"first_loss": first, **timed(step, steps_for(s, step_s, args), sync)}


def free_device_memory() -> None:
    """Hand back what a finished row's arrays held: CuPy's pool and PyTorch's cache."""
    gc.collect()
    if "cupy" in sys.modules:
        backend.cupy().get_default_memory_pool().free_all_blocks()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_step_records(s: Shape, host: FlatBuffer, x, y, args) -> dict:
    """One step of ours on the CPU: the reference the GPU's counts must equal."""
    quick = argparse.Namespace(**{**vars(args), "warmup": 1, "min_seconds": 0.0, "profile_steps": 0})
    one = Shape(s.name, s.cfg, s.batch, 1)
    return run_ours(one, host, x, y, "cpu", False, quick)["records"]


# ----------------------------------------------------------------------------- one shape


def bench_shape(s: Shape, profile, args, deadline: float) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    host = init(s.cfg, np.random.default_rng(SEED))  # on the host: backend is "cpu" here
    rng = np.random.default_rng(SEED + 1)
    x = rng.integers(0, s.cfg.vocab_size, (s.batch, s.cfg.block_size))
    y = rng.integers(0, s.cfg.vocab_size, (s.batch, s.cfg.block_size))
    pred = prediction(s, profile)
    out = {"name": s.name, "config": s.cfg.__dict__, "batch": s.batch, "tokens_per_step": s.tokens,
           "predicted": {k: v for k, v in pred.items() if k != "records"}, "rows": []}
    runners = {"minigpt cupy": lambda: run_ours(s, host, x, y, device, True, args),
               "minigpt cupy unfused": lambda: run_ours(s, host, x, y, device, False, args),
               "torch eager": lambda: run_torch(s, host, x, y, device, "eager", args),
               "torch sdpa": lambda: run_torch(s, host, x, y, device, "sdpa", args)}
    for label in ROWS:
        row = {"label": label}
        if time.monotonic() > deadline:
            row["error"] = "skipped: past --budget-s"
        else:
            print(f"[{s.name}] {label} ...", flush=True)
            try:
                row.update(runners[label]())
            except Exception as e:  # noqa: BLE001 -- one row's failure must not stop the rest
                row["error"] = f"{type(e).__name__}: {e}"
                row["traceback"] = traceback.format_exc(limit=8)
        free_device_memory()
        finish_row(row, s, pred, profile)
        out["rows"].append(row)
        print(f"[{s.name}] {label}: {row.get('error') or 'ok'}", flush=True)
    if s.name == "tiny" and time.monotonic() < deadline:
        out["cpu_vs_gpu_counts"] = cpu_check(s, host, x, y, args, out["rows"][0])
    return out


def cpu_check(s, host, x, y, args, ours: dict) -> dict:
    if "records" not in ours:
        return {"error": "no GPU records to compare"}
    try:
        return compare_counts(ours["records"], cpu_step_records(s, host, x, y, args), ours["steps"])
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def finish_row(row: dict, s: Shape, pred: dict, profile) -> None:
    """Derived figures; the meter's records become their comparison with the closed form."""
    if "seconds" not in row:
        return
    row["tokens_per_s"] = row["steps"] * s.tokens / row["seconds"]
    row["ms_per_step"] = 1e3 * row["seconds"] / row["steps"]
    if profile is not None and profile.peak_flops.get("fp32"):
        row["mfu"] = pred["matmul_flops"] * row["steps"] / row["seconds"] / profile.peak_flops["fp32"]
    if row.get("joules") is not None:
        row["j_per_token"] = row["joules"] / (row["steps"] * s.tokens)
    if profile is not None and profile.power_watts is not None:
        row["time_power_j_per_token"] = row["seconds"] * profile.power_watts / (row["steps"] * s.tokens)
    if "records" in row:
        row["counts_vs_closed_form"] = compare_counts(row["records"], pred["records"], row["steps"])


# ----------------------------------------------------------------------------- the report


def fmt(x, spec: str, missing: str = "-") -> str:
    return missing if x is None else format(x, spec)


def table(result: dict) -> str:
    m = result["machine"]
    prof = result.get("profile")
    figures = (f"fp32 {prof['fp32'] / 1e12:.1f} TFLOP/s, {prof['bandwidth'] / 1e12:.2f} TB/s, "
               f"{prof['watts']:g} W" if prof else result.get("profile_reason", ""))
    head = [f"GPU: {m.get('gpu') or 'none seen'}; profile {m.get('profile') or 'none'} ({figures})",
            (f"CuPy {m.get('cupy')}  torch {m.get('torch')}  numpy {m.get('numpy')}  TF32 off: "
             f"CUPY_TF32={m.get('cupy_tf32')}, torch allow_tf32={m.get('torch_allow_tf32')}")]
    if m.get("dry_run"):
        head.append("DRY RUN on the CPU (NumPy, torch CPU) against h100-sxm's figures: checks the "
                    "script; the numbers mean nothing")
    cols = (f"{'shape':<17} {'row':<21} {'steps':>5} {'ms/step':>8} {'tokens/s':>10} "
            f"{'/eager':>6} {'MFU':>6} {'J/tok NVML':>10} {'J/tok t*P':>9} {'J/tok roof':>10} "
            f"{'loss0':>7}")
    lines = head + ["", cols, "-" * len(cols)]
    notes = []
    for sh in result["shapes"]:
        eager = next((r for r in sh["rows"] if r["label"] == "torch eager"), {})
        roof = sh["predicted"].get("roofline_j_per_token")
        for r in sh["rows"]:
            if "seconds" not in r:
                lines.append(f"{sh['name']:<17} {r['label']:<21} {r.get('error', '')}")
                continue
            ratio = r["tokens_per_s"] / eager["tokens_per_s"] if "tokens_per_s" in eager else None
            lines.append(
                f"{sh['name']:<17} {r['label']:<21} {r['steps']:>5} {r['ms_per_step']:>8.2f} "
                f"{r['tokens_per_s']:>10,.0f} {fmt(ratio, '6.2f')} "
                f"{fmt(r.get('mfu') and 100 * r['mfu'], '5.1f')}% "
                f"{fmt(r.get('j_per_token'), '10.3g')} {fmt(r.get('time_power_j_per_token'), '9.3g')} "
                f"{fmt(roof, '10.3g')} {r['first_loss']:>7.4f}")
            if r.get("joules") is None:
                notes.append(f"{sh['name']} {r['label']}: NVML energy not measured: {r['nvml']}")
        notes += shape_notes(sh)
    return "\n".join(lines + [""] + notes)


def shape_notes(sh: dict) -> list[str]:
    out = []
    rows = {r["label"]: r for r in sh["rows"]}
    for label in ("minigpt cupy", "minigpt cupy unfused"):
        c = rows.get(label, {}).get("counts_vs_closed_form")
        if c:
            verdict = "equal" if c["mismatched"] == 0 else f"{c['mismatched']} records DIFFER"
            out.append(f"{sh['name']} {label}: meter vs closed form, {c['keys']} records per step: "
                       f"{verdict} ({c['measured_flops_per_step']:.6g} FLOPs/step measured, "
                       f"{c['expected_flops_per_step']:.6g} predicted)")
    cpu = sh.get("cpu_vs_gpu_counts")
    if cpu:
        out.append(f"{sh['name']}: GPU meter vs one CPU step: " + (
            cpu["error"] if "error" in cpu else
            "equal" if cpu["mismatched"] == 0 else f"{cpu['mismatched']} records DIFFER"))
    ours = rows.get("minigpt cupy", {})
    losses = [r["first_loss"] for r in sh["rows"] if "first_loss" in r]
    if "first_loss" in ours and len(losses) > 1:
        worst = max(abs(v - ours["first_loss"]) / abs(ours["first_loss"]) for v in losses)
        out.append(f"{sh['name']}: first-step losses (same weights, same batch) agree to {worst:.1e} "
                   f"relative across the {len(losses)} rows")
    if "fused_calls" in ours:
        out.append(f"{sh['name']}: fused kernel calls: {ours['fused_calls'] or 'none (dispatch not wired)'}")
    kinds = ours.get("profile_s_by_kind")
    if kinds:
        total = sum(kinds.values())
        top = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in list(kinds.items())[:6])
        out.append(f"{sh['name']}: synchronized profile, {1e3 * total:.1f} ms/step: {top}")
    eager = rows.get("torch eager", {})
    if sh["name"] == "gpt2-small-width" and "tokens_per_s" in ours and "tokens_per_s" in eager:
        ratio = ours["tokens_per_s"] / eager["tokens_per_s"]
        met = "met" if ratio >= TARGET else "NOT met"
        out.append(f"target: minigpt cupy / torch eager = {ratio:.2f}x at gpt2-small-width "
                   f"(>= {TARGET}: {met})")
    return out


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items() if k != "records"}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return x


def save(out_dir: pathlib.Path, result: dict) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (out_dir / "gpu_bench.json").write_text(json.dumps(jsonable(result), indent=1))
    (out_dir / "gpu_bench.txt").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="results folder (default $OUT, else out/gpu_bench)")
    ap.add_argument("--only", default="", help="comma-separated shape names")
    ap.add_argument("--steps-tiny", type=int, default=100)
    ap.add_argument("--steps-small", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--min-seconds", type=float, default=2.0, help="timed window at least this")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--batch-small", type=int, default=8)
    ap.add_argument("--vocab-small", type=int, default=50304)
    ap.add_argument("--budget-s", type=float, default=300.0, help="skip rows that start later")
    ap.add_argument("--dry-run", action="store_true", help="everything on this CPU, tiny counts")
    args = ap.parse_args()
    if args.dry_run:
        args.steps_tiny, args.steps_small, args.warmup = 2, 2, 2
        args.min_seconds, args.profile_steps = 0.0, 1
    out_dir = pathlib.Path(args.out or os.environ.get("OUT") or ROOT / "out" / "gpu_bench")
    deadline = time.monotonic() + args.budget_s

    backend.keep_freed_memory()
    result = {"machine": machine(args.dry_run), "args": vars(args), "shapes": []}
    profile, result["profile_reason"] = load_profile(result["machine"]["profile"])
    if profile is not None:
        result["profile"] = {"name": profile.name, "fp32": profile.peak_flops.get("fp32"),
                             "bandwidth": profile.memory_bandwidth, "watts": profile.power_watts}
    print(json.dumps(result["machine"]), flush=True)
    for s in shapes(args):
        result["shapes"].append(bench_shape(s, profile, args, deadline))
        save(out_dir, result)  # after each shape: a later failure or timeout keeps these
    print(save(out_dir, result))
    print(f"\nwritten: {out_dir / 'gpu_bench.json'}, {out_dir / 'gpu_bench.txt'}")


if __name__ == "__main__":
    main()
