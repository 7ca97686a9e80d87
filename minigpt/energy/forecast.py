"""A run predicted before it runs: seconds from the time model (minigpt.hardware.timing) applied to
the closed form's calls, joules from those seconds at the power the run would be reported at.

    forecast(cfg, time_model, mode, steps, batch, seq)   a Forecast of `steps` steps of `mode`
    comparison_line(forecast, measured_seconds, ...)    "predicted ... measured ... (error)"

A training run's forecast is steps x a training step plus its evaluations (cfg.eval.batches
validation forwards every cfg.eval.interval steps and at the last step, as the trainer does). The
power is the one the run's energy report would use where it is known before the run: --watts,
else the profile's power_watts, else the CPU estimate at the share of the cores the calibration
runs kept busy ("estimated"). Joules are seconds x watts x PUE, as the time x power layer counts.
"""

import math
from dataclasses import dataclass

from minigpt import units
from minigpt.counting import closed_form, tables
from minigpt.energy import accounting
from minigpt.hardware import cpu_power, timing
from minigpt.hardware.profiles import Profile


@dataclass
class Forecast:
    """Predicted seconds and joules of `steps` steps of `mode` (and a training run's evaluations)."""

    mode: str
    steps: int
    batch: int
    seq: int
    seconds_per_step: float  # s, metered and unmetered
    evaluations: int  # validation passes in a training run (0 otherwise)
    seconds_per_evaluation: float  # s, cfg.eval.batches forwards
    rows: list[dict]  # one step's records, "seconds" predicted (evaluation rows after them)
    unmetered_per_step: float  # s
    power: accounting.PowerFigure
    pue: float
    provenance: str  # where the time model came from
    suspect: str  # why its figures may be wrong, or ""

    @property
    def seconds(self) -> float:
        return self.steps * self.seconds_per_step + self.evaluations * self.seconds_per_evaluation

    @property
    def joules(self) -> float | None:
        w = self.power.watts
        return None if w is None else self.seconds * w * self.pue

    def to_json(self) -> dict:
        j = self.joules
        layers = tables.group([r for r in self.rows if r["phase"] != "eval"], "layer")
        phases = tables.group(self.rows, "phase")
        scale = (self.power.watts or 0.0) * self.pue
        return {"mode": self.mode, "steps": self.steps, "batch": self.batch, "seq": self.seq,
                "seconds": self.seconds, "seconds_per_step": self.seconds_per_step,
                "evaluations": self.evaluations,
                "seconds_per_evaluation": self.seconds_per_evaluation,
                "unmetered_seconds_per_step": self.unmetered_per_step,
                "joules": j, "wh": None if j is None else units.wh(j),
                "watts": self.power.watts, "watts_basis": self.power.note, "pue": self.pue,
                "time_model": self.provenance, "suspect": self.suspect or None,
                "layers": [{"name": g["name"], "seconds_per_step": g["seconds"],
                            "joules_per_step": g["seconds"] * scale if self.power.watts else None}
                           for g in layers],
                "phases": [{"name": g["name"], "seconds_per_step": g["seconds"]} for g in phases]}


def predicted_power(profile: Profile | None, watts: float | None, busy_cores: float,
                    estimate: bool = True) -> accounting.PowerFigure:
    """The power a run's report would use, as far as it is known before the run (see above)."""
    if watts is not None:
        return accounting.PowerFigure(watts, accounting.PowerBasis.GIVEN, "--watts")
    if profile is not None and profile.power_watts is not None:
        return accounting.PowerFigure(profile.power_watts, accounting.PowerBasis.PROFILE,
                                      f"profile {profile.name}",
                                      profile.sources.get("power_watts", ""))
    if estimate:
        est = cpu_power.estimate(busy_cores, 1.0)
        return accounting.PowerFigure(est.watts, accounting.PowerBasis.ESTIMATED,
                                      est.basis + " (as in the calibration runs)", est.source)
    return accounting.PowerFigure(None, accounting.PowerBasis.NONE,
                                  "needs a power figure (pass --watts or add power_watts to your profile)")


def evaluations(steps: int, interval: int) -> int:
    """Validation passes in a run of `steps` steps: every `interval` steps and at the last."""
    return steps // interval + (steps % interval != 0)


def _fused() -> bool:
    """Whether a CPU run here records the fused kernels' schedule (nn.layers.fused())."""
    from minigpt.nn import layers

    return layers.fused()


def packed_kernels() -> bool:
    """Whether packed-weight products here run on the packed kernels, and a decode step's few-row
    float32 ones on the tiled kernel (Numba, on the CPU)."""
    from minigpt import backend, kernels

    return kernels.active() == "numba" and backend.device == "cpu"


