"""The counted path: every matrix product and every elementwise pass of the model goes through here.

A record is keyed by where the work happened and what it was, a RecordKey:

    (scope, op, kind, phase, dtype) -> calls, flops, useful_flops, bytes_read, bytes_written, seconds

- scope: the layer path, e.g. "h3.attn.c_attn", set by `with METER.scope("h3"):` blocks;
- op:    the operation inside that layer, e.g. "x@w" or "grad_w";
- kind:  "matmul", or an elementwise kind ("layernorm", "gelu", "softmax", ...);
- phase: "forward", "backward", "optimizer", "eval", "prefill", "decode" or "communication"
         (data-parallel allreduces, minigpt.train.dist).

Counting conventions (docs/costs.md has the long form, and minigpt.counting.closed_form predicts every record):

- matmul (..., M, K) @ (..., K, N): 2 * batch * M * N * K FLOPs; A and B read once, C written
  once, each at its dtype's size. `useful_flops` leaves out the products a causal mask throws away.
- elementwise kinds: FLOPS_PER_ELEMENT[kind, op] per element of the op's main operand, and
  inputs read once and outputs written once. A block opened with `METER.op(kind=..., op=...)`
  looks its own FLOPs per element up: the caller reports elements and bytes.
- allreduce (phase "communication"): bytes_read = bytes this rank sends, bytes_written = bytes it
  receives, each 2 (N - 1) / N x the buffer for N ranks (a ring); FLOPs the (N - 1) / N x elements
  additions it does.

This module imports only the backend: the model uses it, the cost reports read it.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from minigpt import backend

PHASES = ("forward", "backward", "optimizer", "eval", "prefill", "decode", "communication")

# FLOPs per element of the main operand, for every elementwise op the model runs. One table, read
# by the layers when they count and by the closed-form cost model when it predicts.
FLOPS_PER_ELEMENT = {
    ("embedding", "lookup"): 1,  # out = wte[idx] + wpe[t]: one add per output element
    ("embedding", "grad_table"): 1,  # scatter-add of dout into wte rows, one add per element
    ("embedding", "grad_position"): 1,  # dwpe += sum over the batch
    ("layernorm", "normalize"): 7,  # mean, centre, square, sum, scale, * w, + b
    ("layernorm", "grad"): 11,  # dw (2), db (1), dxhat (1), two means (3), dx (4)
    ("bias", "add"): 1,  # out += b
    ("bias", "grad"): 1,  # db += column sums of dout
    ("softmax", "causal"): 7,  # scale, mask, max, subtract, exp, sum, divide (per score)
    ("softmax", "grad"): 5,  # datt * att, row sum, att * sum, subtract, * scale
    ("gelu", "tanh"): 8,  # x*x, scale, +, *x, tanh (counted as one), 1+, *x, *0.5
    ("gelu", "grad"): 11,  # polynomial (4), 1 - th^2 (2), *, th/2 (1), + (2), * dout
    ("residual", "add"): 1,  # x + branch
    ("residual", "grad"): 1,  # the branch gradient added into the stream's
    ("dropout", "mask"): 2,  # compare against p, multiply by mask / (1 - p)
    ("dropout", "grad"): 1,  # dout * mask
    ("cross_entropy", "loss"): 5,  # max, subtract, exp, sum, divide (probabilities kept for grad)
    ("cross_entropy", "grad"): 1,  # probs - onehot, / N (counted per logit)
    ("zero_grad", "fill"): 0,  # a write of every gradient element, no arithmetic
    ("clip", "norm"): 2,  # square and sum over every gradient element
    ("clip", "scale"): 1,  # g *= min(1, max_norm / norm), run every step
    ("quant", "quantize"): 4,  # |x|, row max, divide by the scale, round (clip free)
    ("quant", "rescale"): 1,  # per scale factor applied to each output element
    ("quant", "outlier_add"): 1,  # the outlier dimensions' float product added into the output
    ("embedding", "lookup_int8"): 2,  # widen-and-scale the int8 row, add the position
    ("router", "softmax"): 5,  # max, subtract, exp, sum, divide (per router logit)
    ("router", "top_k"): 1,  # one comparison per logit to pick each token's experts
    ("router", "renormalize"): 2,  # sum of the picked probabilities, divide (per pick)
    ("router", "aux_loss"): 1,  # the mean router probability of each expert (per logit)
    ("router", "renormalize_grad"): 4,  # dg * gate, row sum, subtract, divide (per pick)
    ("router", "softmax_grad"): 5,  # + aux-loss gradient, dp * p, row sum, subtract, * p
    ("gather", "last_rows"): 0,  # an extend step's last row of each sequence, for the head
    ("dispatch", "gather"): 0,  # copy a token's row to its expert: bytes only (per element)
    ("dispatch", "grad"): 1,  # scatter-add the expert's dx into the token's row
    ("combine", "scatter"): 2,  # gate * expert output, added into the token's row
    ("combine", "grad"): 3,  # dout * gate for the expert; dout . output for the gate (2)
    ("adamw", "update"): 14,  # decay (1), first moment (3), second (4), denominator (3), step (3)
    # The fused schedule (minigpt/kernels/fused.py): one pass each, so the counts are what each
    # kernel's loop does per element, recomputing what NumPy's passes keep in memory.
    ("layernorm", "normalize_fused"): 8,  # sum, centre, square, sum; centre, * rstd, * w, + b
    ("layernorm", "residual_normalize"): 9,  # the residual add, then normalize_fused's 8
    ("layernorm", "grad_fused"): 16,  # xhat (2), dw (2), db (1), dxhat (1), sums (3); dx (7)
    ("layernorm", "grad_residual"): 17,  # grad_fused's 16, its dx added into the stream's (1)
    ("gelu", "bias_tanh"): 10,  # + b, u*u, * c, + 1, * u, * k, tanh, 1 + t, * u, * 0.5
    ("gelu", "grad_bias"): 20,  # + b, u*u, tanh's argument (4) and tanh, slope (11), * dout, db
    ("softmax", "causal_fused"): 7,  # per visible score: scale, max, scale, subtract, exp, sum, * 1/sum
    ("softmax", "grad_fused"): 5,  # per visible score: datt * att, sum, subtract, * att, * scale
}


_DTYPE_NAMES: dict = {}


def dtype_name(dtype) -> str:
    """str(dtype), cached: NumPy's own conversion is slow enough to show in a decode step."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


