"""Reports of the meter's records: grouped tables, phase totals, costs.json and costs.csv.

Rows are plain dicts with the record fields (scope, op, kind, phase, dtype, calls, flops,
useful_flops, bytes_read, bytes_written, seconds), so measured and predicted records print alike.
"""

import csv
import io
import json
from pathlib import Path

from minigpt import safeio, units

FIELDS = ("scope", "op", "kind", "phase", "dtype", "calls", "flops", "useful_flops",
          "bytes_read", "bytes_written", "seconds")
NUMBERS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written", "seconds")
GROUPINGS = ("scope", "op", "kind", "layer", "phase")

CONVENTIONS = (
    "conventions: matmul (..., M, K) @ (..., K, N) = 2*batch*M*N*K FLOPs, A, B and C moved once each; "
    "elementwise = documented FLOPs per element, inputs read and outputs written once (docs/costs.md); "
    "useful = FLOPs a causal mask keeps"
)


def rows_from_records(records: dict) -> list[dict]:
    """The meter's {RecordKey: Record} as a list of dicts."""
    rows = []
    for key, r in records.items():
        rows.append({"scope": key.scope, "op": key.op, "kind": key.kind, "phase": key.phase,
                     "dtype": key.dtype, "calls": r.calls, "flops": r.flops, "useful_flops": r.useful_flops,
                     "bytes_read": r.bytes_read, "bytes_written": r.bytes_written,
                     "seconds": r.seconds})
    return rows


def records_from_rows(rows) -> dict:
    """The inverse of rows_from_records (for restoring a resumed run's meter)."""
    from minigpt.counting.meter import Record, RecordKey

    return {RecordKey(r["scope"], r["op"], r["kind"], r["phase"], r["dtype"]):
            Record(**{k: r[k] for k in NUMBERS}) for r in rows}


def layer_of(scope: str) -> str:
    """"h3.attn.c_attn" -> "h3"; "lm_head" -> "lm_head"."""
    return scope.split(".", 1)[0]