def _step(tm: timing.TimeModel, cfg, mode: str, batch: int, seq: int, grad_accum: int = 1):
    calls = closed_form.op_calls(cfg, mode, batch, seq, grad_accum, fused=_fused())
    step = timing.predict_calls(tm, calls, mode)
    records = _records(calls)
    for key, seconds in step.by_key.items():
        records[key].seconds = seconds
    return step, tables.rows_from_records(records)


def _records(calls) -> dict:
    """The calls summed per key, in the order the keys first appear (what the meter would hold)."""
    from minigpt.counting.meter import Record

    out: dict = {}
    for c in calls:
        r = out.setdefault(c.key, Record())
        r.calls += 1
        r.flops += c.flops
        r.bytes_read += c.bytes_read
        r.bytes_written += c.bytes_written
    return out


def forecast(cfg, tm: timing.TimeModel, mode: str = "train", steps: int | None = None,
             batch: int | None = None, seq: int | None = None, profile: Profile | None = None,
             watts: float | None = None, estimate: bool = True,
             settings: accounting.Settings | None = None) -> Forecast:
    """The forecast of a run of config cfg (a minigpt.config.Config): `steps` steps (default
    cfg.train.max_steps) of `mode`, each a (batch, seq) training step, a prefill of seq tokens,
    or a decode step at position seq (the steps then run at seq, seq + 1, ...)."""
    B = batch if batch is not None else cfg.train.batch_size
    T = seq if seq is not None else cfg.model.block_size
    n = steps if steps is not None else cfg.train.max_steps
    if mode == "train":
        step, rows = _step(tm, cfg.model, "train", B, T, cfg.train.grad_accum)
        per_step = step.seconds
        n_eval = evaluations(n, cfg.eval.interval)
        ev, ev_rows = _step(tm, cfg.model, "eval", cfg.train.batch_size, cfg.model.block_size)
        per_eval = cfg.eval.batches * ev.seconds
        rows += ev_rows
    elif mode == "decode":  # positions seq .. seq + n - 1, each step's own length of cache
        last = min(T + n, cfg.model.block_size) - 1
        positions = range(T, max(last, T) + 1)
        first, rows = _step(tm, cfg.model, "decode", B, T)
        total = sum(_step(tm, cfg.model, "decode", B, p)[0].seconds for p in positions)
        per_step, step = total / len(positions), first
        n_eval, per_eval = 0, 0.0
    else:
        step, rows = _step(tm, cfg.model, mode, B, T)
        per_step, n_eval, per_eval = step.seconds, 0, 0.0
    s = settings or accounting.settings()
    return Forecast(mode, n, B, T, per_step, n_eval, per_eval, rows, step.unmetered,
                    predicted_power(profile, watts, tm.busy_cores, estimate), s.pue,
                    timing.provenance(tm), timing.suspect(tm))


def duration(seconds: float) -> str:
    """2 min 25 s, 3 h 5 min, 0.42 s: a duration as a person reads it."""
    if seconds < 10:
        return f"{seconds:.2g} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours / 24:.1f} days"


def headline(f: Forecast) -> str:
    """"about 2 min 25 s and 1.2 kJ here (500 steps at 0.19 s + 5 evaluations)"."""
    energy = f" and {units.si(f.joules, 'J')}" if f.joules is not None else ""
    what = f"{plural(f.steps, 'step')} at {f.seconds_per_step:.3g} s"
    if f.evaluations:
        what += f" + {plural(f.evaluations, 'evaluation')} at {f.seconds_per_evaluation:.3g} s"
    return f"about {duration(f.seconds)}{energy} here ({what})"


def plural(n: int, noun: str) -> str:
    """"1 step", "5 steps"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def error(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured: + when the prediction was too slow."""
    return (predicted - measured) / measured if measured > 0 else math.nan


def against(f: Forecast, step_s: float, eval_s: float, wall_s: float,
            joules: float | None, joules_basis: str) -> dict:
    """energy.json's "prediction": the forecast beside what the run measured, with the errors.

    step_s: measured seconds per training step (the trainer's clock around each step); eval_s:
    measured seconds per evaluation; wall_s: the run's wall seconds (which also hold startup and
    checkpoints, not predicted); joules: the energy the run reports (its measured layer, else
    time x power), joules_basis: which."""
    j = f.joules
    out = {"seconds": f.seconds, "seconds_per_step": f.seconds_per_step,
           "seconds_per_evaluation": f.seconds_per_evaluation, "steps": f.steps,
           "evaluations": f.evaluations, "joules": j, "wh": None if j is None else units.wh(j),
           "watts": f.power.watts, "watts_basis": f.power.note, "time_model": f.provenance,
           "suspect": f.suspect or None,
           "measured": {"seconds": wall_s, "seconds_per_step": step_s,
                        "seconds_per_evaluation": eval_s, "joules": joules,
                        "joules_basis": joules_basis}}
    out["error"] = {"seconds_per_step": error(f.seconds_per_step, step_s),
                    "seconds_per_evaluation": error(f.seconds_per_evaluation, eval_s)
                    if f.evaluations and eval_s else None,
                    "seconds": error(f.seconds, wall_s),
                    "joules": error(j, joules) if j is not None and joules else None}
    return out


