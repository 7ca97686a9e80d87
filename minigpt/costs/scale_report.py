"""`minigpt scale`: a scenario's estimate as one dict (the JSON output) and as a table.

estimate(scenario) -> {params, active_params, train_flops, train_flops_6nd, chip_hours, days,
energy_mwh, co2_tonnes, water_m3, households_year, weight_bytes, kv_bytes_per_token,
prefill_s_per_token, decode_s_per_token, decode_tokens_per_s_ceiling, wh_per_query, gwh_per_year,
energy layers, sensitivity, assumptions (each with where it came from), measured (what rests on
measurement), notes}. Keys of a part the scenario lacks ([training] or [inference]) are None.
"""

from minigpt.costs import communication, energy, hardware, scaling, serving
from minigpt.costs.report import si
from minigpt.costs.scenario import Scenario
from minigpt.errors import ConfigError

TRAINING_KEYS = ("train_tokens", "train_flops", "train_flops_6nd", "train_flops_published",
                 "chip_hours", "days", "energy_mwh", "co2_tonnes", "water_m3", "households_year")
INFERENCE_KEYS = ("weight_bytes", "kv_bytes_per_token", "prefill_s_per_token", "decode_s_per_token",
                  "decode_tokens_per_s_ceiling", "wh_per_query", "gwh_per_year")


def this_machine(flops: float | None) -> dict | None:
    """This machine's measured fp32 matmul FLOP/s (local-cpu profile) and the years `flops` take."""
    try:
        prof = hardware.load_profile("local-cpu")
        rate = hardware.peak(prof, "fp32")
    except ConfigError:
        return None
    return {"flops_per_s": rate, "source": prof.sources.get("peak_flops.fp32", ""),
            "years": flops / rate / scaling.SECONDS_PER_YEAR if flops else None}


def _assumptions(scn: Scenario, chip: scaling.Chip, s: energy.Settings) -> list[dict]:
    """Every parameter the estimate used: its value and where it came from."""
    out = [{"field": f"{sec}.{k}", "value": v, "origin": scn.where(sec, k)}
           for sec, table in scn.values.items() for k, v in table.items()]
    given = {a["field"] for a in out}
    hw, prof = "hardware.", chip.profile

    def default(name: str, value, origin: str) -> None:
        if name not in given:
            out.append({"field": name, "value": value, "origin": f"default: {origin}"})

    default(hw + "dtype", chip.dtype, "fp16 (mixed-precision) peak: an assumption")
    default(hw + "watts_per_chip", chip.watts,
            f"{prof.name} power_watts ({prof.sources.get('power_watts', '')})")
    if scn.has("inference"):
        default(hw + "memory_bandwidth", chip.bandwidth,
                f"{prof.name} memory_bandwidth ({prof.sources.get('memory_bandwidth', '')})")
        for k, v in serving.DEFAULTS.items():
            default(f"inference.{k}", v, "an assumption")
    for k in ("pue", "carbon_kg_per_kwh", "household_kwh_per_year", "water_l_per_kwh"):
        default(hw + k, getattr(s, k), s.origins[k].removeprefix("default: "))
    return out


