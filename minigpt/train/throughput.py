"""One process's training speed per config on this machine, remembered, so that a data-parallel
run can print its own tokens/s beside it.

A run of one process with the default threads (no thread variable set) that trains at least
MIN_STEPS steps records its tokens/s (its tokens over its summed step time, the figure
log.jsonl's tokens and elapsed_s give) in $MINIGPT_HOME/cache/throughput.json, keyed by this
machine's CPU model and usable cores and by what sets a step's cost: the [model] section and
[train] batch_size, grad_accum, dtype and device. `mpiexec -n N python train.py` looks its config
up there at the end. A damaged or unwritable file is ignored: it is a convenience, never a reason
for a run to fail.
"""

import datetime
import hashlib
import json
import os
from pathlib import Path

from minigpt import safeio
from minigpt.errors import MiniGPTError
from minigpt.hardware import blas, cpu_power, profiles

MIN_STEPS = 20  # fewer steps are mostly warm-up: not recorded
THREAD_VARS = ("MINIGPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def path() -> Path:
    """$MINIGPT_HOME/cache/throughput.json."""
    return profiles.user_dir().parent / "cache" / "throughput.json"


def key(cfg) -> str:
    """This machine and the parts of a config that set the cost of a training step, hashed."""
    t = cfg.train
    what = {"cpu": cpu_power.cpu_model(), "cores": blas.usable_cores(), "model": cfg.to_dict()["model"],
            "train": [t.batch_size, t.grad_accum, t.dtype, t.device]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _read() -> dict:
    try:
        doc = json.loads(path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def remember(cfg, tokens: int, seconds: float, steps: int) -> bool:
    """Record one process's tokens / seconds over `steps` steps for cfg, if the run qualifies
    (enough steps, default threads). Returns whether it was recorded."""
    if steps < MIN_STEPS or seconds <= 0 or any(os.environ.get(v) for v in THREAD_VARS):
        return False
    doc = _read()
    doc[key(cfg)] = {"tokens_per_s": tokens / seconds, "steps": steps,
                     "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        safeio.make_dir(path().parent)
        safeio.write_text(path(), json.dumps(doc, indent=1, sort_keys=True) + "\n")
    except (MiniGPTError, OSError):
        return False
    return True


def recall(cfg) -> dict | None:
    """One process's recorded figure for cfg on this machine ({"tokens_per_s", "steps", "when"}),
    or None."""
    entry = _read().get(key(cfg))
    if not (isinstance(entry, dict) and isinstance(entry.get("tokens_per_s"), (int, float))
            and entry["tokens_per_s"] > 0):
        return None
    return entry
