"""The time model: predicted seconds of every op from its counts and shape, calibrated on this machine.

A step's predicted seconds are the sum over its calls (closed_form.op_calls) of what the meter
would time for each, plus what the meter does not time (Python between the ops):

    product (batch, m, k, n):  call_s + max(batch * 2mkn / rate(m, k, n), bytes / stream_bandwidth)
                               (the second only when the step moves more than the cache holds)
    elementwise (kind, op):    seconds(bytes per call), interpolated in that op's measured points
    unmetered, per step:       gap_per_call[mode] * calls + gap_per_byte[mode] * bytes
                               (a decode step's bytes up to cache_bytes: gap_bytes)

- rate(m, k, n) is the FLOP/s of one (m, k) @ (k, n) float32 product measured on a grid of sizes
  (GRID_QUICK or GRID_CAREFUL: sizes of m, of k and of n, each point measured inside a batched
  call so the per-call cost is left out), interpolated linearly in log(rate) over log(m), log(k), log(n) and
  held at the grid's edge beyond it (products larger than the grid run at its largest rate).
- stream_bandwidth is the bytes/s of products whose weights come from memory (m = 1, eight
  distinct 16 MiB weights one after another, as a decode step streams its layers'): a product
  cannot beat reading its operands, so the bound holds for skinny products, where a step moves
  more bytes than the last-level cache holds (cache_bytes, from the system's cache description).
  The grid's products reuse one B, as a layer's weights are reused, so a small model's decode
  step, whose weights stay in the cache, runs at the grid's rates.
- call_s is the seconds of the smallest counted product, the fixed cost of one call.
- an elementwise op's points are (bytes per call, seconds per call) measured by running the
  model's own layers (minigpt.train.timing_runs); between points the seconds are interpolated
  log-log, above the largest the op keeps its achieved bandwidth there (seconds in proportion to
  bytes), below the smallest it costs what the smallest did; a call moving more than the cache
  holds takes at least its bytes / stream_bandwidth (the calibration's ops fit in the cache, an
  optimizer step over GPT-2's 124M parameters does not). An op never measured uses "generic", a
  plain add's points.
- gap_per_call and gap_per_byte are fitted per mode (train, eval, prefill, decode) to the wall
  seconds of the calibration runs less their metered seconds; decode is calibrated on a model
  prepared as generation prepares it (GPT.prepare_decode), so on the compiled step where
  generation runs one (nn/compiled.py).

Known limits (docs/costs.md): float32 products only (int8 and float64 products use the float32
rate); one thread count (the one calibrated); cache effects beyond what the grid and the points
saw; a machine under other load runs slower than its calibration, and the prediction says when the
calibration itself was taken under load.
"""

import datetime
import json
import math
import os
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from minigpt import safeio
from minigpt.counting.closed_form import OpCall
from minigpt.counting.meter import METER, matmul, packed_dtype
from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.kernels import tiles

# the sizes of m, of k and of n measured: m = 1 is a decode step's product; k and n start at a
# head's width (a product with k or n below the grid's first is held at it: a few such products
# are a decode step's first positions, where the call's fixed cost is all that shows)
GRID_QUICK = ((1, 16, 64, 256, 1024), (16, 64, 256, 1024), (16, 64, 256, 1024))
GRID_CAREFUL = ((1, 8, 64, 256, 1024, 2048), (8, 64, 256, 1024, 2048), (8, 64, 256, 1024, 2048))
MODES = ("train", "eval", "prefill", "decode")
STREAM_ROWS = 4  # the rows of the second stream figure: OpenBLAS packs B for any product of 2 or more
# the packed-weight kernels (kernels/quant.py) measured: weight widths, and sequences a product
PACKED_BITS = (16, 8, 4)
PACKED_M = (1, 4, 16)
TILED_M = (1, 8, 32)  # rows of the float32 tiled kernel measured (kernels/tiles.py), held beyond
PACKED_BYTES = 64 << 20  # the packed weight each is measured on: twice a 32 MiB last-level cache
VERSION = 7  # a file of another version is measured again, not trusted


