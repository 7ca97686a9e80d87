"""Training and full-size estimates from Python: minigpt.train -> Run, minigpt.scale -> Estimate.

    run = minigpt.train("configs/tiny.toml", max_steps=50, out_dir="out/try")
    run.val_loss, run.out_dir, run.costs, run.energy, run.report_path
    est = minigpt.scale("gpt3-175b", hardware__mfu=0.4)
    est.energy_mwh, est.co2_tonnes, est.wh_per_query

Keyword overrides are the commands' `--set section.key=value` fields: a key that names one field
(max_steps, pue) by itself, or section__key (model__vocab_size, hardware__chips) where a key is
in several sections. train does what `python train.py CONFIG` does and writes what it writes
(log.jsonl, ckpt.npz, costs.json, energy.json, report.html), with tqdm's progress bar (a widget in
a notebook, through tqdm.auto) instead of the printed report: the Run displays itself.
"""

import dataclasses
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

from minigpt import config, tracking
from minigpt.counting import tables
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError

# The trainer, energy, report and scale modules are imported where they are used, so that
# `import minigpt` (and with it every command) does not load them.

# ---- keyword overrides --------------------------------------------------------------------------


def _toml(value, where: str) -> str:
    """A Python value as the TOML text a --set takes."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's
    raise ConfigError(f"{where}: a value must be a number, a string or a bool, not "
                      f"{type(value).__name__}")


def set_texts(overrides: dict, keys: dict[str, list[str]], what: str) -> list[str]:
    """{"max_steps": 5, "model__n_layer": 2} -> ["train.max_steps=5", "model.n_layer=2"], given
    {section: [its keys]}; an unknown or ambiguous key is a ConfigError naming it."""
    texts = []
    for name, value in overrides.items():
        where = f"{what}({name}=...)"
        if "__" in name:
            section, key = name.split("__", 1)
        else:
            owners = [s for s, names in keys.items() if name in names]
            if len(owners) > 1:
                raise ConfigError(f"{where}: {name} is a key of {' and '.join(owners)}: write "
                                  f"{owners[0]}__{name}=... (or {owners[1]}__{name}=...)")
            if not owners:
                import difflib

                known = sorted({k for names in keys.values() for k in names})
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: no such key{hint}")
            section, key = owners[0], name
        texts.append(f"{section}.{key}={_toml(value, where)}")
    return texts


# ---- training ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A finished training run (or one stopped by Ctrl-C: interrupted). costs: the whole run's
    records, as costs.json and `minigpt costs RUN` hold them; energy: this call's, as
    energy.json holds it."""

    out_dir: Path
    steps: int
    tokens: int
    val_loss: float
    train_loss: float
    val_bpb: float
    elapsed_s: float
    interrupted: bool
    costs: tracking.Costs
    energy: tracking.Energy
    report_path: Path
    projection: str  # this run's FLOPs per token beside GPT-3's, and what GPT-3 costs

    def __repr__(self) -> str:
        return (f"Run({str(self.out_dir)!r}: {self.steps} steps, {self.tokens:,} tokens, "
                f"val loss {self.val_loss:.4f})")

    def _repr_html_(self) -> str:
        from minigpt.report import html

        _, parts = html.sections(self.out_dir)
        body = "".join(f"<h4>{escape(title)}</h4>{part}" for title, part in parts
                       if title != "Roofline")
        return (f"<p><b>run {escape(str(self.out_dir))}</b>: {self.steps} steps, "
                f"{self.tokens:,} tokens, validation loss {self.val_loss:.4f} nats/token "
                f"({self.val_bpb:.4f} bits/byte); report: {escape(str(self.report_path))}</p>"
                + body)


def _config_keys() -> dict[str, list[str]]:
    return {s: [f.name for f in dataclasses.fields(c)] for s, c in config.SECTIONS.items()}


def session_rows(rows: list[dict], before: list[dict]) -> list[dict]:
    """rows minus a resumed run's rows at its start (the counts this session added)."""
    if not before:
        return rows
    old = tables.records_from_rows(before)
    out = []
    for r in rows:
        key = (r["scope"], r["op"], r["kind"], r["phase"], r["dtype"])
        o = old.get(key)
        d = dict(r) if o is None else r | {k: r[k] - getattr(o, k) for k in tables.NUMBERS}
        if d["calls"] > 0:
            out.append(d)
    return out


def train(config_path=None, *, resume: bool = False, progress: bool = True,
          check_memory: bool = True, hardware: str | None = None, watts: float | None = None,
          **overrides) -> Run:
    """Train from a TOML config (None: the defaults) with keyword overrides (max_steps=50,
    out_dir="out/x", model__vocab_size=512), as `python train.py CONFIG --set ...` does; returns
    the Run. hardware and watts: as train.py's --hardware and --watts, for the energy."""
    from minigpt.energy import run_energy
    from minigpt.hardware import counters
    from minigpt.report import html
    from minigpt.scale import projection
    from minigpt.train.trainer import Trainer

    tracking.check_watts(watts, "minigpt.train(watts=...)")  # before the run, not after it
    cfg = config.load(config_path, set_texts(overrides, _config_keys(), "minigpt.train"))
    trainer = Trainer(cfg, resume=resume, progress=progress, check_memory=check_memory)
    start_tokens = trainer.state.tokens
    before, METER.records = METER.records, {}  # the trainer fills the meter with the run's own
    try:
        with counters.measure() as measured:
            result = trainer.run()
    finally:
        rows = tables.rows_from_records(METER.records)  # the whole run's, resumed sessions too
        session = tables.records_from_rows(session_rows(rows, trainer.meter_rows)) if rows else {}
        METER.records = before  # and this call's work added to what was counted before it
        tracking.add_records(before, session)
    tokens = result.tokens - start_tokens
    tracking.note_tokens(tokens)
    on_cpu = cfg.train.device == "cpu"
    hw = hardware or ("local-cpu" if on_cpu else None)
    doc = run_energy.build(tables.rows_from_records(session), measured.seconds, hw, measured,
                           watts, tokens, estimate=on_cpu)
    run_energy.save(trainer.out_dir, doc)
    try:
        line = projection.gpt3_projection_line(result.tokens, rows, joules=measured.total_joules)
    except (ConfigError, ValueError) as e:
        line = f"no projection: {e}"
    return Run(Path(trainer.out_dir), result.steps, result.tokens, result.val_loss,
               result.train_loss, result.val_bpb, result.elapsed_s, result.interrupted,
               tracking.Costs(tuple(rows), result.tokens, doc), tracking.Energy(doc),
               html.write(trainer.out_dir), line)


# ---- full size ---------------------------------------------------------------------------------


def scale(name_or_path, **overrides) -> tracking.Estimate:
    """`minigpt scale NAME --set ...` as an Estimate: a shipped scenario's name (gpt3-175b) or a
    scenario file, with keyword overrides (mfu=0.4, hardware__chips=1024, pue=1.1)."""
    from minigpt.scale import estimate, scenario

    keys = {s: list(fields) for s, fields in scenario.SCHEMA.items()}
    scn = scenario.load(name_or_path, set_texts(overrides, keys, "minigpt.scale"))
    return tracking.Estimate(estimate.estimate(scn))

