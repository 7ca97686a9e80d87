"""A run's own energy, stored with it: <run>/energy.json, the end-of-run energy report printed
from it, and the joules of every group of `minigpt costs RUN`.

build() makes the document once; report_lines(doc) prints the four layers from it, so the table a
run prints and the energy.json it writes cannot differ. energy.json holds, as numbers:

    seconds, watts, watts_basis        wall seconds of the run; the power figure and its note
                                       ("measured: rapl", "--watts", "profile local-cpu",
                                       "estimated: <CPU>, 15 W rated, 1.9 of 12 logical cores busy")
    watts_method                       the figure's basis: measured, given, profile, estimated or
                                       none (accounting.PowerBasis)
    watts_source                       where an estimated or profile figure was published
    hardware                           the profile asked for (a name or path; null for none)
    layers  {measured, time_x_power, roofline, floor}: {joules (or null), why, wh, gco2e,
            j_per_token}
    pue, pue_source, grid_kg_co2e_per_kwh, grid_source, tokens
    metered {seconds, joules, joules_roofline}: the meter's records summed (what the groups of
            `minigpt costs` add up to)
    profile the roofline profile's figures (so `minigpt costs` need not measure again)
    phases  (a generation only) {prefill, decode}: {tokens, seconds, joules, joules_roofline,
            j_per_token}
    prediction  (a CPU training run) the forecast taken before it started, with what was measured
            and the errors (minigpt.energy.forecast.against)

A group's `joules` is its metered seconds × the run's watts × PUE (facility energy, as the layers
report it), so over all groups they add up to metered.joules; that is less than the time x power
layer, whose wall seconds also hold what the meter does not time (Python between operations, data,
checkpoints). A group's `joules_roofline` is its records' ideal seconds on the run's roofline
profile × watts × PUE; over all groups they add up to the roofline layer.
"""

import json
from pathlib import Path

from minigpt import units
from minigpt.counting import tables
from minigpt.energy import accounting
from minigpt.errors import ConfigError
from minigpt.hardware import calibrate, roofline
from minigpt.hardware.counters import Measurement
from minigpt.hardware.profiles import Profile

FILENAME = "energy.json"
LAYER_KEYS = {"measured": "measured", "time x power": "time_x_power", "roofline": "roofline",
              "physics floor": "floor"}


def profile_dict(prof: Profile | None, note: str = "") -> dict | None:
    """The figures of a profile that the roofline needs, as JSON."""
    if prof is None:
        return None
    return {"name": prof.name, "description": prof.description, "note": note,
            "peak_flops": dict(prof.peak_flops), "memory_bandwidth": prof.memory_bandwidth,
            "memory_bytes": prof.memory_bytes, "power_watts": prof.power_watts,
            "path": str(prof.path) if prof.path else None,
            "bandwidth": dict(prof.bandwidth),  # measured STREAM figures, "read.all_cores" -> B/s
            "bandwidth_notes": {k: prof.notes.get(f"bandwidth.{k}", "") for k in prof.bandwidth}}


def profile_from_doc(d: dict) -> Profile:
    """The Profile stored in energy.json (figures it lacks are unknown)."""
    peaks = dict(d.get("peak_flops", {}))
    missing = {f"peak_flops.{k}": "unknown" for k, v in peaks.items() if v is None}
    missing |= {k: "unknown" for k in ("memory_bandwidth", "memory_bytes", "power_watts")
                if d.get(k) is None}
    bw = dict(d.get("bandwidth") or {})  # absent in documents from before the STREAM figures
    notes = {f"bandwidth.{k}": v for k, v in (d.get("bandwidth_notes") or {}).items()}
    return Profile(d["name"], d.get("description", ""), peaks, d.get("memory_bandwidth"),
                   d.get("memory_bytes"), d.get("power_watts"), missing=missing, bandwidth=bw,
                   notes=notes)