@dataclass
class TimeModel:
    """This machine's measured figures for the time model (see the module's docstring)."""

    grid: list[list[int]]  # the sizes of m, of k and of n measured
    rates: list  # rates[i][j][l]: FLOP/s of an (m_i, k_j) @ (k_j, n_l) product
    stream_bandwidth: float  # bytes/s of a product streaming its weights from memory
    call_s: float  # seconds of one smallest counted product
    elementwise: dict[str, list[list[float]]]  # "kind/op" -> [[bytes per call, seconds], ...]
    gap_per_call: dict[str, float]  # mode -> unmetered seconds per metered call
    gap_per_byte: dict[str, float]  # mode -> unmetered seconds per metered byte
    busy_cores: float  # CPU seconds per wall second while the calibration ran the model
    how: str = "quick"  # "quick" (cached on first use) or "calibrate" (minigpt calibrate)
    measured_at: str = ""  # ISO 8601, UTC
    load_average: list[float] = field(default_factory=list)  # 1-minute load before, after
    cores: int = 1  # logical cores this process may use
    tries: int = 1  # best of this many tries each
    cache_bytes: int = 32 << 20  # the last-level cache: a step moving less stays in it
    # "w8a32" -> [[m, FLOP/s], ...]: the packed-weight kernels streaming a PACKED_BYTES weight,
    # and "float32" the tiled float32 kernel's (measured where Numba runs them; empty elsewhere)
    packed: dict[str, list[list[float]]] = field(default_factory=dict)
    # bytes/s of the same weights times STREAM_ROWS rows: BLAS copies each weight into its packed
    # panels first, so a few rows stream at a fraction of one row's rate (0: not measured)
    stream_bandwidth_rows: float = 0.0
    version: int = VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def constant(cls, flops: float, bandwidth: float, call_s: float, gap_per_call: float = 0.0,
                 busy_cores: float = 1.0) -> "TimeModel":
        """A machine with one product rate for every shape, one bandwidth for every elementwise
        op (each call costing at least call_s), and gap_per_call between calls: for what-if
        questions and for tests that must not depend on this machine's speed."""
        return cls(grid=[[1, 4096]] * 3, rates=[[[flops] * 2] * 2] * 2, stream_bandwidth=bandwidth,
                   call_s=call_s, elementwise={"generic": [[bandwidth * call_s, call_s]]},
                   gap_per_call=dict.fromkeys(MODES, gap_per_call),
                   gap_per_byte=dict.fromkeys(MODES, 0.0), busy_cores=busy_cores, how="given",
                   measured_at=now_iso(), load_average=[0.0, 0.0], cores=logical_cores())

    @classmethod
    def from_json(cls, d: dict, where: str = "time model") -> "TimeModel":
        try:
            m = cls(**d)
            shape = np.shape(np.asarray(m.rates, dtype=float))
            ok = (m.version == VERSION and len(m.grid) == 3 and shape == tuple(map(len, m.grid))
                  and all(len(g) >= 2 for g in m.grid) and m.stream_bandwidth > 0
                  and all(mode in m.gap_per_call for mode in MODES) and "generic" in m.elementwise)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"{where}: not a minigpt time model (version {VERSION})")
        return m

    # --------------------------------------------------------------------------- the figures

    def rate(self, m: int, k: int, n: int) -> float:
        """FLOP/s of one (m, k) @ (k, n) float32 product: log-linear in the grid, clamped."""
        table = np.log(np.asarray(self.rates, dtype=float))
        corners = []
        for size, axis in zip((m, k, n), self.grid):
            logs = [math.log(g) for g in axis]
            x = min(max(math.log(max(size, 1)), logs[0]), logs[-1])
            i = min(max(bisect_left(logs, x) - 1, 0), len(logs) - 2)
            w = (x - logs[i]) / (logs[i + 1] - logs[i])
            corners.append(((i, 1 - w), (i + 1, w)))
        value = 0.0
        for i, wi in corners[0]:
            for j, wj in corners[1]:
                for l_, wl in corners[2]:
                    value += wi * wj * wl * table[i, j, l_]
        return math.exp(value)

    def packed_rate(self, dtype: str, m: int) -> float | None:
        """FLOP/s of an (m, k) @ packed (k, n) product of this weight width ("w4a8"), log-linear
        in log m between the measured points and held beyond them; None where not measured."""
        points = self.packed.get(dtype)
        return log_linear(points, max(m, 1)) if points else None

    def elementwise_seconds(self, kind: str, op: str, nbytes: float) -> float:
        """Seconds of one call of an elementwise op moving nbytes (see the module's docstring)."""
        points = self.elementwise.get(f"{kind}/{op}") or self.elementwise["generic"]
        return interpolate(points, nbytes)

    def call_seconds(self, call: OpCall, streaming: bool = True, packed: bool = False) -> float:
        """What the meter would time for one call; streaming: its operands come from memory (the
        step moves more than the cache holds), so a product takes at least its bytes' time;
        packed: the step runs on the decode kernels: a product with packed weights on the packed
        kernels, a float32 weight product on the tiled one (nn/tiled.py; at
        their measured rates, which include streaming the weight), not on NumPy's product."""
        nbytes = call.bytes_read + call.bytes_written
        if call.shape is not None:
            b, m, k, n = call.shape
            kernel = call.key.dtype != "float32" or b == 1  # a weight's product, not attention's
            rate = self.packed_rate(call.key.dtype, m) if packed and kernel else None
            if rate is not None:
                return self.call_s + b * 2 * m * k * n / rate
            compute = b * 2 * m * k * n / self.rate(m, k, n)
            bandwidth = self.stream_bandwidth_rows if m > 1 and self.stream_bandwidth_rows else self.stream_bandwidth
            stream = nbytes / bandwidth if streaming else 0.0
            return self.call_s + max(compute, stream)
        seconds = self.elementwise_seconds(call.key.kind, call.key.op, nbytes)
        if nbytes > self.cache_bytes:  # from memory: no faster than the memory delivers
            seconds = max(seconds, nbytes / self.stream_bandwidth)
        return seconds

    def gap_seconds(self, mode: str, calls: int, nbytes: float) -> float:
        """Unmetered seconds of a step of `calls` calls moving `nbytes` in all (a decode step's
        bytes counted up to the cache's: gap_bytes)."""
        return self.gap_per_call[mode] * calls + self.gap_per_byte[mode] * gap_bytes(mode, nbytes, self.cache_bytes)


