"""Decode at every weight width and batch: tokens/s, bytes/token, fraction of ceiling, J/token.

    python bench/decode_grid.py RUN [--bits 32,16,8,4] [--batch 1,8,64] [--tokens N] [--prompt P]
                                [--repeats R] [--blas-threads 1,2] [--watts W] [--format json]

Runs bench/decode.py's measurement once per width (each over the batches given), and prints one
table: for each bits x batch point, tokens/s over all sequences and the time model's forecast of
it, bytes per token (the meter's count), the binding ceiling and the fraction of it reached, which
ceiling binds, the speed-up over the float32 model at the same batch, and joules per token = watts
x step seconds / batch. The bandwidth ceiling is bench/decode.py's: the in-process STREAM figure
nearest the point's read/write mix (the read bandwidth for a decode step), so "of ceiling" and "of
read bw" agree wherever the point is bandwidth-bound on the read figure.
Watts: --watts, else the energy module's power figure for this machine (a calibrated profile's
power_watts), else each point's own estimate from the CPU's rated power and the cores its decode
kept busy (minigpt.hardware.cpu_power, as `minigpt serve` and train.py estimate theirs where the
machine has no power counters); the table's header says which. Per width, the predicted and measured batch at
which decode turns compute-bound follow the table.
"""

import argparse
import importlib.util
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from minigpt import kernels
from minigpt.units import rows_text


def _decode_bench():
    path = pathlib.Path(__file__).with_name("decode.py")
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def power_watts(watts: float | None) -> float | None:
    if watts is not None:
        return watts
    from minigpt.energy import accounting

    prof, _ = accounting.find_profile("local-cpu")
    return accounting.power_figure(prof, None, None, True).watts


def point_watts(fixed: float | None, p: dict) -> tuple[float, str]:
    """(watts, basis) for a grid point: the fixed figure if there is one, else the CPU-time
    estimate from the point's busy cores (bench/decode.py's busy_cores of its fastest run)."""
    if fixed is not None:
        return fixed, "given"
    from minigpt.hardware import cpu_power

    est = cpu_power.estimate(p["busy_cores"], 1.0)
    return est.watts, est.basis


def grid(args) -> dict:
    bench = _decode_bench()
    watts = power_watts(args.watts)
    rows, by_bits = [], {}
    for bits in args.bits:
        ns = argparse.Namespace(run=args.run, tokens=args.tokens, prompt=args.prompt, int8=None,
                                kv_int8=False, blas_threads=args.blas_threads, repeats=args.repeats,
                                bits=bits, group_size=args.group_size, storage16=args.storage16,
                                batch=args.batch, kernels=args.kernels)
        r = bench.measure(ns)
        by_bits[bits] = r
        for p in r["batches"]:
            w, basis = point_watts(watts, p)
            rows.append({"bits": bits, "batch": p["batch"], "tokens_per_s": p["tokens_per_s"],
                         "predicted_tokens_per_s": p["predicted_tokens_per_s"],
                         "bytes_per_token": p["bytes_per_token"],
                         "ceiling": p["ceiling"], "ceiling_tokens_per_s": p["ceiling_tokens_per_s"],
                         "fraction_of_ceiling": p["fraction_of_ceiling"],
                         "fraction_of_read_ceiling": p["tokens_per_s"] * p["bytes_per_token"] / r["read_bandwidth"],
                         "bound": p["bound"], "overhead_per_step_s": p["overhead_per_step_s"],
                         "watts": w, "power_basis": basis, "j_per_token": w * p["step_s"] / p["batch"],
                         "threads": r["blas_threads"]})
    fp32 = {row["batch"]: row["tokens_per_s"] for row in rows if row["bits"] == 32}
    for row in rows:
        row["speedup_over_fp32"] = row["tokens_per_s"] / fp32[row["batch"]] if row["batch"] in fp32 else None
    return {"run": str(args.run), "watts": watts, "kernels": kernels.active(),
            "environment": next(iter(by_bits.values()))["environment"], "rows": rows,
            "knees": {bits: {"predicted": r["knee_batch_predicted"], "measured": r["knee_batch_measured"]}
                      for bits, r in by_bits.items()},
            "bandwidth": {bits: r["bandwidth"] for bits, r in by_bits.items()},
            "read_bandwidth": {bits: r["read_bandwidth"] for bits, r in by_bits.items()},
            "predicted_how": {bits: r["predicted_how"] for bits, r in by_bits.items()},
            "matmul_peak_flops": {bits: r["matmul_peak_flops"] for bits, r in by_bits.items()}}