INT8 = "int8"  # the dtype of an integer product's records: int8 operands, int32 sums
W8A32 = "w8a32"  # the dtype of a product of float activations and int8 weights


def packed_dtype(bits: int) -> str:
    """The records' dtype of a product with packed `bits`-bit weights (nn/lowbit.py): w16a32 and
    w8a32 widen the weights to the float32 activations; w4a8 rounds the activations to int8 (one
    scale per row and group) and multiplies integers (minigpt/kernels/quant.py)."""
    return "w4a8" if bits == 4 else f"w{bits}a32"


class RecordKey(NamedTuple):
    """Where the work happened and what it was (see the module's docstring)."""

    scope: str
    op: str
    kind: str
    phase: str
    dtype: str


@dataclass(slots=True)
class Record:
    calls: int = 0
    flops: int = 0
    useful_flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


class Counter:
    """An elementwise block being timed (see Meter.op): it reports its sizes with count(), and the
    record is added when the block closes. A class rather than a generator context manager: a
    decode step enters a few hundred of these, and the difference shows."""

    __slots__ = ("bytes_read", "bytes_written", "dtype", "flops", "flops_per_element", "kind",
                 "meter", "op", "t0")

    def __init__(self, meter, kind: str, op: str):
        self.meter, self.kind, self.op = meter, kind, op
        self.flops_per_element = FLOPS_PER_ELEMENT[kind, op]  # an op missing there fails here

    def count(self, elements: int, bytes_read: int, bytes_written: int, dtype) -> None:
        """The block's sizes: elements of its main operand (FLOPS_PER_ELEMENT[kind, op] FLOPs
        each), the bytes it read and wrote, and the dtype to record it under. Every block calls
        it once (a block that does not fails as it closes, rather than record nothing)."""
        self.flops = self.flops_per_element * int(elements)
        self.bytes_read = int(bytes_read)
        self.bytes_written = int(bytes_written)
        self.dtype = _DTYPE_NAMES.get(dtype) or dtype_name(dtype)  # dtype_name, less a call

    def __enter__(self):
        self.t0 = self.meter.clock()
        return self

    def __exit__(self, *exc):
        m = self.meter
        if m.enabled and exc[0] is None:
            m._record(self.op, self.kind, self.dtype, self.flops, self.bytes_read,
                      self.bytes_written, m.clock() - self.t0, None)
        return False