def comparison_lines(p: dict) -> list[str]:
    """The end-of-run lines of against()'s document: predicted against measured, with errors."""
    m, e = p["measured"], p["error"]
    lines = [(f"predicted against measured: a step {p['seconds_per_step']:.4g} s against "
              f"{m['seconds_per_step']:.4g} s ({100 * e['seconds_per_step']:+.1f}%)")]
    if e["seconds_per_evaluation"] is not None:
        lines[0] += (f"; an evaluation {p['seconds_per_evaluation']:.4g} s against "
                     f"{m['seconds_per_evaluation']:.4g} s ({100 * e['seconds_per_evaluation']:+.1f}%)")
    lines.append(f"  the run {duration(p['seconds'])} against {duration(m['seconds'])} of wall time "
                 f"({100 * e['seconds']:+.1f}%; the wall also holds startup and checkpoints)")
    if e["joules"] is not None:
        lines[-1] += (f"; {units.si(p['joules'], 'J')} against {units.si(m['joules'], 'J')} "
                      f"{m['joules_basis']} ({100 * e['joules']:+.1f}%)")
    if p["suspect"]:
        lines.append(f"  note: the time model was {p['suspect']}")
    return lines


@dataclass
class GenerationForecast:
    """A generation's predicted seconds: one prefill of the prompt, then decode steps from the
    prompt's length on (batch sequences at once), metered (what the meter times) and in all."""

    prefill_s: float
    prefill_metered_s: float
    decode_s: float  # all the decode steps
    decode_metered_s: float
    steps: int
    batch: int

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second (batch tokens a step)."""
        return self.batch * self.steps / self.decode_s if self.decode_s > 0 else math.nan


def generation(cfg, tm: timing.TimeModel, prompt_tokens: int, steps: int, batch: int = 1,
               quant=None) -> GenerationForecast:
    """The forecast of a prefill of prompt_tokens and `steps` decode steps after it, for a model
    config (a ModelConfig); quant: the QuantConfig of int8 inference (its products are predicted at
    the float32 rate: docs/costs.md) or of packed weights (--bits: at the packed kernels' measured
    rates where they run, TimeModel.packed). Float32 weights: a decode step's weight products
    at the tiled kernel's rates where it runs (GPT.prepare_decode, which generation,
    serving and bench/decode.py call)."""
    packed = bool(getattr(quant, "bits", None)) and packed_kernels()
    tiled = quant is None and packed_kernels()

    def step(mode, seq):
        calls = closed_form.op_calls(cfg, mode, batch, seq, quant=quant, fused=_fused())
        return timing.predict_calls(tm, calls, mode, packed or (tiled and mode == "decode"))

    pre = step("prefill", prompt_tokens)
    positions = range(prompt_tokens, min(prompt_tokens + steps, cfg.block_size))
    decode = [step("decode", p) for p in positions]
    return GenerationForecast(pre.seconds, pre.seconds - pre.unmetered,
                              sum(d.seconds for d in decode),
                              sum(d.seconds - d.unmetered for d in decode), len(decode), batch)


def generation_line(g: GenerationForecast, prefill_s: float | None, decode_s: float | None) -> str:
    """`generate --costs`'s line: predicted metered seconds against the meter's (prefill_s,
    decode_s: the measured phases' metered seconds, None where the phase did not run)."""
    parts = [f"predicted here: prefill {g.prefill_metered_s:.3g} s"]
    if prefill_s:
        parts[0] += f" (measured {prefill_s:.3g} s, {100 * error(g.prefill_metered_s, prefill_s):+.0f}%)"
    if g.steps:
        rate = g.batch * g.steps / g.decode_metered_s
        text = f"decode {rate:,.0f} tokens/s"
        if decode_s:
            measured = g.batch * g.steps / decode_s
            text += f" (measured {measured:,.0f}, {100 * error(rate, measured):+.0f}%)"
        parts.append(text)
    return "; ".join(parts) + " (metered seconds; minigpt costs --config RUN --predict --mode decode)"
