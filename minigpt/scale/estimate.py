"""`minigpt scale`: a scenario's estimate as one dict (the JSON output) and as a table.

The top of the scale package: it takes a checked scenario down the one way (work: the FLOPs;
training: chip-hours; chips: hardware and power; footprint: energy, carbon, water) and formats it.

estimate(scenario) -> {params, active_params, train_flops, train_flops_6nd, train_flops_used,
chip_hours, days, flops_per_chip, mfu, power, power_basis, energy_it_mwh, energy_mwh, co2_tonnes,
co2_net_tonnes, water_onsite_m3, water_offsite_m3, water_m3, households_year, weight_bytes,
kv_bytes_per_token, prefill_s_per_token, decode_s_per_token, decode_tokens_per_s_ceiling,
wh_per_query, wh_per_query_basis, water_ml_per_query, gwh_per_year, energy layers, sensitivity,
assumptions (each with where it came from), measured (what rests on measurement), notes}. Keys of a
part the scenario lacks, or that its inputs cannot give, are None: "not given" in the table.
"""

from minigpt.counting.tables import si
from minigpt.energy import accounting
from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.scale import chips, communication, footprint, serving, training, work
from minigpt.scale.scenario import Scenario
from minigpt.units import SECONDS_PER_DAY

SECONDS_PER_YEAR = 365.25 * SECONDS_PER_DAY  # the Julian year
TRAINING_KEYS = ("train_tokens", "train_flops", "train_flops_6nd", "train_flops_published",
                 "train_flops_used", "chip_hours", "days", "flops_per_chip", "mfu",
                 "energy_it_mwh", "energy_mwh", "co2_tonnes", "co2_net_tonnes", "water_onsite_m3",
                 "water_offsite_m3", "water_m3", "households_year")
INFERENCE_KEYS = ("weight_bytes", "kv_bytes_per_token", "prefill_s_per_token", "decode_s_per_token",
                  "decode_tokens_per_s_ceiling", "wh_per_query", "wh_per_query_basis",
                  "water_ml_per_query", "gwh_per_year")
NOT_GIVEN = "not given"


def this_machine(flops: float | None) -> dict | None:
    """This machine's measured fp32 matmul FLOP/s (local-cpu profile) and the years `flops` take."""
    try:
        prof = profiles.load_profile("local-cpu")
        rate = profiles.peak(prof, "fp32")
    except ConfigError:
        return None
    return {"flops_per_s": rate, "source": prof.sources.get("peak_flops.fp32", ""),
            "years": flops / rate / SECONDS_PER_YEAR if flops else None}


def _assumptions(scn: Scenario, chip: chips.Chip, s: accounting.Settings) -> list[dict]:
    """Every parameter the estimate used: its value and where it came from."""
    out = [{"field": f"{sec}.{k}", "value": v, "origin": scn.where(sec, k)}
           for sec, table in scn.values.items() for k, v in table.items()]
    given = {a["field"] for a in out}
    hw = "hardware."

    def default(name: str, value, origin: str) -> None:
        if name not in given:
            out.append({"field": name, "value": value, "origin": f"default: {origin}"})

    default(hw + "dtype", chip.dtype, "fp16 (mixed-precision) peak: an assumption")
    default(hw + "power_basis", chip.basis, "the accelerator's rated power (\"chip\")")
    default(hw + "watts_per_chip", chip.rating, chip.power_source)
    default(hw + "power_fraction", chip.power_fraction, "1: draw at the full rating")
    if scn.has("inference"):
        default(hw + "memory_bandwidth", chip.bandwidth, f"{chip.profile.name} memory_bandwidth "
                f"({chip.profile.sources.get('memory_bandwidth', '')})")
        for k, v in serving.DEFAULTS.items():
            default(f"inference.{k}", v, "an assumption")
    for k in footprint.SETTING_KEYS:
        if not (k == "water_onsite_l_per_kwh" and hw + "water_l_per_kwh" in given):
            default(hw + k, getattr(s, k), s.origins[k].removeprefix("default: "))
    return out