_PATHS: dict = {}  # (outer path, name) -> joined path: a decode step enters a few hundred scopes


class _Scope:
    """`with METER.scope("h3"):` appends a name to the scope path for the block."""

    __slots__ = ("meter", "name", "outer")

    def __init__(self, meter, name: str):
        self.meter, self.name = meter, name

    def __enter__(self):
        m = self.meter
        self.outer = m.scope_path
        path = _PATHS.get((self.outer, self.name))
        if path is None:
            path = _PATHS[self.outer, self.name] = f"{self.outer}.{self.name}" if self.outer else self.name
        m.scope_path = path

    def __exit__(self, *exc):
        self.meter.scope_path = self.outer
        return False


class Meter:
    def __init__(self):
        self._records: dict[RecordKey, Record] = {}
        self._held: list = []  # sources of counts not yet added (hold)
        self.scope_path = ""
        self.phase = "forward"
        self.enabled = True
        self.clock = time.perf_counter  # a GPU profiling mode swaps in a synchronizing clock

    @property
    def records(self) -> dict:
        """The table of records, {RecordKey: Record}, every count held back (hold) added first."""
        if self._held:
            self.flush()
        return self._records

    @records.setter
    def records(self, table: dict) -> None:
        """Swap in another table (a tracker's fresh one, the outer one back): the counts held
        back go into the table they were counted for first."""
        if self._held:
            self.flush()
        self._records = table

    def reset(self) -> None:
        self.records = {}

    def context(self) -> tuple:
        """(the current table, phase, scope path): where counts added now would go."""
        return self._records, self.phase, self.scope_path

    def hold(self, source) -> None:
        """Let source keep counts back and add them later: source.flush() adds them into Record
        objects it holds, before anyone reads or swaps the records. For a caller that adds the
        same records many times a second (the compiled decode step, nn/compiled.py: one
        addition a step in place of some 170 records' six each)."""
        if not any(h is source for h in self._held):
            self._held.append(source)

    def flush(self) -> None:
        """Add every count held back (hold)."""
        held, self._held = self._held, []
        for source in held:
            source.flush()

    def scope(self, name: str) -> _Scope:
        return _Scope(self, name)

    @contextmanager
    def paused(self):
        """Products and ops inside run uncounted (for micro-benchmarks such as calibrate)."""
        outer, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = outer

    @contextmanager
    def in_phase(self, phase: str):
        assert phase in PHASES, phase
        outer, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = outer

    @contextmanager
    def synchronizing(self, on: bool = True):
        """Profiling mode: inside, each record's clock reads wait for backend.synchronize() first.

        On a GPU the normal path only times the launches: a kernel returns before its work is
        done, and its time lands on whichever later op waits. Synchronizing around every op puts
        each kernel's time on its own record, at the price of the overlap between host and device
        (steps run slower), so use it to see where time goes, not to time steps. On the CPU it
        changes nothing. `on=False` leaves the clock as it is (for `with METER.synchronizing(flag)`)."""

        def clock() -> float:
            backend.synchronize()
            return time.perf_counter()

        outer = self.clock
        if on:
            self.clock = clock
        try:
            yield
        finally:
            self.clock = outer

    def add(self, *, kind: str, op: str, dtype, flops: int, bytes_read: int, bytes_written: int,
            seconds: float, useful_flops: int | None = None) -> None:
        """Add one call's counts to the record of (the current scope, op, kind, the current phase,
        dtype): for work that is neither a product nor an elementwise block (an allreduce), or a
        kernel that times itself. Nothing while the meter is paused, as for matmul and op."""
        if self.enabled:
            self._record(op, kind, dtype_name(dtype), flops, bytes_read, bytes_written, seconds,
                         useful_flops)

    def record(self, scope: str, op: str, kind: str, dtype: str) -> Record:
        """The record of (scope, op, kind, the current phase, dtype), made if new: for a caller
        that adds many ops' counts at once (the compiled decode step, nn/compiled.py). scope is
        the whole path."""
        key = RecordKey(scope, op, kind, self.phase, dtype)
        r = self._records.get(key)
        if r is None:
            r = self._records[key] = Record()
        return r

    def _record(self, op: str, kind: str, dtype: str, flops: int, bytes_read: int,
                bytes_written: int, seconds: float, useful_flops: int | None) -> None:
        """add() with positional arguments and dtype already a name: the counted primitives' path,
        a few hundred calls a decode step."""
        key = (self.scope_path, op, kind, self.phase, dtype)
        r = self._records.get(key)  # a plain tuple finds its RecordKey: they hash and compare alike
        if r is None:
            r = self._records[RecordKey(*key)] = Record()
        r.calls += 1
        r.flops += flops
        r.useful_flops += flops if useful_flops is None else useful_flops
        r.bytes_read += bytes_read
        r.bytes_written += bytes_written
        r.seconds += seconds

    def matmul(self, a, b, op: str = "matmul", useful_flops=None, out=None):
        """a @ b, counted: the one matrix product in the package. out: write it there (a strided
        view is fine: BLAS takes row strides, so a product can land in a layout's slot directly)."""
        if not self.enabled:
            return backend.xp.matmul(a, b, out=out)
        t0 = self.clock()
        out = backend.xp.matmul(a, b, out=out)
        seconds = self.clock() - t0
        m, k = a.shape[-2:]
        n = b.shape[-1]
        flops = 2 * (out.size // (m * n)) * m * n * k
        self._record(op, "matmul", dtype_name(out.dtype), flops, a.nbytes + b.nbytes, out.nbytes,
                     seconds, useful_flops)
        return out

    def matmul_int8(self, a, b, op: str = "matmul", useful_flops=None):
        """The exact integer product of int8 arrays a and b, as an int32-accumulating kernel gives.

        NumPy has no int8 matrix kernel, so this runs on the float64 BLAS, which is exact here:
        each product of symmetric int8 values is at most 127 * 127 = 16,129 in magnitude, so a sum
        of K of them stays below 2**53 (the largest range float64 holds exactly) for any K under
        5e11. (float32 holds integers exactly only to 2**24: K of about 1,000 such products.)
        Returns float64 holding those integers. Recorded as dtype "int8": A and B at one byte an
        element, C at four (int32); `flops` counts integer operations."""
        xp = backend.xp
        t0 = self.clock()
        out = xp.matmul(a.astype(xp.float64), b.astype(xp.float64))
        seconds = self.clock() - t0
        if self.enabled:
            m, k = a.shape[-2:]
            n = b.shape[-1]
            flops = 2 * (out.size // (m * n)) * m * n * k
            self._record(op, "matmul", INT8, flops, a.nbytes + b.nbytes, 4 * out.size, seconds,
                         useful_flops)
        return out

    def matmul_w8(self, a, b, op: str = "matmul", useful_flops=None):
        """Float activations a times int8 weights b, the weights widened inside the product (the
        caller applies their per-channel scales to the result). Recorded as dtype "w8a32": B at
        one byte an element, A and C at the activations' width."""
        t0 = self.clock()
        out = backend.xp.matmul(a, b.astype(a.dtype))
        seconds = self.clock() - t0
        if self.enabled:
            m, k = a.shape[-2:]
            n = b.shape[-1]
            flops = 2 * (out.size // (m * n)) * m * n * k
            self._record(op, "matmul", W8A32, flops, a.nbytes + b.nbytes, out.nbytes, seconds,
                         useful_flops)
        return out

    def op(self, *, kind: str, op: str) -> Counter:
        """Time an elementwise block: `with METER.op(kind="bias", op="add") as c:`, and the block
        calls c.count(elements=..., bytes_read=..., bytes_written=..., dtype=...) with its sizes."""
        return Counter(self, kind, op)


METER = Meter()
matmul = METER.matmul  # the package's one matrix product: `from minigpt.counting.meter import matmul`