def estimate(scn: Scenario) -> dict:
    """The whole estimate of a checked scenario (see the module docstring for the keys)."""
    a, chip, s = scaling.arch_of(scn), scaling.chip_of(scn), scaling.settings_of(scn)
    m = scn.values["model"]
    computed = scaling.arch_params(a) if a else None
    params = m.get("params", computed[0] if computed else None)
    active = m.get("active_params", params if "params" in m else computed[1])
    out = {"scenario": scn.name, "description": scn.description,
           "path": str(scn.path) if scn.path else None, "params": params, "active_params": active,
           "params_closed_form": computed[0] if computed else None,
           "active_params_closed_form": computed[1] if computed else None,
           "hardware": chip.describe(), "dtype": chip.dtype}
    out |= dict.fromkeys(TRAINING_KEYS + INFERENCE_KEYS)
    notes = []
    if scn.has("training"):
        out |= scaling.training(scn, a, active, chip, s)
        out |= communication.communication(scn, params, chip, s, out["chip_hours"])
    if scn.has("inference"):
        out |= serving.inference(scn, a, params, active, chip, s)
        notes += [out["fit_note"]] if out["fit_note"] else []
        if out["wh_per_query_is"] == "stated":
            notes.append("wh_per_query: the scenario's stated figure, not the roofline's")
    if s.water_l_per_kwh is None:
        notes.append("water: not estimated (no sourced default; give hardware.water_l_per_kwh)")
    if a and "d_head" in m and m["d_head"] * a.n_head != a.n_embd:
        notes.append(f"n_head × d_head = {a.n_head * m['d_head']} ≠ n_embd = {a.n_embd}: our "
                     f"blocks split n_embd across the heads, so attention is counted at n_embd")
    if a and a.n_experts > 1:
        notes.append("mixture of experts: scaling only (our NumPy model has none); decode reads "
                     "every expert some token of the batch picks, under uniform routing")
    machine = this_machine(out.get("train_flops_used"))
    out["this_machine"] = machine
    here = (f"this machine's float32 matmul: {machine['flops_per_s'] / 1e9:,.1f} GFLOP/s "
            f"({machine['source']})" if machine else
            "this machine's FLOP/s: not calibrated here (run `minigpt calibrate`)")
    out["measured"] = [
        ("closed-form FLOP counts: equal to the meter's counts of the same model on this machine "
         "(tests/test_costs.py, tests/test_scaling.py)"), here,
        "per-chip figures marked as measured in the scenario's comments (e.g. Patterson's)"]
    out["assumptions"] = _assumptions(scn, chip, s)
    out["notes"] = notes
    out["settings"] = s
    return out


def _n(x, fmt: str = ".4g", unit: str = "") -> str:
    return "-" if x is None else f"{x:{fmt}}{unit}"


def _v(value) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _row(key: str, value: str, note: str = "") -> str:
    return f"  {key:<28} {value:>14}" + (f"  {note}" if note else "")


def _training_lines(r: dict) -> list[str]:
    flops, six, L = r["train_flops"], r["train_flops_6nd"], r["training_layers"]
    vs = f"{100 * (flops / six - 1):+.1f}% vs 6ND: attention, elementwise, optimizer" if (
        flops) else ""
    water = _n(r["water_m3"], ",.0f") if r["water_m3"] is not None else "not estimated"
    lines = [f"training: {si(r['train_tokens'])} tokens on {r['hardware']}",
             _row("train_flops", _n(flops, ".4g"), f"our closed form ({vs})" if flops else ""),
             _row("train_flops_6nd", f"{six:.4g}", "6 · active params · tokens"),
             _row("train_flops published", _n(r["train_flops_published"], ".4g")),
             _row("FLOPs used below", f"{r['train_flops_used']:.4g}", r["train_flops_used_is"]),
             _row("chip_hours", f"{r['chip_hours']:,.0f}", "FLOPs / achieved FLOP/s per chip"),
             _row("days", _n(r["days"], ",.1f"), "" if r["days"] else "give hardware.chips"),
             _row("energy_mwh", f"{r['energy_mwh']:,.1f}", "chip-hours × W × PUE"),
             _row("co2_tonnes", f"{r['co2_tonnes']:,.1f}", "MWh × kgCO2e/kWh"),
             _row("water_m3", water, "MWh × litres/kWh"),
             _row("households_year", f"{r['households_year']:,.1f}",
                  "US homes' electricity for a year"),
             "  energy, layer by layer:",
             _row("  measured", "-", "not measured here (a projection: no run)"),
             _row("  time x power", f"{L['time_x_power_mwh']:,.1f}",
                  "MWh: achieved FLOP/s, W and PUE (the row above)"),
             _row("  roofline", _n(L["roofline_mwh"], ",.1f"), "MWh: at 100% of peak, same W, PUE"),
             _row("  physics floor", f"{L['floor_mwh']:,.1f}",
                  "MWh: FLOPs × 45 nm pJ/FLOP alone (no bytes, no PUE)")]
    sens = r["sensitivity"]
    head = "".join(f"{'PUE ' + format(p, '.2f'):>10}" for p in sens["pue"])
    lines += ["", "sensitivity: energy_mwh as utilisation (rows) and PUE (columns) move",
              f"  {'utilisation':<12} {'TFLOP/s/chip':>12} {'days':>8}{head}"]
    for row in sens["rows"]:
        util = f"{100 * row['mfu']:.1f}% MFU" if row["mfu"] else f"x{row['factor']:g}"
        cells = "".join(f"{e:10,.0f}" for e in row["energy_mwh"])
        lines.append(f"  {util:<12} {row['flops_per_chip'] / 1e12:12.3g} {_n(row['days'], '8.1f')}"
                     f"{cells}")
    return lines