def estimate(scn: Scenario) -> dict:
    """The whole estimate of a checked scenario (see the module docstring for the keys)."""
    a, chip, s = work.arch_of(scn), chips.chip_of(scn), footprint.settings_of(scn)
    params, active, computed = work.model_size(scn)
    out = {"scenario": scn.name, "description": scn.description,
           "path": str(scn.path) if scn.path else None, "params": params, "active_params": active,
           "params_closed_form": computed[0] if computed else None,
           "active_params_closed_form": computed[1] if computed else None,
           "hardware": chip.describe(), "dtype": chip.dtype, "power": chip.power_text(),
           "power_basis": chip.basis, "watts_per_chip": chip.watts}
    out |= dict.fromkeys(TRAINING_KEYS + INFERENCE_KEYS)
    notes = []
    if scn.has("training"):
        out |= training.training(scn, a, active, chip, s)
        out |= communication.communication(scn, params, chip, s, out)
    if scn.has("inference"):
        inf = serving.inference(scn, a, params, active, chip, s)
        out |= {k: v for k, v in inf.items() if k != "hardware"}
        notes += [inf["fit_note"]] if inf["fit_note"] else []
        if inf["wh_per_query_basis"] == "stated":
            notes.append("wh_per_query: the scenario's stated figure, not a computed one")
        floor = inf.get("inference_layers", {}).get("floor_wh_per_query")
        if inf["wh_per_query_basis"] == "compute-bound" and floor and floor > inf["wh_per_query"]:
            notes.append(f"the compute-bound Wh per query is below the bytes floor of batch "
                         f"{inf['batch']} ({floor:.3g} Wh): it assumes the weight reads are "
                         f"shared by a larger batch (try --set inference.batch=64)")
    if s.water_onsite_l_per_kwh is None and s.water_offsite_l_per_kwh is None:
        notes.append("water: not estimated (give hardware.water_onsite_l_per_kwh or "
                     "water_offsite_l_per_kwh)")
    m = scn.values.get("model", {})
    if a and "d_head" in m and m["d_head"] * a.n_head != a.n_embd:
        notes.append(f"n_head × d_head = {a.n_head * m['d_head']} ≠ n_embd = {a.n_embd}: our "
                     f"blocks split n_embd across the heads, so attention is counted at n_embd")
    if a and a.n_experts > 1:
        notes.append("mixture of experts: counted by the closed form that predicts our trained "
                     "MoE (nn/moe.py) exactly, here under balanced routing; decode reads every "
                     "expert some token of the batch picks, under uniform routing")
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
    out["published"] = [{"key": k, "published": v, "ours": out.get(k),
                         "difference": out[k] / v - 1 if out.get(k) is not None else None}
                        for k, v in scn.published.items()]
    out["published_source"] = scn.published_source
    out["notes"] = notes
    out["settings"] = s
    return out


def _n(x, fmt: str = ".4g", unit: str = "") -> str:
    return NOT_GIVEN if x is None else f"{x:{fmt}}{unit}"


def _v(value) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _row(key: str, value: str, note: str = "") -> str:
    return f"  {key:<28} {value:>14}" + (f"  {note}" if note else "")


def _water_rows(r: dict, s: accounting.Settings) -> list[str]:
    on, off = s.water_onsite_l_per_kwh, s.water_offsite_l_per_kwh
    return [_row("water_onsite_m3", _n(r["water_onsite_m3"], ",.0f"),
                 f"IT MWh × {_v(on)} L/kWh (WUE, before PUE)"),
            _row("water_offsite_m3", _n(r["water_offsite_m3"], ",.0f"),
                 f"MWh drawn × {_v(off)} L/kWh (generation, after PUE)"),
            _row("water_m3", _n(r["water_m3"], ",.0f"), "on-site + off-site")]