def _layer_doc(layer: accounting.Layer, s: accounting.Settings, tokens: int | None) -> dict:
    j = layer.joules
    if j is None:
        return {"joules": None, "why": layer.basis, "wh": None, "gco2e": None, "j_per_token": None}
    return {"joules": j, "why": layer.basis, "wh": units.wh(j),
            "gco2e": accounting.co2_kg(j, s) * 1e3, "j_per_token": j / tokens if tokens else None}


def build(rows: list[dict], seconds: float, profile: Profile | str | None = "local-cpu",
          measured: Measurement | None = None, watts: float | None = None,
          tokens: int | None = None, s: accounting.Settings | None = None,
          estimate: bool = True) -> dict:
    """The energy.json document of a finished run (or generation) from its rows and seconds: the
    best power figure (accounting.power_figure; `estimate`=False: never the CPU estimate, e.g. on
    a GPU) and the four layers at it."""
    s = s or accounting.settings()
    prof, no_profile = accounting.find_profile(profile)
    note = ""
    if prof is not None and prof.name != "local-cpu" and str(profile) == "local-cpu":
        note = calibrate.QUICK_NOTE
    power = accounting.power_figure(prof, watts, measured, estimate)
    layers = accounting.layers_of(rows, seconds, prof, power, measured, s, no_profile)
    asked = profile.name if isinstance(profile, Profile) else profile
    doc = {"seconds": seconds, **power.to_json(),
           "hardware": str(asked) if asked is not None else None, "tokens": tokens,
           "pue": s.pue, "pue_source": s.origins["pue"],
           "grid_kg_co2e_per_kwh": s.carbon_kg_per_kwh, "grid_source": s.origins["carbon_kg_per_kwh"],
           "layers": {LAYER_KEYS[layer.name]: _layer_doc(layer, s, tokens) for layer in layers},
           "profile": profile_dict(prof, note)}
    joules_of = row_joules(doc)
    metered = {"seconds": sum(r["seconds"] for r in rows), "joules": None, "joules_roofline": None}
    if joules_of is not None:
        parts = [joules_of(r) for r in rows]
        metered["joules"] = sum(p["joules"] for p in parts)
        metered["joules_roofline"] = sum(p["joules_roofline"] for p in parts)
    doc["metered"] = metered
    return doc


LAYER_WIDTH = 14  # the report's first column: "physics floor" and a space


def report_lines(doc: dict) -> list[str]:
    """The end-of-run energy report, from build's document: each layer's energy, Wh and gCO2e (and
    J per token) side by side with how it was reached, or why it is missing."""
    prof = doc["profile"]
    name = prof["name"] if prof else doc["hardware"] or "no profile"
    if name == calibrate.QUICK_NAME:
        name += f" (this machine's cached {calibrate.QUICK_NOTE})"
    tokens = doc["tokens"]
    head = (f"{'layer':<{LAYER_WIDTH}}", f"{'energy':>10}", f"{'Wh':>10}", f"{'gCO2e':>9}",
            *([f"{'J/token':>9}"] if tokens else []), "how")
    layers = [(layer_name, doc["layers"][key]) for layer_name, key in LAYER_KEYS.items()]
    cells = [(layer_name, units.si(layer["joules"], "J"), f"{layer['wh']:.4g}",
              f"{layer['gco2e']:.3g}", *([f"{layer['j_per_token']:.3g}"] if tokens else []),
              layer["why"]) for layer_name, layer in layers if layer["joules"] is not None]
    table = units.rows_text(head, cells, align="<" + ">" * (len(head) - 2) + "<")
    rows = iter(table[2:])  # the given layers' lines, in order
    out = [f"energy, four ways ({doc['seconds']:.4g} s measured; profile {name})", *table[:2]]
    out += [next(rows) if layer["joules"] is not None else
            f"{layer_name:<{LAYER_WIDTH}}  {layer['why']}" for layer_name, layer in layers]
    out.append(f"PUE {doc['pue']:.2f} ({doc['pue_source']}); grid {doc['grid_kg_co2e_per_kwh']:g} "
               f"kgCO2e/kWh ({doc['grid_source']})")
    return out


