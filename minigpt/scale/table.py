"""`minigpt scale`'s table: an Estimate as the text report, read from its typed parts.

One row formatter (row: a name, a right-aligned value, a note) serves the training, communication
and inference tables; "not given" stands for a figure the scenario's inputs cannot give.
"""

from minigpt import units
from minigpt.energy import accounting
from minigpt.scale.communication import Communication
from minigpt.scale.estimate import Estimate
from minigpt.scale.footprint import Footprint
from minigpt.scale.per_query import Boundaries, Breakeven, Throughput
from minigpt.scale.serving import Serving
from minigpt.scale.training import Sensitivity, Training

NOT_GIVEN = "not given"


def si(x: float, unit: str = "") -> str:
    """x with an SI prefix to two decimals, whole below 1,000: '349.21 GB', '512 B'."""
    return units.si(x, unit, spec=".2f", down_to=1e3, rest=".0f")


def _n(x, fmt: str = ".4g", unit: str = "") -> str:
    return NOT_GIVEN if x is None else f"{x:{fmt}}{unit}"


def _v(value) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def row(key: str, value: str, note: str = "", width: int = 14) -> str:
    """'  key   value  note': the key in 28 columns, the value right-aligned in `width`."""
    return f"  {key:<28} {value:>{width}}" + (f"  {note}" if note else "")


def _water_rows(f: Footprint, s: accounting.Settings) -> list[str]:
    on, off = s.water_onsite_l_per_kwh, s.water_offsite_l_per_kwh
    return [row("water_onsite_m3", _n(f.water_onsite_m3, ",.0f"),
                f"IT MWh × {_v(on)} L/kWh (WUE, before PUE)"),
            row("water_offsite_m3", _n(f.water_offsite_m3, ",.0f"),
                f"MWh drawn × {_v(off)} L/kWh (generation, after PUE)"),
            row("water_m3", _n(f.water_m3, ",.0f"), "on-site + off-site")]


def _sensitivity_lines(sens: Sensitivity | None) -> list[str]:
    if sens is None:
        return ["", "sensitivity: not given (needs FLOPs and a rate per chip, given or implied)"]
    head = ("utilisation", "TFLOP/s/chip", "days", *(f"PUE {p:.2f}" for p in sens.pue))
    cells = [(f"{100 * r.mfu:.1f}% MFU" if r.mfu else f"x{r.factor:g}",
              f"{r.flops_per_chip / 1e12:.3g}", _n(r.days, ".1f"),
              *(f"{e:,.0f}" for e in r.energy_mwh)) for r in sens.rows]
    return ["", "sensitivity: energy_mwh as utilisation (rows) and PUE (columns) move",
            *("  " + line for line in units.rows_text(head, cells, rule=False))]


def _training_lines(t: Training, e: Estimate) -> list[str]:
    w, c, f, L, s, chip = t.flops, t.costs, t.costs.footprint, t.layers, e.settings, e.chip
    flops, six = w.closed_form, w.six_nd
    vs = f"{100 * (flops / six - 1):+.1f}% vs 6ND: attention, elementwise, optimizer" if (
        flops and six) else ""
    tokens = f"{si(w.tokens)} tokens" if w.tokens else "tokens not given"
    rate = c.flops_per_chip
    net = s.carbon_net_kg_per_kwh
    lines = [f"training: {tokens} on {chip.describe()}",
             row("train_flops", _n(flops, ".4g"), f"our closed form ({vs})" if flops else
                 "our closed form: needs tokens and an architecture"),
             row("train_flops_6nd", _n(six, ".4g"), "6 · active params · tokens"),
             row("train_flops published", _n(w.published, ".4g")),
             row("FLOPs used below", _n(w.used, ".4g"), w.used_is),
             row("chip_hours", f"{c.chip_hours:,.0f}", t.chip_hours_is),
             row("days", _n(c.days, ",.1f"), "" if c.days else "give hardware.chips"),
             row("flops_per_chip", _n(rate and rate / 1e12, ".3g", " T"),
                 f"FLOP/s per chip, {t.flops_per_chip_is}"),
             row("mfu", _n(c.mfu and 100 * c.mfu, ".1f", "%"), f"of the {chip.dtype} peak"),
             row("power", f"{chip.watts:g} W", chip.power_text()),
             row("energy_it_mwh", f"{f.energy_it_mwh:,.1f}",
                 "chip-hours × W × power_fraction (before PUE)"),
             row("energy_mwh", f"{f.energy_mwh:,.1f}", f"× PUE {s.pue:g}"),
             row("co2_tonnes", f"{f.co2_tonnes:,.1f}",
                 f"gross: MWh × {s.carbon_kg_per_kwh:g} kgCO2e/kWh"),
             row("co2_net_tonnes", _n(f.co2_net_tonnes, ",.1f"),
                 f"net: MWh × {net:g} kgCO2e/kWh" if net is not None else
                 "give hardware.carbon_net_kg_per_kwh"),
             *_water_rows(f, s),
             row("households_year", f"{f.households_year:,.1f}",
                 "US homes' electricity for a year"),
             "  energy, layer by layer:",
             row("  measured", "-", "not measured here (a projection: no run)"),
             row("  time x power", f"{L.time_x_power_mwh:,.1f}",
                 "MWh: chip-hours, W and PUE (the row above)"),
             row("  roofline", _n(L.roofline_mwh, ",.1f"), "MWh: at 100% of peak, same W, PUE"),
             row("  physics floor", _n(L.floor_mwh, ",.1f"),
                 "MWh: FLOPs × 45 nm pJ/FLOP alone (no bytes, no PUE)")]
    return lines + _sensitivity_lines(t.sensitivity)