def _sensitivity_lines(sens: dict | None) -> list[str]:
    if sens is None:
        return ["", "sensitivity: not given (needs FLOPs and a rate per chip, given or implied)"]
    head = "".join(f"{'PUE ' + format(p, '.2f'):>10}" for p in sens["pue"])
    lines = ["", "sensitivity: energy_mwh as utilisation (rows) and PUE (columns) move",
             f"  {'utilisation':<12} {'TFLOP/s/chip':>12} {'days':>8}{head}"]
    for row in sens["rows"]:
        util = f"{100 * row['mfu']:.1f}% MFU" if row["mfu"] else f"x{row['factor']:g}"
        cells = "".join(f"{e:10,.0f}" for e in row["energy_mwh"])
        lines.append(f"  {util:<12} {row['flops_per_chip'] / 1e12:12.3g} "
                     f"{_n(row['days'], '8.1f')}{cells}")
    return lines


def _training_lines(r: dict) -> list[str]:
    flops, six, L, s = r["train_flops"], r["train_flops_6nd"], r["training_layers"], r["settings"]
    vs = f"{100 * (flops / six - 1):+.1f}% vs 6ND: attention, elementwise, optimizer" if (
        flops and six) else ""
    tokens = f"{si(r['train_tokens'])} tokens" if r["train_tokens"] else "tokens not given"
    rate = r["flops_per_chip"]
    net = s.carbon_net_kg_per_kwh
    lines = [f"training: {tokens} on {r['hardware']}",
             _row("train_flops", _n(flops, ".4g"), f"our closed form ({vs})" if flops else
                  "our closed form: needs tokens and an architecture"),
             _row("train_flops_6nd", _n(six, ".4g"), "6 · active params · tokens"),
             _row("train_flops published", _n(r["train_flops_published"], ".4g")),
             _row("FLOPs used below", _n(r["train_flops_used"], ".4g"), r["train_flops_used_is"]),
             _row("chip_hours", f"{r['chip_hours']:,.0f}", r["chip_hours_is"]),
             _row("days", _n(r["days"], ",.1f"), "" if r["days"] else "give hardware.chips"),
             _row("flops_per_chip", _n(rate and rate / 1e12, ".3g", " T"),
                  f"FLOP/s per chip, {r['flops_per_chip_is']}"),
             _row("mfu", _n(r["mfu"] and 100 * r["mfu"], ".1f", "%"),
                  f"of the {r['dtype']} peak"),
             _row("power", f"{r['watts_per_chip']:g} W", r["power"]),
             _row("energy_it_mwh", f"{r['energy_it_mwh']:,.1f}",
                  "chip-hours × W × power_fraction (before PUE)"),
             _row("energy_mwh", f"{r['energy_mwh']:,.1f}", f"× PUE {s.pue:g}"),
             _row("co2_tonnes", f"{r['co2_tonnes']:,.1f}",
                  f"gross: MWh × {s.carbon_kg_per_kwh:g} kgCO2e/kWh"),
             _row("co2_net_tonnes", _n(r["co2_net_tonnes"], ",.1f"),
                  f"net: MWh × {net:g} kgCO2e/kWh" if net is not None else
                  "give hardware.carbon_net_kg_per_kwh"),
             *_water_rows(r, s),
             _row("households_year", f"{r['households_year']:,.1f}",
                  "US homes' electricity for a year"),
             "  energy, layer by layer:",
             _row("  measured", "-", "not measured here (a projection: no run)"),
             _row("  time x power", f"{L['time_x_power_mwh']:,.1f}",
                  "MWh: chip-hours, W and PUE (the row above)"),
             _row("  roofline", _n(L["roofline_mwh"], ",.1f"), "MWh: at 100% of peak, same W, PUE"),
             _row("  physics floor", _n(L["floor_mwh"], ",.1f"),
                  "MWh: FLOPs × 45 nm pJ/FLOP alone (no bytes, no PUE)")]
    return lines + _sensitivity_lines(r["sensitivity"])


