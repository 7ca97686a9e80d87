"""What the fused kernels (minigpt/kernels/fused.py) saved a training run, in bytes and seconds.

Bytes: the closed form's two schedules for the run's shapes (closed_form.predict_training_step
with fused=False and True; each equals the meter's counts exactly), per step and over the run.
Seconds: the run timed only the fused passes, so one forward + backward of a training batch is
timed each way at the end (NumPy's passes, then the fused ones, best of `repeats` alternated runs,
a scratch gradient buffer, the parameters untouched), and the difference in elementwise seconds per
micro-batch is scaled to the run's micro-batches: an estimate, and labelled so.
"""

import json
from pathlib import Path

from minigpt import kernels, safeio
from minigpt.counting import closed_form
from minigpt.counting.meter import METER
from minigpt.nn import layers
from minigpt.nn.params import FlatBuffer

FILENAME = "fusion.json"
TRAIN_PHASES = ("forward", "backward", "optimizer")


def _moved(records: dict) -> int:
    return sum(r.bytes_read + r.bytes_written for k, r in records.items() if k.phase in TRAIN_PHASES)


def _elementwise_seconds(model, x, y, path: str) -> float:
    """Metered seconds of the elementwise passes of one forward + backward on `path`."""
    kernels.use(path)
    METER.reset()
    _, cache = model.loss(x, y)
    model.backward(cache)
    return sum(r.seconds for k, r in METER.records.items() if k.kind != "matmul")


def compare(model, x, y, steps: int, grad_accum: int, dtype: str, repeats: int = 3) -> dict | None:
    """The savings of a run of `steps` steps of grad_accum micro-batches shaped like x (B, T), or
    None if the run did not use the fused kernels (layers.fused())."""
    if not layers.fused():
        return None
    cfg, (B, T) = model.cfg, x.shape
    numpy_step = closed_form.predict_training_step(cfg, B, T, grad_accum, dtype=dtype)
    fused_step = closed_form.predict_training_step(cfg, B, T, grad_accum, dtype=dtype, fused=True)
    records, grads, path = METER.records, model.grads, kernels.active()
    model.grads = FlatBuffer(cfg, model.params.data.dtype)  # scratch: the run's are kept
    seconds = {"numpy": [], "numba": []}
    try:
        with METER.in_phase("forward"):
            for _ in range(repeats):
                for p, times in seconds.items():
                    times.append(_elementwise_seconds(model, x, y, p))
    finally:
        METER.records, model.grads = records, grads
        kernels.use(path)
    micro = steps * grad_accum
    per_micro = min(seconds["numpy"]) - min(seconds["numba"])
    return {
        "steps": steps,
        "micro_batches": micro,
        "bytes_per_step_numpy": _moved(numpy_step),
        "bytes_per_step_fused": _moved(fused_step),
        "bytes_saved": steps * (_moved(numpy_step) - _moved(fused_step)),
        "elementwise_s_per_micro_batch_numpy": min(seconds["numpy"]),
        "elementwise_s_per_micro_batch_fused": min(seconds["numba"]),
        "seconds_saved_estimate": micro * per_micro,
        "how": f"bytes: the closed form's two schedules; seconds: one forward + backward each way "
               f"at the end (best of {repeats}), times {micro} micro-batches",
    }


def lines(doc: dict) -> list[str]:
    """The end-of-run lines of a compare() result."""
    from minigpt.units import si

    n, f = doc["bytes_per_step_numpy"], doc["bytes_per_step_fused"]
    sn, sf = doc["elementwise_s_per_micro_batch_numpy"], doc["elementwise_s_per_micro_batch_fused"]
    m = doc["micro_batches"]
    moved = (f"fusion: a step moved {si(f, 'B')} with the fused kernels, {si(n, 'B')} with NumPy's "
             f"passes ({100 * (n - f) / n:.0f}% less; {si(doc['bytes_saved'], 'B')} over "
             f"{doc['steps']} steps)")
    timed = (f"fusion: elementwise passes {1e3 * sf:.1f} ms fused, {1e3 * sn:.1f} ms NumPy's a "
             f"micro-batch; over the run, estimated: {m * sf:.2f} s fused, {m * sn:.2f} s NumPy's "
             f"({doc['how']})")
    return [moved, timed]


def save(out_dir, doc: dict) -> Path:
    path = Path(out_dir) / FILENAME
    safeio.write_text(path, json.dumps(doc, indent=1) + "\n")
    return path


def load(run_dir) -> dict | None:
    """A run's fusion.json, or None where there is none (a NumPy run) or it is unreadable."""
    try:
        doc = json.loads((Path(run_dir) / FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "bytes_per_step_numpy" in doc else None