def print_table(g: dict) -> None:
    if g["watts"]:
        power = f"J/token at {g['watts']} W"
    else:  # each row's own estimate: say its basis once, less the busy cores that differ by row
        basis = g["rows"][0]["power_basis"].rsplit(", ", 1)[0]
        power = f"J/token at each row's W: {basis}, scaled by the cores its decode kept busy"
    print(f"{g['run']}: decode by weight width and batch ({g['environment']}; kernels: {g['kernels']}; "
          f"{power})")
    cells = [(str(r["bits"]), str(r["batch"]), f"{r['tokens_per_s']:.1f}", f"{r['predicted_tokens_per_s']:.1f}",
              "-" if r["speedup_over_fp32"] is None else f"{r['speedup_over_fp32']:.2f}x",
              f"{r['bytes_per_token'] / 1e6:.2f}", f"{r['ceiling_tokens_per_s']:.1f}", r["ceiling"],
              f"{100 * r['fraction_of_ceiling']:.1f}%", f"{100 * r['fraction_of_read_ceiling']:.1f}%",
              r["bound"], f"{1e3 * r['overhead_per_step_s']:.2f}",
              f"{r['watts']:.1f}", f"{r['j_per_token']:.3g}", str(r["threads"]))
             for r in g["rows"]]
    print("\n".join(rows_text(("bits", "batch", "tokens/s", "predicted", "vs fp32", "MB/token", "ceiling",
                               "ceiling is", "of ceiling",
                               "of read bw", "bound", "ms outside ops", "W", "J/token", "threads"), cells)))
    for bits, k in g["knees"].items():
        measured = "-" if k["measured"] is None else f"{k['measured']:.1f}"
        predicted = "beyond the search" if k["predicted"] is None else k["predicted"]
        print(f"{bits}-bit: compute-bound from batch {predicted} (predicted), {measured} (measured); "
              f"forecast: {g['predicted_how'][bits]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 epilog="example: python bench/decode_grid.py out/gpt2-124m --watts 20")
    ap.add_argument("run", help="a run folder or checkpoint file")
    ap.add_argument("--bits", default="32,16,8,4", help="weight widths, comma-separated (default 32,16,8,4)")
    ap.add_argument("--batch", default="1,8,64", help="batch sizes, comma-separated (default 1,8,64)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens decoded per sequence (default 32)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length (default 64)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per point; the best counts (default 2)")
    ap.add_argument("--blas-threads", default="1,2", help="thread counts (OpenBLAS and Numba) to try")
    ap.add_argument("--group-size", type=int, default=32, help="4 bits: inputs a scale (default 32)")
    ap.add_argument("--storage16", choices=("fp16", "bf16"), default="fp16", help="16 bits: the format")
    ap.add_argument("--kernels", choices=kernels.CHOICES, default=kernels.active())
    ap.add_argument("--watts", type=float, default=None, help="power for J/token (W)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    try:
        args.bits = [int(b) for b in args.bits.split(",")]
        args.batch = [int(b) for b in args.batch.split(",")]
        args.blas_threads = [int(n) for n in args.blas_threads.split(",")]
    except ValueError:
        ap.error("--bits, --batch and --blas-threads take comma-separated integers")
    if any(b not in (32, 16, 8, 4) for b in args.bits):
        ap.error("--bits: each of 32, 16, 8, 4")
    if min(args.batch + args.blas_threads + [args.tokens, args.prompt, args.repeats]) < 1:
        ap.error("sizes and counts must be >= 1")
    if args.watts is not None and not args.watts > 0:
        ap.error(f"--watts must be > 0, got {args.watts}")
    g = grid(args)
    print(json.dumps(g, indent=1) if args.format == "json" else "", end="")
    if args.format == "table":
        print_table(g)
    return 0


if __name__ == "__main__":
    sys.exit(main())