def communication_lines(comm: Communication) -> list[str]:
    """The communication rows under the training table: the allreduce, or why it is not given."""
    c = comm.allreduce
    if c is None:
        return [f"  communication: not estimated ({comm.why})"] if comm.why else []

    def crow(name: str, value: str, how: str) -> str:
        return row(name, value, how, width=12)

    out = [f"communication (gradient allreduce), assuming {c.layout}:",
           crow("gradients per step", si(c.buffer_bytes, "B"),
                f"params x {c.gradient_bytes:g} bytes"),
           crow("sent per chip per step", si(c.sent_bytes_per_chip_per_step, "B"),
                f"2 (N-1)/N x gradients, N = {c.chips:,} (ring; received: as much)"),
           crow("link, each way", si(c.link_bytes_per_s, "B/s"), c.link),
           crow("seconds per step", f"{c.seconds_per_step:.4g}", "sent / link"),
           crow("steps", f"{c.steps:,.0f}", f"tokens / batch_tokens ({c.batch_tokens:.4g})"),
           crow("days", f"{c.days:,.1f}", f"beside {c.compute_days:,.1f} days of compute"
                if c.compute_days is not None else "(compute days: not given)")]
    if c.share is not None:
        out.append(crow("share of training time", f"{100 * c.share:.1f}%",
                        "communication / (compute + communication), no overlap"))
    if c.energy_mwh is not None:
        out.append(crow("energy_mwh", f"{c.energy_mwh:,.1f}",
                        f"chips x W x PUE while they exchange ({c.co2_tonnes:,.1f} tCO2e)"))
    if c.total_days is not None:
        mwh = f", {c.total_mwh:,.1f} MWh" if c.total_mwh is not None else ""
        out.append(crow("with compute", f"{c.total_days:,.1f}",
                        f"days{mwh} (compute + communication, one after the other)"))
    out.append("  (an upper bound for this layout: overlap with the backward pass, one ring per "
               "network card, NVLink inside servers and model parallelism all shrink it; "
               "docs/costs.md)")
    return out


def _query_lines(sv: Serving) -> list[str]:
    basis, q = sv.wh_per_query_basis, sv.per_query
    others = []
    if basis != "roofline" and sv.wh_per_query_roofline is not None:
        others.append(f"roofline {sv.wh_per_query_roofline:.3g}")
    if basis != "compute-bound" and sv.wh_per_query_compute is not None:
        others.append(f"compute-bound {sv.wh_per_query_compute:.3g}")
    if basis != "throughput" and sv.throughput is not None:
        others.append(f"throughput {sv.throughput.wh_per_query:.3g}")
    mfu = sv.roofline.serving_mfu if sv.roofline else None
    how = {"stated": "stated in the scenario",
           "throughput": "(output / tokens_per_s + latency) × (accelerator + host W) × PUE",
           "compute-bound": f"FLOPs per query / (peak × mfu {_v(mfu)}) × W × PUE",
           "roofline": "max(bytes / bandwidth, FLOPs / peak) per token × W × PUE"}[basis]
    return [
        *_throughput_lines(sv.throughput),
        row("wh_per_query", f"{sv.wh_per_query:.3g}", f"{basis}: {how}"
            + (f" (beside it: {', '.join(others)})" if others else "")),
        *_boundary_lines(sv.boundaries),
        row("co2_g_per_query", f"{q.co2_g_per_query:.3g}", "gross gCO2e"
            + (f"; net {q.co2_net_g_per_query:.3g}" if q.co2_net_g_per_query is not None
               else "")),
        row("water_ml_per_query", _n(q.water_ml_per_query, ".3g"),
            f"mL: on-site {_n(q.water_onsite_ml_per_query, '.3g')} + off-site "
            f"{_n(q.water_offsite_ml_per_query, '.3g')}"),
        row("gwh_per_year", _n(sv.gwh_per_year, ",.3g"), "Wh/query × queries/day × 365")]


def _throughput_lines(tp: Throughput | None) -> list[str]:
    if tp is None:
        return []
    return [row("query_seconds", f"{tp.seconds:.4g}", "output tokens / tokens_per_s + latency_s"),
            row("accelerator_watts", f"{tp.accelerator_watts:,.4g}",
                f"W drawn: {tp.chips} chip(s) × W per chip × accelerator_utilization"),
            row("host_watts", f"{tp.host_watts:,.4g}", "W drawn: host_watts × host_utilization")]