def group(rows, by: str = "scope", phase: str | None = None, extra=None) -> list[dict]:
    """Sum rows by scope, op, kind, layer or phase (optionally one phase only), biggest first.
    extra(row) -> {field: number}, when given, adds more summed fields to every group (the run's
    joules: minigpt.energy.run_energy.row_joules)."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {GROUPINGS}")
    out: dict[str, dict] = {}
    for r in rows:
        if phase is not None and r["phase"] != phase:
            continue
        name = layer_of(r["scope"]) if by == "layer" else r[by]
        more = extra(r) if extra is not None else {}
        g = out.setdefault(name, {"name": name} | {k: 0 for k in (*NUMBERS, *more)})
        for k in NUMBERS:
            g[k] += r[k]
        for k, v in more.items():
            g[k] += v
    return sorted(out.values(), key=lambda g: (-g["flops"], -g["bytes_read"], g["name"]))


def totals(rows) -> dict:
    """{phase: summed numbers}, plus "all"."""
    t = {g["name"]: {k: g[k] for k in NUMBERS} for g in group(rows, "phase")}
    t["all"] = {k: sum(r[k] for r in rows) for k in NUMBERS}
    return t


def si(x: float, unit: str = "") -> str:
    """x with an SI prefix and two decimals, as the cost tables print it (si(1.5e9, "B") ->
    '1.50 GB'); below 1,000 a whole number ('512 B')."""
    return units.si(x, unit, spec=".2f", down_to=1e3, rest=".0f")


def format_table(groups, title: str = "", top: int | None = None) -> str:
    """A fixed-width table: name, FLOPs, % of FLOPs, bytes, FLOP/byte, and (for measured records)
    seconds and achieved GFLOP/s."""
    total = sum(g["flops"] for g in groups) or 1
    timed = any(g["seconds"] > 0 for g in groups)
    energy = bool(groups) and "joules" in groups[0]
    shown = groups[:top] if top else groups
    # The heads' padding is each number column's least width, so tables of different runs line up.
    head = ["name", f"{'FLOPs':>11}", f"{'%':>5}", f"{'bytes':>10}", f"{'FLOP/B':>7}"]
    if timed:
        head += [f"{'seconds':>8}", f"{'GFLOP/s':>8}"]
    if energy:
        head += [f"{'joules':>9}", f"{'J roofline':>10}"]
    rows = []
    for g in shown:
        nbytes = g["bytes_read"] + g["bytes_written"]
        intensity = g["flops"] / nbytes if nbytes else 0.0
        row = [g["name"], si(g["flops"]), f"{100 * g['flops'] / total:.1f}", si(nbytes, "B"),
               f"{intensity:.1f}"]
        if timed:
            rate = g["flops"] / g["seconds"] / 1e9 if g["seconds"] > 0 else 0.0
            row += [f"{g['seconds']:.3f}", f"{rate:.2f}"]
        if energy:
            row += [f"{g['joules']:.4g}", f"{g['joules_roofline']:.4g}"]
        rows.append(tuple(row))
    lines = ([title] if title else []) + units.rows_text(tuple(head), rows)
    if top and len(groups) > top:
        lines.append(f"... {len(groups) - top} more")
    return "\n".join(lines)


def groups_csv(groups) -> str:
    buf = io.StringIO()
    more = [k for k in ("joules", "joules_roofline") if groups and k in groups[0]]
    w = csv.DictWriter(buf, fieldnames=("name", *NUMBERS, *more), lineterminator="\n")
    w.writeheader()
    w.writerows(groups)
    return buf.getvalue()


def _atomic_write(path: Path, text: str) -> None:
    """Replace path with text whole (safeio.write_text): a full disk or a read-only folder is one
    FileSystemError line naming the path, the old file stays, the temporary is removed."""
    safeio.write_text(path, text)


def save(out_dir, rows, steps: int, tokens: int, ranks: int = 1) -> tuple[Path, Path]:
    """<out_dir>/costs.json ({steps, tokens, conventions, records, totals}) and costs.csv.
    ranks > 1 (data-parallel, minigpt.train.dist): rows and tokens are rank 0's share, and the
    document says so with "ranks"."""
    out_dir = Path(out_dir)
    doc = {"steps": steps, "tokens": tokens, "conventions": CONVENTIONS,
           "records": [{k: r[k] for k in FIELDS} for r in rows], "totals": totals(rows)}
    if ranks > 1:
        doc["ranks"] = ranks
    jpath, cpath = out_dir / "costs.json", out_dir / "costs.csv"
    _atomic_write(jpath, json.dumps(doc, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in FIELDS})
    _atomic_write(cpath, buf.getvalue())
    return jpath, cpath


def load(run_dir) -> dict:
    """A run's costs.json; ValueError (one line) if it is JSON of another shape."""
    doc = json.loads((Path(run_dir) / "costs.json").read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
        raise ValueError("not a minigpt costs.json (no list of records)")  # noqa: TRY004 - callers catch ValueError
    for key in ("steps", "tokens"):
        if not isinstance(doc.get(key), int) or isinstance(doc[key], bool):
            raise ValueError(f"not a minigpt costs.json ({key} is not a whole number)")  # noqa: TRY004
    for i, r in enumerate(doc["records"]):
        if not isinstance(r, dict) or any(k not in r for k in FIELDS) or any(
                not isinstance(r[k], int | float) or isinstance(r[k], bool) for k in NUMBERS):
            raise ValueError(f"record {i} lacks a field or a number ({', '.join(FIELDS)})")
    return doc


def summary(rows, steps: int, tokens: int, peak_flops: float | None = None,
            peak_source: str = "") -> str:
    """The end-of-training report: a per-layer table of the training phases, phase totals (and
    the evaluations' beside them), and model FLOPs utilisation against a measured peak (when one is given)."""
    train_rows = [r for r in rows if r["phase"] in ("forward", "backward", "optimizer")]
    t = totals(train_rows)
    comm = totals([r for r in rows if r["phase"] == "communication"]).get("communication")
    lines = [format_table(group(train_rows, "layer"),
                          title=f"cost per layer, training phases, {steps} steps, {tokens:,} tokens"),
             ""]
    cells = [_phase_cells(phase, t[phase]) for phase in ("forward", "backward", "optimizer", "all")
             if phase in t]
    evals = totals([r for r in rows if r["phase"] == "eval"]).get("eval")
    if evals:  # the periodic validation forwards: real work, but not training's, so not in "all"
        cells.append(_phase_cells("eval", evals, "(validation forwards, not in all)"))
    if comm:
        cells.append(_communication_cells(comm))
    lines += units.rows_text(("phase", "FLOPs", "bytes", "seconds", "GFLOP/s", ""), cells,
                             align="<>>>><", rule=False)
    if comm:
        lines.append(_communication_share(t["all"], comm))
    if steps:
        mm = sum(r["flops"] for r in train_rows if r["kind"] == "matmul")
        lines.append(f"matmul FLOPs per token: {mm / tokens:,.0f}  (all FLOPs per token: "
                     f"{t['all']['flops'] / tokens:,.0f})")
    if peak_flops and t["all"]["seconds"] > 0:
        achieved = t["all"]["flops"] / t["all"]["seconds"]
        lines.append(f"model FLOPs utilisation: {100 * achieved / peak_flops:.1f}% of "
                     f"{peak_flops / 1e9:,.1f} GFLOP/s {peak_source}".rstrip())
    lines.append(CONVENTIONS)
    return "\n".join(lines)


def _phase_cells(name: str, p: dict, note: str = "") -> tuple[str, ...]:
    rate = p["flops"] / p["seconds"] / 1e9 if p["seconds"] > 0 else 0.0
    return (name, si(p["flops"]), si(p["bytes_read"] + p["bytes_written"], "B"),
            f"{p['seconds']:.2f}", f"{rate:.2f}", note)


def _communication_cells(comm: dict) -> tuple[str, ...]:
    """Data-parallel runs: the allreduces' totals as a row beside the compute phases'. Bytes are
    those each rank sent and received (ring allreduce); the seconds include waiting for the
    slowest rank."""
    sent, received = si(comm["bytes_read"], "B"), si(comm["bytes_written"], "B")
    return ("communic.", si(comm["flops"]), si(comm["bytes_read"] + comm["bytes_written"], "B"),
            f"{comm['seconds']:.2f}", "", f"(allreduce: {sent} sent + {received} received by this rank)")


def _communication_share(compute: dict, comm: dict) -> str:
    total_s = compute["seconds"] + comm["seconds"]
    share = 100 * comm["seconds"] / total_s if total_s > 0 else 0.0
    return (f"compute {compute['seconds']:.2f} s, communication {comm['seconds']:.2f} s: "
            f"{share:.1f}% of the step time went to the allreduces")