def _query_lines(r: dict) -> list[str]:
    basis = r["wh_per_query_basis"]
    others = []
    if basis != "roofline" and r["wh_per_query_roofline"] is not None:
        others.append(f"roofline {r['wh_per_query_roofline']:.3g}")
    if basis != "compute-bound" and r["wh_per_query_compute"] is not None:
        others.append(f"compute-bound {r['wh_per_query_compute']:.3g}")
    how = {"stated": "stated in the scenario",
           "compute-bound": f"FLOPs per query / (peak × mfu {_v(r.get('serving_mfu'))}) × W × PUE",
           "roofline": "max(bytes / bandwidth, FLOPs / peak) per token × W × PUE"}[basis]
    return [
        _row("wh_per_query", f"{r['wh_per_query']:.3g}", f"{basis}: {how}"
             + (f" (beside it: {', '.join(others)})" if others else "")),
        _row("co2_g_per_query", f"{r['co2_g_per_query']:.3g}", "gross gCO2e"
             + (f"; net {r['co2_net_g_per_query']:.3g}" if r["co2_net_g_per_query"] is not None
                else "")),
        _row("water_ml_per_query", _n(r["water_ml_per_query"], ".3g"),
             f"mL: on-site {_n(r['water_onsite_ml_per_query'], '.3g')} + off-site "
             f"{_n(r['water_offsite_ml_per_query'], '.3g')}"),
        _row("gwh_per_year", _n(r["gwh_per_year"], ",.3g"), "Wh/query × queries/day × 365")]


def _inference_lines(r: dict) -> list[str]:
    if r["weight_bytes"] is None:
        title = "inference: a stated energy per query (no model: the roofline is not given)"
        return [title, *_query_lines(r)]
    L = r["inference_layers"]
    kv = si(r["kv_bytes_per_token"], "B") if r["kv_bytes_per_token"] else "-"
    fits = {True: "fit", False: "DO NOT FIT", None: "fit: not checked"}[r["fits_in_memory"]]
    title = (f"inference: {r['inference_chips']} chip(s), batch {r['batch']}, "
             f"{r['weight_bits']}-bit weights, {r['kv_bits']}-bit KV cache, {r['power']}; the "
             f"roofline is the ideal machine, a lower bound")
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
        _row("flops_per_query", f"{r['flops_per_query']:.3g}",
             "closed form" if r["kv_bytes_per_token"] else "2 × active params × tokens"),
        *_query_lines(r),
        _row("  physics floor", f"{L['floor_wh_per_query']:.3g}",
             "Wh/query: FLOPs × 45 nm pJ + bytes × DRAM pJ (no PUE)"),
        _row("  measured", "-", "not measured here (a projection: no run)")]


def format_table(r: dict) -> str:
    """The human-readable report of estimate()'s dict."""
    lines = [f"scale: {r['scenario']}" + (f"  ({r['path']})" if r["path"] else "")]
    lines += [f"  {r['description']}"] if r["description"] else []
    closed = f" (our architecture: {si(r['params_closed_form'])})" if (
        r["params_closed_form"] and r["params_closed_form"] != r["params"]) else ""
    lines += [_row("params", si(r["params"]) if r["params"] else NOT_GIVEN, closed.strip()),
              _row("active_params", si(r["active_params"]) if r["active_params"] else NOT_GIVEN),
              ""]
    if r["chip_hours"] is not None:
        lines += _training_lines(r) + communication.lines(r) + [""]
    if r["wh_per_query"] is not None:
        lines += _inference_lines(r) + [""]
    if r["published"]:
        lines += [f"published ({r['published_source']}) beside ours:"]
        lines += [f"  {p['key']:<22} {p['published']:>14,.6g} {_n(p['ours'], ',.6g'):>14}  "
                  + ("not given" if p["difference"] is None else f"{100 * p['difference']:+.2f}%")
                  for p in r["published"]] + [""]
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
