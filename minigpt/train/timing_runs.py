"""Measuring the time model (minigpt.hardware.timing) on this machine, and finding it again.

The products are measured on a grid of shapes (timing.measure_products); the elementwise ops and
the unmetered seconds between ops are measured by running the model itself, under the meter, on a
few small calibration shapes: a training step (forward, backward, clip, AdamW), a validation
forward, a prefill and decode steps, each the best of several tries. Every elementwise record
gives one (bytes per call, seconds per call) point of its op; each mode's wall seconds less its
metered seconds give the unmetered cost, fitted as seconds per call plus seconds per byte.

    time_model()     the careful model ($MINIGPT_HOME/hardware/local-timing.json, written by
                     `minigpt calibrate`), else the quick one cached on first use
    measure(quick)   a fresh TimeModel
"""

import time
from typing import NamedTuple

import numpy as np

from minigpt import config as config_module
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError
from minigpt.hardware import calibrate, timing
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import FlatBuffer, init
from minigpt.train.optim import AdamW
from minigpt.train.trainer import accumulate, update


class Shape(NamedTuple):
    """A calibration model: layers, width, heads, context, batch, vocabulary."""

    n_layer: int
    n_embd: int
    n_head: int
    seq: int
    batch: int
    vocab: int


QUICK_SHAPES = (Shape(2, 32, 2, 32, 2, 256), Shape(1, 128, 4, 128, 4, 1024),
                Shape(1, 256, 4, 256, 8, 4096))
CAREFUL_SHAPES = QUICK_SHAPES + (Shape(2, 384, 6, 384, 4, 2048), Shape(1, 512, 8, 512, 4, 8192))
DECODE_STEPS = 8


class ModeRun(NamedTuple):
    """One mode of one calibration shape, its best try: wall and metered seconds, calls, bytes,
    and the steps they were made in."""

    mode: str
    wall: float
    metered: float
    calls: int
    nbytes: int
    steps: int = 1


def build(s: Shape) -> tuple[GPT, AdamW]:
    """A GPT-2-initialised model of the shape and its optimizer."""
    cfg = config_module.ModelConfig(n_layer=s.n_layer, n_head=s.n_head, n_embd=s.n_embd,
                                    block_size=s.seq, vocab_size=s.vocab)
    params = init(cfg, np.random.default_rng(0))
    model = GPT(cfg, params)
    model.grads = FlatBuffer(cfg)
    return model, AdamW(params)


def step_functions(model: GPT, opt: AdamW, s: Shape) -> dict:
    """mode -> a function running one step of it under the meter: a training step of (batch,
    seq), a validation forward of the same, a prefill of seq tokens (batch 1), and DECODE_STEPS
    decode steps (batch 1, GPT.decode_step: generation's and the server's path) from position
    seq // 2."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, s.vocab, (s.batch, s.seq))
    y = rng.integers(0, s.vocab, (s.batch, s.seq))
    prompt = x[:1]
    half = x[:1, : s.seq // 2]

    def train():
        accumulate(model, [(x, y)], 1)
        update(model, opt, 1e-4, 1.0)

    def evaluate():
        with METER.in_phase("eval"):
            model.loss(x, y)

    def prefill():
        with METER.in_phase("prefill"):
            model.logits(prompt, KVCache(model.cfg, 1), last_only=True)

    # decode on the same weights, laid out as generation lays them out (its own GPT: the
    # training step's backward pass drops the layout), so on the step generation runs
    decoder = GPT(model.cfg, model.params)
    decoder.prepare_decode()
    cache = KVCache(model.cfg, 1)
    with METER.paused():
        decoder.logits(half, cache, last_only=True)
    filled = cache.length

    def decode():  # DECODE_STEPS tokens after the same prefix each try, as generation steps them
        cache.length = filled
        with METER.in_phase("decode"):
            for t in range(DECODE_STEPS):
                decoder.decode_step(x[0, t:t + 1], [cache])

    return {"train": train, "eval": evaluate, "prefill": prefill, "decode": decode}


def _run_once(fn) -> tuple[float, dict]:
    """Wall seconds of one fn() and the meter's records of it."""
    METER.reset()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, METER.records