def _inference_lines(r: dict) -> list[str]:
    L = r["inference_layers"]
    kv = si(r["kv_bytes_per_token"], "B") if r["kv_bytes_per_token"] else "-"
    fits = {True: "fit", False: "DO NOT FIT", None: "fit: not checked"}[r["fits_in_memory"]]
    title = (f"inference: {r['inference_chips']} chip(s), batch {r['batch']}, "
             f"{r['weight_bits']}-bit weights, {r['kv_bits']}-bit KV cache; a roofline: the ideal "
             f"machine, a lower bound")
    return [
        title,
        _row("weight_bytes", si(r["weight_bytes"], "B"), f"weights + KV cache {fits} in memory"),
        _row("kv_bytes_per_token", kv, "K and V, every layer"),
        _row("decode_bytes_per_token", si(r["decode_bytes_per_token"], "B"),
             "weights read per step / batch + KV cache at the mean context"),
        _row("prefill_s_per_token", f"{r['prefill_s_per_token']:.3g}", "s"),
        _row("decode_s_per_token", f"{r['decode_s_per_token']:.3g}", "s"),
        _row("decode_tokens_per_s_ceiling", f"{r['decode_tokens_per_s_ceiling']:,.1f}",
             f"tokens/s, all streams (weights alone, no KV: "
             f"{r['weights_only_tokens_per_s']:,.1f})"),
        _row("wh_per_query", f"{r['wh_per_query']:.3g}", f"{r['wh_per_query_is']}"
             + ("" if r["wh_per_query_is"] == "roofline" else
                f"; the roofline gives {L['roofline_wh_per_query']:.3g}")),
        _row("  physics floor", f"{L['floor_wh_per_query']:.3g}",
             "Wh/query: FLOPs × 45 nm pJ + bytes × DRAM pJ (no PUE)"),
        _row("  measured", "-", "not measured here (a projection: no run)"),
        _row("gwh_per_year", _n(r["gwh_per_year"], ",.3g"), "Wh/query × queries/day × 365")]


def format_table(r: dict) -> str:
    """The human-readable report of estimate()'s dict."""
    lines = [f"scale: {r['scenario']}" + (f"  ({r['path']})" if r["path"] else "")]
    lines += [f"  {r['description']}"] if r["description"] else []
    closed = f" (our architecture: {si(r['params_closed_form'])})" if (
        r["params_closed_form"] and r["params_closed_form"] != r["params"]) else ""
    lines += [_row("params", si(r["params"]), closed.strip()),
              _row("active_params", si(r["active_params"])), ""]
    if r["train_tokens"] is not None:
        lines += _training_lines(r) + communication.lines(r) + [""]
    if r["weight_bytes"] is not None:
        lines += _inference_lines(r) + [""]
    lines.append("rests on measurement:")
    lines += [f"  - {m}" for m in r["measured"]]
    if r["this_machine"] and r["this_machine"]["years"]:
        years = r["this_machine"]["years"]
        lines.append(f"    (at that rate, this training would take {years:,.3g} years here)")
    lines.append("rests on assumptions: utilisation (achieved FLOP/s), power per chip, PUE, grid "
                 "carbon, and the workload; each value and where it came from:")
    lines += [f"  {a['field']:<34} {_v(a['value']):>10}  {a['origin']}" for a in r["assumptions"]]
    lines += [f"note: {n}" for n in r["notes"]]
    return "\n".join(lines)


def to_json(r: dict) -> dict:
    """estimate()'s dict without the Settings object."""
    return {k: v for k, v in r.items() if k != "settings"}
