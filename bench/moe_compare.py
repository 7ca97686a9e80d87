"""Compare finished training runs step by step: validation loss and wall time at each evaluation,
with each run's parameters and closed-form FLOPs per token, as a markdown table.

    python train.py configs/moe-tiny.toml && python train.py configs/moe-dense-active.toml \\
        && python train.py configs/moe-dense-total.toml
    python bench/moe_compare.py out/moe-tiny out/moe-dense-active out/moe-dense-total

Reads each run's log.jsonl and checkpoint header (its config); trains nothing.
"""

import argparse
import json
from pathlib import Path

from minigpt import config
from minigpt.counting import closed_form as cost_model
from minigpt.train import checkpoint


def describe(run: Path) -> tuple[dict, list[dict]]:
    meta, _ = checkpoint.load(run)
    cfg = config.from_dict(meta["config"], str(run))
    m, t = cfg.model, cfg.train
    B, T = t.batch_size, m.block_size
    fwd = cost_model.total_flops(cost_model.predict_forward(m, B, T, targets=True)) / (B * T)
    info = {"run": run.name, "params": cost_model.n_params(m), "active": cost_model.n_active_params(m),
            "fwd_flops_per_token": fwd}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return info, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (out/<config name>)")
    args = p.parse_args()
    runs = [describe(r) for r in args.runs]
    print("| run | parameters | active | forward FLOPs / token (closed form) |")
    print("|---|---|---|---|")
    for info, _ in runs:
        print(f"| {info['run']} | {info['params']:,} | {info['active']:,} | "
              f"{info['fwd_flops_per_token'] / 1e6:.3f} M |")
    print()
    print("| step | " + " | ".join(f"{i['run']}: val loss, s" for i, _ in runs) + " |")
    print("|---" * (len(runs) + 1) + "|")
    steps = sorted({e["step"] for _, log in runs for e in log})
    for step in steps:
        cells = []
        for _, log in runs:
            e = next((e for e in log if e["step"] == step), None)
            cells.append(f"{e['val_loss']:.4f}, {e['elapsed_s']:.0f} s" if e else "")
        print(f"| {step} | " + " | ".join(cells) + " |")
    moe = [(i, log) for i, log in runs if log and "aux_loss" in log[-1]]
    for info, log in moe:
        last = log[-1]
        load = ", ".join(f"{h} {v:.3f}" for h, v in last["imbalance"].items())
        print(f"\n{info['run']}: aux loss {last['aux_loss']:.4f} over the last interval; expert "
              f"imbalance (max / mean assignments) {load}")


if __name__ == "__main__":
    main()