def row_joules(doc: dict):
    """row -> {"joules", "joules_roofline"} at the run's power and PUE; None without a power
    figure. joules_roofline is 0 for a record the profile has no peak for (said in `why`)."""
    if not doc or doc.get("watts") is None:
        return None
    scale = doc["watts"] * doc["pue"]  # J per second of work, facility side
    prof = profile_from_doc(doc["profile"]) if doc.get("profile") else None

    def joules(row: dict) -> dict:
        ideal = 0.0
        if prof is not None:
            try:
                ideal = roofline.bound(row, prof).seconds
            except ConfigError:
                ideal = 0.0
        return {"joules": row["seconds"] * scale, "joules_roofline": ideal * scale}

    return joules


def add_phases(doc: dict, rows: list[dict], tokens: dict[str, int]) -> dict:
    """doc["phases"]: each phase's metered seconds, joules, roofline joules and J per token
    (tokens: {"prefill": prompt tokens, "decode": generated tokens})."""
    joules_of = row_joules(doc)
    phases = {}
    for g in tables.group(rows, "phase", extra=joules_of):
        n = tokens.get(g["name"])
        j = g.get("joules")
        phases[g["name"]] = {"tokens": n, "seconds": g["seconds"], "joules": j,
                             "joules_roofline": g.get("joules_roofline"),
                             "j_per_token": j / n if j is not None and n else None}
    doc["phases"] = phases
    return doc


def save(out_dir, doc: dict) -> Path:
    path = Path(out_dir) / FILENAME
    tables._atomic_write(path, json.dumps(doc, indent=1) + "\n")
    return path


def load(run_dir) -> dict | None:
    """A run's energy.json, or None if it has none (a run from before energy.json existed)."""
    path = Path(run_dir) / FILENAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    if not isinstance(doc, dict) or "watts" not in doc or "pue" not in doc:
        raise ConfigError(f"{path}: not a minigpt energy.json (no watts or pue)")
    wrong = _shape_fault(doc)
    if wrong:
        raise ConfigError(f"{path}: not a minigpt energy.json ({wrong})")
    return doc


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _shape_fault(doc: dict) -> str:
    """What in an energy.json the readers (costs, report) would trip on, or "" if nothing."""
    text = lambda x: isinstance(x, str)
    wants = {"seconds": _is_number, "pue": _is_number, "grid_kg_co2e_per_kwh": _is_number,
             "watts": lambda x: x is None or _is_number(x), "watts_basis": text,
             "pue_source": text, "grid_source": text}
    for key, ok in wants.items():
        if not ok(doc.get(key)):
            return f"{key} is missing or of the wrong type"
    layers = doc.get("layers")
    for name in ("measured", "time_x_power", "roofline", "floor"):
        layer = layers.get(name) if isinstance(layers, dict) else None
        if not isinstance(layer, dict) or not isinstance(layer.get("why"), str):
            return f"layers.{name} is missing or has no 'why'"
        if layer.get("joules") is not None and not all(
                _is_number(layer.get(k)) for k in ("joules", "wh", "gco2e")):
            return f"layers.{name}: joules, wh and gco2e must be numbers"
    prof = doc.get("profile")
    if prof is not None and not (isinstance(prof, dict) and isinstance(prof.get("name"), str)
                                 and isinstance(prof.get("peak_flops", {}), dict)):
        return "profile is not a table with a name"
    return ""


def summary_line(doc: dict) -> str:
    """One line for `minigpt costs`: what the joules columns mean for this run."""
    if doc.get("watts") is None:
        return f"joules: none ({doc['layers']['time_x_power']['why']})"
    line = (f"joules = metered seconds x {doc['watts']:.3g} W ({doc['watts_basis']}) x PUE "
            f"{doc['pue']:.2f}")
    if doc.get("profile"):
        line += f"; J roofline = ideal seconds on {doc['profile']['name']} x the same W x PUE"
    return line