def _fit_gap(runs: list[ModeRun], cache_bytes: int) -> tuple[float, float]:
    """Unmetered seconds = a * calls + b * bytes, least squares with a, b >= 0; each step's
    bytes as the time model counts them (timing.gap_bytes: a decode step's up to cache_bytes)."""
    gaps = [max(r.wall - r.metered, 0.0) for r in runs]
    xs = [(float(r.calls), r.steps * timing.gap_bytes(r.mode, r.nbytes / r.steps, cache_bytes)) for r in runs]
    saa = sum(a * a for a, _ in xs)
    sbb = sum(b * b for _, b in xs)
    sab = sum(a * b for a, b in xs)
    sag = sum(a * g for (a, _), g in zip(xs, gaps))
    sbg = sum(b * g for (_, b), g in zip(xs, gaps))
    det = saa * sbb - sab * sab
    if det > 0:
        a = (sag * sbb - sbg * sab) / det
        b = (saa * sbg - sab * sag) / det
        if a >= 0 and b >= 0:
            return a, b
    return (sag / saa if saa else 0.0), 0.0  # per call alone


def measure(quick: bool = True, shapes: tuple[Shape, ...] | None = None, grid=None,
            tries: int | None = None) -> timing.TimeModel:
    """A fresh time model of this machine (quick: a few seconds; careful: about a minute).
    shapes, grid, tries: other calibration shapes, product grid, tries than quick's or careful's."""
    tries = tries or (2 if quick else 5)
    grid = grid or (timing.GRID_QUICK if quick else timing.GRID_CAREFUL)
    shapes = shapes or (QUICK_SHAPES if quick else CAREFUL_SHAPES)
    load_before = timing.load_average()
    rates, stream, stream_rows, call_s = timing.measure_products(grid, tries + 1)
    packed = timing.measure_packed(tries + 1)
    points: dict[str, list] = {"generic": []}
    runs: list[ModeRun] = []
    saved = METER.records, METER.phase, METER.scope_path
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        steps = [(i, mode, fn) for i, shape in enumerate(shapes)
                 for mode, fn in step_functions(*build(shape), shape).items()]
        best: dict = {}
        for sweep in range(tries + 1):  # sweeps over every shape and mode; the first warms up
            for i, mode, fn in steps:
                wall, records = _run_once(fn)
                if sweep == 0:
                    continue
                for key, r in records.items():  # every try's points: tidy_points keeps the best
                    if key.kind != "matmul":
                        points.setdefault(f"{key.kind}/{key.op}", []).append(
                            ((r.bytes_read + r.bytes_written) / r.calls, r.seconds / r.calls))
                if wall < best.get((i, mode), (float("inf"),))[0]:
                    best[i, mode] = wall, records
        for (_, mode), (wall, records) in best.items():
            runs.append(ModeRun(mode, wall, sum(r.seconds for r in records.values()),
                                sum(r.calls for r in records.values()),
                                sum(r.bytes_read + r.bytes_written for r in records.values()),
                                DECODE_STEPS if mode == "decode" else 1))
    finally:
        METER.records, METER.phase, METER.scope_path = saved
    busy = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    elementwise = {k: timing.tidy_points(v) for k, v in points.items() if k != "generic"}
    elementwise["generic"] = timing.generic_points(tries)
    cache_bytes = timing.last_level_cache()
    gaps = {mode: _fit_gap([r for r in runs if r.mode == mode], cache_bytes) for mode in timing.MODES}
    return timing.TimeModel(
        grid=[list(g) for g in grid], rates=rates, stream_bandwidth=stream, call_s=call_s,
        elementwise=elementwise, gap_per_call={m: g[0] for m, g in gaps.items()},
        gap_per_byte={m: g[1] for m, g in gaps.items()}, busy_cores=busy,
        how="quick" if quick else "calibrate", measured_at=timing.now_iso(),
        load_average=[load_before, timing.load_average()], cores=timing.logical_cores(),
        tries=tries, cache_bytes=cache_bytes, packed=packed,
        stream_bandwidth_rows=stream_rows)


def cache_key() -> str:
    """The roofline cache's key (CPU model, BLAS variables), so both are found and lost together,
    and the kernels path: the fused kernels' elementwise ops are other ops than NumPy's passes."""
    from minigpt import kernels

    return f'{calibrate.cache_path().stem.removeprefix("roofline-")}-{kernels.active()}'


def time_model(measure_if_missing: bool = True) -> timing.TimeModel | None:
    """The careful model where `minigpt calibrate` wrote one, else the quick one, measured and
    cached on first use (a damaged cache is measured again, not trusted)."""
    careful = timing.calibrated_path()
    if careful.is_file():
        try:
            return timing.load(careful)
        except ConfigError:
            pass  # unreadable: the quick one instead
    path = timing.cache_path(cache_key())
    if path.is_file():
        try:
            return timing.load(path)
        except ConfigError:
            path.unlink(missing_ok=True)
    if not measure_if_missing:
        return None
    model = measure(quick=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    timing.save(model, path)
    return model
