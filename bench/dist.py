"""One process against two MPI ranks on this machine: tokens/s and the allreduce's share.

    python bench/dist.py [--steps 60] [--config configs/tiny.toml]

Trains the config for --steps steps through the real command (`python train.py`, and `mpiexec -n 2
python train.py`), with BLAS threads as noted per row, each run in its own temporary out_dir, and
prints a table from rank 0's log and costs.json: training tokens/s (all ranks together: global
batch tokens over rank 0's summed step time), seconds per step, the communication phase's seconds
and its share of the step time, and the bytes each rank sent. Set or unset OPENBLAS_CORETYPE in the
environment you run it from; the table says which. Two ranks on a 2-core machine share the cores
with each other's BLAS threads: the rows with 1 BLAS thread per rank are the fair comparison.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUNS = (  # (ranks, BLAS threads per rank or None = the library's default)
    (1, None), (1, 1), (2, 1), (2, None))


def mpiexec() -> str:
    beside = pathlib.Path(sys.executable).with_name("mpiexec")
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if not found:
        sys.exit("mpiexec not found: pip install -e '.[mpi]'")
    return found


def run(ranks: int, threads: int | None, cfg: str, steps: int, out: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.pop(var, None)
        if threads:
            env[var] = str(threads)
    args = [cfg, "--no-progress", "--set", f"train.max_steps={steps}", "--set",
            f"eval.interval={steps}", "--set", f'train.out_dir="{out}"']
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()][-1]
    totals = json.loads((out / "costs.json").read_text())["totals"]
    comm = totals.get("communication", {"seconds": 0.0, "bytes_read": 0})
    compute = sum(totals[p]["seconds"] for p in ("forward", "backward", "optimizer"))
    return {"tokens_per_s": log["tokens"] / log["elapsed_s"], "step_s": log["elapsed_s"] / steps,
            "comm_s": comm["seconds"] / steps,
            "share": comm["seconds"] / (compute + comm["seconds"]),
            "sent": comm["bytes_read"] / steps, "val_loss": log["val_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    coretype = os.environ.get("OPENBLAS_CORETYPE", "unset")
    print(f"{args.config}, {args.steps} steps, OPENBLAS_CORETYPE={coretype}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'ranks':>5}  {'BLAS threads':>12}  {'tokens/s':>9}  {'s/step':>7}  "
          f"{'comm s/step':>11}  {'comm share':>10}  {'sent/step':>10}  {'val loss':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ranks, threads) in enumerate(RUNS):
            r = run(ranks, threads, args.config, args.steps, pathlib.Path(tmp) / str(i))
            print(f"{ranks:5d}  {threads or 'default':>12}  {r['tokens_per_s']:9,.0f}  "
                  f"{r['step_s']:7.3f}  {r['comm_s']:11.4f}  {100 * r['share']:9.1f}%  "
                  f"{r['sent'] / 1e6:8.2f}MB  {r['val_loss']:8.4f}")


if __name__ == "__main__":
    main()
