"""This machine's memory bandwidth by kind of pass (read, write, copy, triad), on one thread and on
all cores, by both kernel paths: Numba prange loops and NumPy on Python threads.

    python bench/bandwidth.py [--rounds R] [--mib M] [--matvec-mib W] [--format json]

`minigpt calibrate` measures the same passes (minigpt.hardware.bandwidth) on the active path only;
this puts the two paths side by side, interleaved (round 1: numba then numpy, round 2: the same...)
so that a change in the machine's load falls on both, and keeps each figure's best over the
rounds (each round itself the best of 5 passes). Beside them: a BLAS matrix-vector product over
--matvec-mib MiB of float32 weights, what a decode step's products do. Bytes are counted as the
meter counts them: read + written.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from minigpt import kernels
from minigpt.hardware import bandwidth, calibrate
from minigpt.units import rows_text


def measure(rounds: int, mib: int | None, matvec_mib: int) -> dict:
    paths = [p for p in kernels.CHOICES if p != "numba" or kernels.AVAILABLE]
    outer = kernels.active()
    best: dict[tuple[str, str], bandwidth.StreamFigure] = {}
    try:
        for _ in range(rounds):
            for path in paths:
                kernels.use(path)
                for f in bandwidth.measure_stream(mib=mib):
                    key = (path, f.key)
                    if key not in best or f.bytes_per_s > best[key].bytes_per_s:
                        best[key] = f
    finally:
        kernels.use(outer)
    matvec = max(bandwidth.matvec_bandwidth(matvec_mib << 20) for _ in range(rounds))
    return {"paths": paths, "rounds": rounds, "environment": calibrate._environment(),
            "figures": [{**f._asdict(), "kernels": p, "key": f.key, "method": f.method()}
                        for (p, _), f in best.items()],
            "matvec_mib": matvec_mib, "matvec_bytes_per_s": matvec}


def print_table(r: dict) -> None:
    by = {(f["kernels"], f["key"]): f for f in r["figures"]}
    keys = list(dict.fromkeys(f["key"] for f in r["figures"]))
    rows = []
    for key in keys:
        f = next(by[p, key] for p in r["paths"] if (p, key) in by)
        what = bandwidth.WHAT[f["kind"]].format(mib=f["array_mib"])
        threads = "1 thread" if f["threads"] == 1 else f"{f['threads']} threads"
        rows.append((f"{f['kind']} ({what}), {threads}",
                     *(f"{by[p, key]['bytes_per_s'] / 1e9:.1f}" if (p, key) in by else "-"
                       for p in r["paths"])))
    rows.append((f"BLAS matrix-vector product over {r['matvec_mib']} MiB of float32 weights",
                 f"{r['matvec_bytes_per_s'] / 1e9:.1f}", *[""] * (len(r["paths"]) - 1)))
    print(f"memory bandwidth, GB/s (bytes read + written per second), best of {r['rounds']} "
          f"interleaved rounds of 5 passes; {r['environment']}")
    print("\n".join(rows_text(("pass", *(f"{p} GB/s" for p in r["paths"])), rows)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--mib", type=int, default=None,
                    help="MiB per array (default: 256, or 4 x the last-level cache if larger)")
    ap.add_argument("--matvec-mib", type=int, default=calibrate.MATVEC_MIB,
                    help=f"MiB of weights of the BLAS product (default {calibrate.MATVEC_MIB})")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if args.rounds < 1 or (args.mib is not None and args.mib < 1) or args.matvec_mib < 1:
        ap.error("--rounds, --mib and --matvec-mib must be >= 1")
    r = measure(args.rounds, args.mib, args.matvec_mib)
    if args.format == "json":
        print(json.dumps(r, indent=1))
    else:
        print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