def gap_bytes(mode: str, nbytes: float, cache_bytes: int) -> float:
    """The bytes of a step that its unmetered seconds grow with. A decode step allocates nothing
    the size of its weights; what grows with its bytes is the Python between its kernels (or
    around its one compiled call) finding the caches flushed by what the kernels streamed, and
    a step can flush no more than the whole last-level cache: so its bytes count up to
    cache_bytes. Fitted on steps of 0.2-8 MB, the uncapped term put 5-40 ms of Python into
    each step of GPT-2 124M (500 MB at float32), where it spends 0.2-0.4 (bench/step_floor.py).
    Other modes' unmetered work (allocating and zeroing arrays) grows with all their bytes."""
    return min(nbytes, cache_bytes) if mode == "decode" else nbytes


def log_linear(points: list[list[float]], x: float) -> float:
    """y at x from sorted [x, y] points (x > 0, y > 0): linear in log y over log x between them,
    held at the first and last beyond them."""
    if len(points) == 1:
        return points[0][1]
    xs = [math.log(p[0]) for p in points]
    lx = min(max(math.log(x), xs[0]), xs[-1])
    i = min(max(bisect_left(xs, lx) - 1, 0), len(xs) - 2)
    w = (lx - xs[i]) / (xs[i + 1] - xs[i])
    return math.exp((1 - w) * math.log(points[i][1]) + w * math.log(points[i + 1][1]))


