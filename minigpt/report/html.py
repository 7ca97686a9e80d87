"""<run>/report.html: one self-contained page about a training run, written at the end of every
`minigpt train` and by `minigpt report RUN`. Charts are inline SVG drawn by minigpt.report.svg (no
matplotlib, no scripts, nothing fetched from the network), so it opens in any browser as is.

Sections: the loss curves (train and validation against tokens, from log.jsonl); cost per layer
(FLOPs, bytes, seconds, joules, from costs.json and energy.json); the roofline (each op's achieved
FLOP/s against the run's roofline profile); the four energy layers with the power figure's basis,
PUE and grid figures, and the run's prediction (taken before it started) against what it measured;
and the GPT-3 projection line. A part whose file is missing (a run from
before energy.json) says so instead of failing.
"""

import datetime
import json
from functools import partial
from html import escape
from pathlib import Path

from minigpt import units
from minigpt.counting import tables
from minigpt.energy import forecast, run_energy
from minigpt.errors import ConfigError
from minigpt.hardware import roofline
from minigpt.report import svg
from minigpt.scale import projection
from minigpt.train import fusion

FILENAME = "report.html"
TRAIN_PHASES = ("forward", "backward", "optimizer")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; } td, th { padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.l, th.l { text-align: left; } tr:nth-child(even) { background: #fafafa; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; } .note { color: #555; font-size: 13px; }
.missing { color: #a33; }
"""


def _read_log(run: Path) -> list[dict]:
    path = run / "log.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{path}: unreadable: {e}") from None
    try:
        log = [json.loads(line) for line in lines if line.strip()]
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON lines: {e}") from None
    for i, e in enumerate(log, 1):
        if not (isinstance(e, dict) and all(_is_number(e.get(k)) for k in ("step", "tokens",
                                                                               "val_loss"))
                and (e.get("train_loss") is None or _is_number(e["train_loss"]))):
            raise ConfigError(f"{path}: entry {i} is not a minigpt log line (step, tokens and "
                              f"val_loss must be numbers)")
    return log


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _loss_section(log: list[dict]) -> str:
    if not log:
        return '<p class="missing">no log.jsonl: no loss curves</p>'
    tokens = [e["tokens"] for e in log]
    chart = svg.line_chart([svg.Series("train", tokens, [e.get("train_loss") for e in log]),
                            svg.Series("validation", tokens, [e.get("val_loss") for e in log])],
                           "loss against tokens seen", "tokens", "loss (nats/token)")
    last = log[-1]
    return chart + (f'<p class="note">last evaluation: step {last["step"]}, '
                    f'{last["tokens"]:,} tokens, validation loss {last["val_loss"]:.4f}</p>')


def layer_section(rows: list[dict], doc: dict | None, phases: tuple[str, ...] | None = TRAIN_PHASES
                  ) -> str:
    """Bars and a table of FLOPs, bytes, seconds (and joules, with an energy document) per layer,
    over the records of `phases` (None: every record)."""
    train = [r for r in rows if phases is None or r["phase"] in phases]
    groups = tables.group(train, "layer", extra=run_energy.row_joules(doc) if doc else None)
    order = {}
    for r in train:  # the model's order: the meter records in the order they first ran
        order.setdefault(tables.layer_of(r["scope"]), len(order))
    groups.sort(key=lambda g: order[g["name"]])
    names = [g["name"] for g in groups]
    charts = [svg.bar_chart(names, [g["flops"] for g in groups], "FLOPs", svg.si, svg.COLORS[0]),
              svg.bar_chart(names, [g["bytes_read"] + g["bytes_written"] for g in groups],
                            "bytes moved", lambda v: svg.si(v) + "B", svg.COLORS[1]),
              svg.bar_chart(names, [g["seconds"] for g in groups], "metered seconds",
                            lambda v: f"{v:.3g} s", svg.COLORS[2])]
    if doc and "joules" in (groups[0] if groups else {}):
        charts.append(svg.bar_chart(names, [g["joules"] for g in groups],
                                    "joules (seconds x power x PUE)", partial(units.si, unit="J"),
                                    svg.COLORS[3]))
        note = run_energy.summary_line(doc)
    else:
        note = "no energy.json: no joules per layer"
    head = "<tr><th class=l>layer</th><th>FLOPs</th><th>bytes</th><th>seconds</th>"
    head += "<th>joules</th><th>J roofline</th></tr>" if charts[3:] else "</tr>"
    body = []
    for g in groups:
        cells = (f"<td class=l>{escape(g['name'])}</td><td>{tables.si(g['flops'])}</td>"
                 f"<td>{tables.si(g['bytes_read'] + g['bytes_written'], 'B')}</td>"
                 f"<td>{g['seconds']:.3f}</td>")
        if charts[3:]:
            cells += f"<td>{g['joules']:.4g}</td><td>{g['joules_roofline']:.4g}</td>"
        body.append(f"<tr>{cells}</tr>")
    which = f"phases {', '.join(phases)}" if phases is not None else "all phases"
    if phases == TRAIN_PHASES:
        which = f"training phases ({', '.join(TRAIN_PHASES)})"
    return (f'<div class="grid">{"".join(charts)}</div><p class="note">{escape(note)}; {which}'
            f'</p><table>{head}{"".join(body)}</table>')


def _roofline_section(rows: list[dict], doc: dict | None) -> str:
    prof = (doc or {}).get("profile")
    if not prof or not prof.get("memory_bandwidth") or not prof["peak_flops"].get("fp32"):
        return '<p class="missing">no roofline profile stored with this run (energy.json)</p>'
    profile = run_energy.profile_from_doc(prof)
    train = [r for r in rows if r["phase"] in TRAIN_PHASES]
    points, used = [], {}
    for g in tables.group(train, "op"):
        nbytes = g["bytes_read"] + g["bytes_written"]
        if g["flops"] and nbytes and g["seconds"] > 0:
            ceiling = roofline.memory_ceiling(profile, g["bytes_read"], g["bytes_written"])
            points.append((f"{g['name']} ({ceiling.name})", g["flops"] / nbytes,
                           g["flops"] / g["seconds"]))
            used.setdefault(ceiling, []).append(g["name"])
    peak = roofline.compute_ceiling(profile, "float32")
    slopes = sorted(used, key=lambda c: -c.value)
    chart = svg.roofline_chart(points[:12], peak.value, [(c.name, c.value) for c in slopes],
                               "training ops against the roofline (float32)")
    how = f"{prof['name']}: {prof.get('note') or prof.get('description', '')}"
    which = "; ".join(f"{c.label()} ({c.how}): {', '.join(names)}" for c, names in
                      ((c, used[c]) for c in slopes))
    return chart + (f'<p class="note">profile {escape(how)}; each dot is one op, all layers; '
                    f"matmuls' FLOPs against the {escape(peak.label())}, each op's bytes against "
                    f"the bandwidth its read/write mix fits: {escape(which)}</p>")


def _fusion_section(run: Path) -> str:
    """Bytes and seconds the fused kernels saved (fusion.json), as a table and two bars."""
    doc = fusion.load(run)
    if doc is None:
        return '<p class="missing">no fusion.json: this run used NumPy\'s passes</p>'
    steps = doc["steps"]
    moved = [steps * doc["bytes_per_step_numpy"], steps * doc["bytes_per_step_fused"]]
    chart = svg.bar_chart(["NumPy's passes", "fused kernels"], moved,
                          f"bytes the training phases moved over {steps} steps",
                          partial(units.si, unit="B"), svg.COLORS[1], width=560)
    sn = 1e3 * doc["elementwise_s_per_micro_batch_numpy"]
    sf = 1e3 * doc["elementwise_s_per_micro_batch_fused"]
    return (f"{chart}<table><tr><th class=l>schedule</th><th>bytes a step</th>"
            f"<th>elementwise ms a micro-batch</th></tr>"
            f"<tr><td class=l>NumPy's passes</td><td>{units.si(doc['bytes_per_step_numpy'], 'B')}</td>"
            f"<td>{sn:.2f}</td></tr><tr><td class=l>fused kernels</td>"
            f"<td>{units.si(doc['bytes_per_step_fused'], 'B')}</td><td>{sf:.2f}</td></tr></table>"
            f"<p>saved: {units.si(doc['bytes_saved'], 'B')} moved; elementwise seconds over the run, "
            f"estimated: {doc['micro_batches'] * sf / 1e3:.2f} s fused, "
            f"{doc['micro_batches'] * sn / 1e3:.2f} s NumPy's</p>"
            f'<p class="note">{escape(doc["how"])}</p>')


def energy_section(doc: dict | None, what: str = "this run") -> str:
    """The four energy layers of an energy document (run_energy.build's): the power figure, a
    chart, a table with each layer's basis, PUE and grid."""
    if doc is None:
        return '<p class="missing">no energy.json (a run from before it existed)</p>'
    names = {"measured": "measured", "time_x_power": "time x power", "roofline": "roofline",
             "floor": "physics floor"}
    rows, labels, values = [], [], []
    for key, name in names.items():
        layer = doc["layers"][key]
        j = layer["joules"]
        labels.append(name)
        values.append(j)
        nums = (f"<td>{units.si(j, 'J')}</td><td>{layer['wh']:.4g}</td>"
                f"<td>{layer['gco2e']:.3g}</td><td>{layer['j_per_token'] or 0:.3g}</td>"
                if j is not None else "<td>-</td><td>-</td><td>-</td><td>-</td>")
        rows.append(f"<tr><td class=l>{name}</td>{nums}<td class=l>{escape(layer['why'])}</td></tr>")
    chart = svg.bar_chart(labels, values, f"energy of {what}, four ways (log scale)",
                          partial(units.si, unit="J"), svg.COLORS[3], log=True, width=560,
                          notes=[("" if v is not None else "not available") for v in values])
    watts = (f"{doc['watts']:.3g} W ({doc['watts_basis']})" if doc["watts"] is not None
             else f"none: {doc['watts_basis']}")
    source = f"power figure's source: {doc['watts_source']}" if doc.get("watts_source") else ""
    return (f"<p>power: {escape(watts)}; {doc['seconds']:.4g} s of wall time</p>"
            f'<p class="note">{escape(source)}</p>{_prediction(doc)}{chart}'
            "<table><tr><th class=l>layer</th><th>energy</th><th>Wh</th><th>gCO2e</th>"
            f"<th>J/token</th><th class=l>how</th></tr>{''.join(rows)}</table>"
            f'<p class="note">PUE {doc["pue"]:.2f} ({escape(doc["pue_source"])}); grid '
            f'{doc["grid_kg_co2e_per_kwh"]:g} kgCO2e/kWh ({escape(doc["grid_source"])})</p>')


def _prediction(doc: dict) -> str:
    """The run's forecast (taken before it started) against what it measured, where it has one."""
    p = doc.get("prediction")
    if not isinstance(p, dict):
        return ""
    try:
        lines = forecast.comparison_lines(p)
    except (KeyError, TypeError, ValueError):
        return '<p class="missing">energy.json\'s prediction is unreadable</p>'
    return "<p>" + "<br>".join(escape(line.strip()) for line in lines) + "</p>"


def _projection(rows: list[dict], tokens: int, doc: dict | None) -> str:
    measured = ((doc or {}).get("layers", {}).get("measured") or {}).get("joules")
    joules = measured / doc["pue"] if measured is not None else None  # the counters' own joules
    try:
        return escape(projection.gpt3_projection_line(tokens, rows, joules=joules))
    except (ConfigError, ValueError) as e:
        return f'<span class="missing">no projection: {escape(str(e))}</span>'


def sections(run) -> tuple[dict, list[tuple[str, str]]]:
    """A run folder's costs.json and the report's sections [(title, html)]: loss, energy, cost
    per layer, roofline, fusion, the GPT-3 line."""
    run = Path(run)
    try:
        costs = tables.load(run)
    except FileNotFoundError:
        raise ConfigError(f"{run}: no costs.json here (train a run first)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{run}/costs.json: unreadable: {e}") from None
    rows, doc, log = costs["records"], run_energy.load(run), _read_log(run)
    return costs, [("Loss", _loss_section(log)), ("Energy", energy_section(doc)),
                   ("Cost per layer", layer_section(rows, doc)),
                   ("Roofline", _roofline_section(rows, doc)),
                   ("Fusion", _fusion_section(run)),
                   ("At GPT-3 scale", f"<p>{_projection(rows, costs['tokens'], doc)}</p>")]


def render(run) -> str:
    """The report's HTML for a run folder (log.jsonl, costs.json, energy.json)."""
    run = Path(run)
    costs, parts = sections(run)
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = "".join(f"<h2>{name}</h2>{html}" for name, html in parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>minigpt run '
            f'{escape(str(run))}</title><style>{STYLE}</style></head><body>'
            f"<h1>minigpt run {escape(str(run))}</h1><p class=note>{costs['steps']} steps, "
            f"{costs['tokens']:,} tokens; report written {when}; charts drawn by minigpt as inline "
            f"SVG (no plotting package needed, nothing fetched)</p>{body}</body></html>\n")


def write(run) -> Path:
    """Write <run>/report.html (atomically) and return its path."""
    path = Path(run) / FILENAME
    tables._atomic_write(path, render(run))
    return path