def _boundary_lines(b: Boundaries) -> list[str]:
    """The Wh inside each boundary, cumulative, and where the split came from."""
    what = {"accelerator": "active accelerators alone", "host": "+ host CPU and DRAM",
            "idle": "+ idle reserve machines (all IT)", "overhead": "+ data-centre overhead"}
    return [f"  wh_per_query_boundaries (cumulative; {b.split}):",
            *(row(f"  {k}", _n(v, ".3g"), what[k]) for k, v in b.to_json().items())]


def _breakeven_lines(b: Breakeven) -> list[str]:
    return ["fleet and training break-even:",
            row("inference_mwh_per_day", f"{b.inference_mwh_per_day:,.1f}",
                "Wh/query × queries/day / 1e6"),
            row("breakeven_training_mwh", f"{b.training_mwh:,.1f}",
                f"MWh drawn, {b.training_mwh_is}"
                + (" ([training] energy_mwh)" if b.training_mwh_is == "stated" else "")),
            row("breakeven_days", _n(b.days, ",.4g"),
                "training MWh / inference MWh per day: serving has then used as much")]


def _inference_lines(sv: Serving, e: Estimate) -> list[str]:
    r = sv.roofline
    if r is None:
        title = ("inference: a stated energy per query" if sv.wh_per_query_basis == "stated" else
                 f"inference: from observed speed (the throughput form), {e.chip.power_text()}")
        title += " (no model: the roofline is not given)"
        return [title, *_query_lines(sv)]
    kv = si(r.kv_bytes_per_token, "B") if r.kv_bytes_per_token else "-"
    fits = {True: "fit", False: "DO NOT FIT", None: "fit: not checked"}[sv.fits_in_memory]
    title = (f"inference: {sv.chips} chip(s), batch {r.batch}, {r.weight_bits}-bit weights, "
             f"{r.kv_bits}-bit KV cache, {e.chip.power_text()}; the roofline is the ideal "
             f"machine, a lower bound")
    return [
        title,
        row("weight_bytes", si(r.weight_bytes, "B"), f"weights + KV cache {fits} in memory"),
        row("kv_bytes_per_token", kv, "K and V, every layer"),
        row("decode_bytes_per_token", si(r.decode_bytes_per_token, "B"),
            "weights read per step / batch + KV cache at the mean context"),
        row("prefill_s_per_token", f"{r.prefill_s_per_token:.3g}", "s"),
        row("decode_s_per_token", f"{r.decode_s_per_token:.3g}", "s"),
        row("decode_tokens_per_s_ceiling", f"{r.decode_tokens_per_s_ceiling:,.1f}",
            f"tokens/s, all streams (weights alone, no KV: {r.weights_only_tokens_per_s:,.1f})"),
        row("flops_per_query", f"{r.flops_per_query:.3g}",
            "closed form" if r.kv_bytes_per_token else "2 × active params × tokens"),
        *_query_lines(sv),
        row("  physics floor", f"{r.floor_wh_per_query:.3g}",
            "Wh/query: FLOPs × 45 nm pJ + bytes × DRAM pJ (no PUE)"),
        row("  measured", "-", "not measured here (a projection: no run)")]


def format_table(e: Estimate) -> str:
    """The human-readable report of an Estimate."""
    lines = [f"scale: {e.scenario}" + (f"  ({e.path})" if e.path else "")]
    lines += [f"  {e.description}"] if e.description else []
    closed = f" (our architecture: {si(e.params_closed_form)})" if (
        e.params_closed_form and e.params_closed_form != e.params) else ""
    lines += [row("params", si(e.params) if e.params else NOT_GIVEN, closed.strip()),
              row("active_params", si(e.active_params) if e.active_params else NOT_GIVEN), ""]
    if e.training is not None:
        lines += _training_lines(e.training, e) + communication_lines(e.communication) + [""]
    if e.serving is not None:
        lines += _inference_lines(e.serving, e) + [""]
    if e.breakeven is not None:
        lines += _breakeven_lines(e.breakeven) + [""]
    if e.published:
        lines += [f"published ({e.published_source}) beside ours:"]
        lines += [f"  {p.key:<22} {p.published:>14,.6g} {_n(p.ours, ',.6g'):>14}  "
                  + ("not given" if p.difference is None else f"{100 * p.difference:+.2f}%")
                  for p in e.published] + [""]
    lines.append("rests on measurement:")
    lines += [f"  - {m}" for m in e.measured]
    if e.this_machine and e.this_machine.years:
        lines.append(f"    (at that rate, this training would take {e.this_machine.years:,.3g} "
                     f"years here)")
    lines.append("rests on assumptions: utilisation (achieved FLOP/s), power per chip, PUE, grid "
                 "carbon, and the workload; each value and where it came from:")
    lines += [f"  {a.field:<34} {_v(a.value):>10}  {a.origin}"
              for a in e.assumptions]
    lines += [f"note: {n}" for n in e.notes]
    return "\n".join(lines)