def interpolate(points: list[list[float]], nbytes: float) -> float:
    """Seconds at nbytes from sorted (bytes, seconds) points: log-log between them, constant
    below the first, constant bandwidth above the last."""
    xs = [p[0] for p in points]
    if nbytes <= xs[0]:
        return points[0][1]
    if nbytes >= xs[-1]:
        return points[-1][1] * nbytes / xs[-1]
    i = bisect_left(xs, nbytes)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    w = (math.log(nbytes) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp((1 - w) * math.log(y0) + w * math.log(y1))


def tidy_points(raw: list[tuple[float, float]]) -> list[list[float]]:
    """Measured (bytes, seconds) pairs -> sorted points: the fastest of the pairs within 10% in
    bytes of each other (best of the tries), then seconds made non-decreasing in bytes (an op
    never takes less time for more bytes; a lower later point is a disturbed earlier one)."""
    out: list[list[float]] = []
    for b, s in sorted((float(b), float(s)) for b, s in raw if b > 0 and s > 0):
        if out and b <= out[-1][0] * 1.1:
            out[-1][1] = min(out[-1][1], s)
        else:
            out.append([b, s])
    for i in range(len(out) - 2, -1, -1):  # from the right: each at most the next
        out[i][1] = min(out[i][1], out[i + 1][1])
    return out


# ----------------------------------------------------------------------------- prediction


@dataclass
class StepTime:
    """A step's predicted seconds: metered by record key, and the unmetered rest."""

    by_key: dict  # RecordKey -> predicted metered seconds
    unmetered: float  # s
    calls: int

    @property
    def seconds(self) -> float:
        return sum(self.by_key.values()) + self.unmetered


def predict_calls(model: TimeModel, calls: list[OpCall], mode: str, packed: bool = False) -> StepTime:
    """The predicted seconds of one step made of these calls (closed_form.op_calls); packed: its
    packed-weight products run on the packed kernels (TimeModel.call_seconds)."""
    by_key: dict = {}
    nbytes = sum(c.bytes_read + c.bytes_written for c in calls)
    streaming = nbytes > model.cache_bytes
    for c in calls:
        by_key[c.key] = by_key.get(c.key, 0.0) + model.call_seconds(c, streaming, packed)
    return StepTime(by_key, model.gap_seconds(mode, len(calls), nbytes), len(calls))


# ----------------------------------------------------------------------------- measuring products


def _best(fn, tries: int, min_s: float = 2e-3) -> float:
    """Best seconds of one fn() over `tries` tries, each repeating fn until min_s has passed."""
    fn()
    best = float("inf")
    for _ in range(tries):
        reps, t0 = 0, time.perf_counter()
        while True:
            fn()
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_s:
                break
        best = min(best, elapsed / reps)
    return best


def measure_products(grid, tries: int, target_flops: float = 1e7) -> tuple[list, float, float, float]:
    """(rates on the grid (sizes of m, of k, of n), stream bandwidth of one row, of STREAM_ROWS
    rows, seconds of the smallest call), each the best of `tries`."""
    rng = np.random.default_rng(0)
    ms, ks, ns = grid
    rates = [[[0.0] * len(ns) for _ in ks] for _ in ms]
    x = rng.standard_normal((1, 1024), dtype=np.float32)
    # 8 distinct weights, 128 MiB: streamed one after another, as a decode step streams its layers'
    # (one 64 MiB weight streams about a quarter faster than a model's many do)
    weights = [np.ones((1024, 4096), dtype=np.float32) for _ in range(8)]
    streamed = x.nbytes * len(weights) + sum(w.nbytes + 4096 * 4 for w in weights)

    def stream_pass(x):
        for w in weights:
            matmul(x, w)

    rows = rng.standard_normal((STREAM_ROWS, 1024), dtype=np.float32)
    streamed_rows = streamed + (rows.nbytes - x.nbytes + (STREAM_ROWS - 1) * 4096 * 4) * len(weights)

    one = np.ones((1, 1), dtype=np.float32)
    stream, stream_rows, call_s = 0.0, 0.0, float("inf")
    with METER.paused():  # the model's own product path, left out of the records
        for _ in range(tries):  # sweeps of everything: a disturbance spoils one try, not all
            for i, m in enumerate(ms):
                for j, k in enumerate(ks):
                    for l_, n in enumerate(ns):
                        flops = 2 * m * k * n
                        batch = int(min(max(target_flops // flops, 1), 256))
                        a = rng.standard_normal((batch, m, k), dtype=np.float32)
                        b = rng.standard_normal((k, n), dtype=np.float32)  # reused, as weights are
                        rate = batch * flops / _best(lambda a=a, b=b: matmul(a, b), 1)
                        rates[i][j][l_] = max(rates[i][j][l_], rate)
            stream = max(stream, streamed / _best(lambda: stream_pass(x), 1, 0.0))
            stream_rows = max(stream_rows, streamed_rows / _best(lambda: stream_pass(rows), 1, 0.0))
            call_s = min(call_s, _best(lambda: matmul(one, one), 1))
    return rates, stream, stream_rows, call_s


def measure_packed(tries: int, nbytes: int = PACKED_BYTES) -> dict[str, list[list[float]]]:
    """{"w8a32": [[m, FLOP/s], ...], ...} (keys: meter.packed_dtype): each packed-weight kernel
    (kernels/quant.py) on an nbytes packed weight of random values, for m in PACKED_M sequences,
    and "float32": the tiled float32 kernel (kernels/tiles.py) for m in TILED_M; the best of
    `tries` sweeps; {} where the kernels do not run (NumPy's path, no Numba)."""
    from minigpt import kernels

    if kernels.active() != "numba":
        return {}
    from minigpt.kernels import quant

    rng = np.random.default_rng(0)
    K = 1024
    weights = {}
    for bits in PACKED_BITS:
        W = tiles.WIDTH
        T = max(nbytes * 8 // (bits * K * W), 1)
        if bits == 16:  # fp16 patterns of magnitudes below 2 (no infinities or NaNs)
            weights[bits] = (rng.integers(0, 0x4000, (T, K, W), dtype=np.uint16), None)
        elif bits == 8:
            weights[bits] = (rng.integers(-127, 128, (T, K, W), dtype=np.int8),
                             rng.random((T, W), dtype=np.float32))
        else:
            weights[bits] = (rng.integers(0, 256, (T, K // 2, W), dtype=np.uint8),  # fp16 scales
                             rng.random((T, K // 32, W), dtype=np.float32).astype(np.float16).view(np.uint16))
    best = {(bits, m): float("inf") for bits in PACKED_BITS for m in PACKED_M}
    tiles_f32 = tiles.pack(rng.standard_normal((K, nbytes // (4 * K)), dtype=np.float32))
    best.update({(32, m): float("inf") for m in TILED_M})
    with METER.paused():
        for _ in range(tries):  # sweeps, as the grid's
            for bits, (data, scale) in weights.items():
                M = data.shape[0] * data.shape[2]
                for m in PACKED_M:
                    x = rng.standard_normal((m, K), dtype=np.float32)
                    s = _best(lambda x=x, d=data, s=scale, b=bits, M=M: quant.product(x, b, d, s, False, M), 1, 0.0)
                    best[bits, m] = min(best[bits, m], s)
            for m in TILED_M:
                x = rng.standard_normal((m, K), dtype=np.float32)
                best[32, m] = min(best[32, m], _best(lambda x=x: tiles.product(x, *tiles_f32), 1, 0.0))
    rates = {packed_dtype(bits): [[m, 2 * m * K * weights[bits][0].shape[0] * weights[bits][0].shape[2]
                                   / best[bits, m]] for m in PACKED_M] for bits in PACKED_BITS}
    rates["float32"] = [[m, 2 * m * K * (nbytes // (4 * K)) / best[32, m]] for m in TILED_M]
    return rates


def generic_points(tries: int) -> list[list[float]]:
    """A plain add (two inputs, one output) at sizes from 4 KiB to 64 MiB: the fallback points."""
    raw = []
    for nbytes in (4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20):
        a = np.ones(nbytes // 4, dtype=np.float32)
        b, c = a.copy(), np.empty_like(a)
        s = _best(lambda a=a, b=b, c=c: np.add(a, b, out=c), tries, 0.0 if nbytes > (4 << 20) else 2e-3)
        raw.append((3 * nbytes, s))
    return tidy_points(raw)


def last_level_cache() -> int:
    """Bytes of the largest CPU cache the system describes (32 MiB where it describes none)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            best = max(best, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1:], 0))
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def load_average() -> float:
    """The 1-minute load average (0 where the system has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def logical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- files


def cache_path(key: str) -> Path:
    """$MINIGPT_HOME/cache/timing-<key>.json: the quick model, keyed like the roofline's cache."""
    return profiles.user_dir().parent / "cache" / f"timing-{key}.json"


def calibrated_path() -> Path:
    """$MINIGPT_HOME/hardware/local-timing.json: the careful model `minigpt calibrate` writes."""
    return profiles.user_dir() / "local-timing.json"


def save(model: TimeModel, path: Path) -> Path:
    return safeio.write_text(path, json.dumps(model.to_json(), indent=1) + "\n")


def load(path: Path) -> TimeModel:
    """The time model in a file; ConfigError (one line) when it is unreadable or not one."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: not a minigpt time model")
    return TimeModel.from_json(d, str(path))


def provenance(model: TimeModel) -> str:
    """Where the figures came from: "quick measurement of 2026-12-06 15:01 UTC, load 0.4 on 2
    cores" (the load average before and after, the higher shown)."""
    when = model.measured_at.replace("T", " ")[:16] + " UTC" if model.measured_at else "unknown time"
    what = {"calibrate": "minigpt calibrate", "quick": "quick measurement"}.get(model.how, model.how)
    load = max(model.load_average) if model.load_average else 0.0
    return f"{what} of {when}, load average {load:.2g} on {model.cores} cores"


def suspect(model: TimeModel) -> str:
    """Why the figures may be low, or "": measured while other work kept the cores busy."""
    load = max(model.load_average) if model.load_average else 0.0
    if load > 0.5 * model.cores:
        return (f"measured under load (load average {load:.2g} on {model.cores} cores): "
                f"its figures may be low (a quiet machine runs faster than predicted); "
                f"`minigpt calibrate` on a quiet machine")
    return ""
