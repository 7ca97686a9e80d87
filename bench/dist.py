"""One process against two MPI ranks on this machine, through the README's own commands.

    python bench/dist.py [--steps 60] [--repeats 3] [--case tiny --case wide] [--format json]
                         [--oversubscribed]

For each case (tiny: configs/tiny.toml; wide: the same with n_embd 256 and 4 heads, a block's
products 4x as large and its gradients 4x as many), trains --steps steps through the real command,
`python train.py CONFIG` and `mpiexec -n 2 python train.py CONFIG`, with no thread variable set
(train's own choice: one process keeps the libraries' default, two ranks take the cores between
them), each run in its own temporary out_dir:

    1 process              python train.py
    2 ranks                mpiexec -n 2 python train.py   (MINIGPT_OVERLAP=0: one allreduce after
                                                           the backward pass)
    2 ranks, overlap       the same with MINIGPT_OVERLAP=1 (gradient buckets reduced during it)
    2 ranks, 2 threads...  --oversubscribed: MINIGPT_THREADS = all cores on each rank, the
                           libraries' default before train chose (the slow case issue #30 reported)

The variants run interleaved (A B C A B C ...), --repeats rounds, so a change in the machine's load
touches all of them alike; the table shows each variant's best round (the least disturbed) and the
speed-up over one process's best. tokens/s is the job's: all ranks' tokens over rank 0's summed
step time (log.jsonl's tokens / elapsed_s); "wall s" is the whole command (start-up, evaluation
and report included); comm is rank 0's communication phase per step (costs.json); val loss is the
last evaluation's. Set or unset OPENBLAS_CORETYPE in the environment you run it from; the header
says which.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
THREAD_VARS = ("MINIGPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS",
               "MINIGPT_OVERLAP")

CASES = {  # name: (config, --set overrides)
    "tiny": ("configs/tiny.toml", []),
    "wide": ("configs/tiny.toml", ["model.n_embd=256", "model.n_head=4"]),
}


def variants(oversubscribed: bool) -> list[tuple[str, int, dict]]:
    """(label, ranks, extra environment) of each variant."""
    out = [("1 process", 1, {}), ("2 ranks", 2, {"MINIGPT_OVERLAP": "0"}),
           ("2 ranks, overlap", 2, {"MINIGPT_OVERLAP": "1"})]
    if oversubscribed:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        out.append((f"2 ranks, {cores} threads each", 2,
                    {"MINIGPT_OVERLAP": "0", "MINIGPT_THREADS": str(cores)}))
    return out


def mpiexec() -> str:
    beside = pathlib.Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit("mpiexec not found: pip install -e '.[mpi]'")
    return found


def run(ranks: int, extra: dict, cfg: str, sets: list[str], steps: int, out: pathlib.Path) -> dict:
    """One training run; its figures from rank 0's log.jsonl and costs.json."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env |= {"PYTHONPATH": str(ROOT), **extra}
    args = [cfg, "--no-progress", "--set", f"train.max_steps={steps}", "--set",
            f"eval.interval={steps}", "--set", f'train.out_dir="{out}"']
    for s in sets:
        args += ["--set", s]
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()][-1]
    totals = json.loads((out / "costs.json").read_text())["totals"]
    comm = totals.get("communication", {"seconds": 0.0, "bytes_read": 0})
    threads = [x for x in proc.stderr.splitlines() if x.startswith("threads:")]
    return {"tokens_per_s": log["tokens"] / log["elapsed_s"], "step_s": log["elapsed_s"] / steps,
            "wall_s": wall, "comm_s": comm["seconds"] / steps, "sent": comm["bytes_read"] / steps,
            "val_loss": log["val_loss"], "threads": threads[0] if threads else "library default"}


def measure(case: str, steps: int, repeats: int, oversubscribed: bool) -> dict:
    cfg, sets = CASES[case]
    vs = variants(oversubscribed)
    rounds: dict[str, list[dict]] = {label: [] for label, _, _ in vs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for i, (label, ranks, extra) in enumerate(vs):
                out = pathlib.Path(tmp) / f"{r}-{i}"
                rounds[label].append(run(ranks, extra, cfg, sets, steps, out))
    best = {label: max(rs, key=lambda x: x["tokens_per_s"]) for label, rs in rounds.items()}
    one = best["1 process"]["tokens_per_s"]
    rows = [{"variant": label, "ranks": ranks, **best[label],
             "speedup": best[label]["tokens_per_s"] / one,
             "tokens_per_s_rounds": [x["tokens_per_s"] for x in rounds[label]]}
            for label, ranks, _ in vs]
    return {"case": case, "config": cfg, "set": sets, "steps": steps, "repeats": repeats,
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"{result['case']}: {result['config']} {' '.join(result['set'])}".rstrip() +
             f", {result['steps']} steps, best of {result['repeats']} interleaved rounds",
             (f"{'variant':<24} {'tokens/s':>9} {'x 1 proc':>8} {'s/step':>7} {'wall s':>7} "
             f"{'comm s/step':>11} {'sent/step':>10} {'val loss':>8}  rounds (tokens/s)")]
    for r in result["rows"]:
        sent = f"{r['sent'] / 1e6:8.2f}MB" if r["sent"] else f"{'-':>10}"
        comm = f"{r['comm_s']:11.4f}" if r["ranks"] > 1 else f"{'-':>11}"
        rounds = " ".join(f"{x:,.0f}" for x in r["tokens_per_s_rounds"])
        lines.append(f"{r['variant']:<24} {r['tokens_per_s']:9,.0f} {r['speedup']:7.2f}x "
                     f"{r['step_s']:7.3f} {r['wall_s']:7.1f} {comm} {sent} {r['val_loss']:8.4f}  "
                     f"{rounds}")
    lines += [f"  {r['variant']}: {r['threads']}" for r in result["rows"]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="tiny or wide (repeatable; default both)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--oversubscribed", action="store_true",
                    help="also run 2 ranks with a thread per core each (the old default)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args()
    header = {"cpu_count": os.cpu_count(), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE",
                                                                               "unset"),
              "load_average": os.getloadavg()}
    results = [measure(c, args.steps, args.repeats, args.oversubscribed)
               for c in args.case or ["tiny", "wide"]]
    header["load_average_after"] = os.getloadavg()
    if args.format == "json":
        print(json.dumps({**header, "cases": results}, indent=1))
        return
    print(f"{header['cpu_count']} CPUs, OPENBLAS_CORETYPE={header['OPENBLAS_CORETYPE']}, load "
          f"average {header['load_average'][0]:.1f} before, {header['load_average_after'][0]:.1f} after")
    for r in results:
        print()
        print(table(r))


if __name__ == "__main__":
    main()
