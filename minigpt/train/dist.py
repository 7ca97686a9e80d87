"""Data-parallel training over MPI: ranks, the batch split, one counted allreduce per step.

`mpiexec -n N python train.py CONFIG` starts N copies of the trainer. Each copy (a rank) draws the
same global batch with the same random generator a single process would use, and keeps its slice
of batch_size / N sequences. After the backward pass, one allreduce sums the flat gradient buffer
over the ranks (each rank's loss was already weighted 1 / N, so the sum is the global batch's mean
gradient), and a second, two-number allreduce sums the loss and a stop flag (Ctrl-C on any rank
stops all of them after the same step). Clipping and AdamW then run on identical gradients on
every rank, so every rank holds identical weights. Rank 0 alone writes checkpoints, logs and
reports and prints; the others are quiet.

A plain run never imports mpi4py: the launcher is detected from its environment (PMI_SIZE from
MPICH's and Intel MPI's hydra, OMPI_COMM_WORLD_SIZE from Open MPI, MV2_COMM_WORLD_SIZE from
MVAPICH), and with one rank, or none of those, `world()` is the one-process `Single`, for which
every collective is a no-op and nothing is counted.

Counting (docs/costs.md): each allreduce is a meter record of kind "allreduce" in phase
"communication", scope "dist", op "grad_sum" or "loss_sum". Its bytes are the ring algorithm's
per-rank traffic, 2 (N - 1) / N x the buffer's bytes sent (bytes_read) and as many received
(bytes_written); its FLOPs are the (N - 1) / N x elements additions each rank does in the ring's
reduce-scatter half; its seconds are the host clock around the call, which includes any wait
for the slowest rank. minigpt.counting.closed_form.allreduce_bytes is the same formula, for the closed form
and for `minigpt scale`. (MPI may pick another algorithm for small buffers; the count is the ring's
by convention, as the bandwidth-optimal figure a large buffer approaches.)

On a GPU (device = "cuda") the gradient allreduce goes through NCCL (cupy.cuda.nccl), with the
communicator's id handed out over MPI; each rank uses GPU local_rank % device count.

Threads: before the trainer is built, `train` gives each rank this node's cores divided by the
ranks on it (`local_size`, from a shared-memory split of COMM_WORLD) for OpenBLAS and Numba
(minigpt.hardware.blas.plan; MINIGPT_THREADS or the usual variables override it), and rank 0
prints the choice: two ranks on two cores each with a thread per core ran slower than one process.

Overlap (GradientBuckets, MINIGPT_OVERLAP=1): the gradients go in buckets, each a non-blocking
allreduce started as the backward pass finishes its blocks (last first, as DDP does), tested at
each later block, waited for before clipping; one record per slice. By default (OVERLAP = False)
the gradients go in one allreduce after the whole backward pass instead, because overlapping did
not pay on the CPU (docs/benchmarks.md, bench/dist.py): MPICH advances a non-blocking allreduce
only inside MPI calls (without an asynchronous progress thread, which would need a core of its
own), so the sums move at the block boundaries where the ranks test them, on the same cores that
compute; and with every core busy computing there is no idle core for the transfer to hide on.
The one allreduce costs a few per cent of a step, most of it one rank waiting for the other to
finish its backward pass, which no overlap removes.
"""

import os
import sys
import time

import numpy as np

from minigpt import backend
from minigpt.counting import scopes
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError

# environment variables an MPI launcher sets to the number of ranks, and to this rank's number on
# its node (the rank itself comes from MPI)
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


def launched_size() -> int:
    """How many ranks the MPI launcher started, from its environment (1 when not under one)."""
    for var in SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


class Single:
    """The one-process world: every collective is a no-op, and nothing is counted."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def sum_gradients(self, g) -> None:
        """Sum the flat gradient buffer g over the ranks, in place."""

    def sum_scalars(self, values: np.ndarray) -> np.ndarray:
        """Sum a few float64 numbers over the ranks."""
        return values

    def abort(self, code: int) -> None:
        """Stop every rank (with one, there is nothing else to stop)."""

    def buckets(self, grads) -> "GradientBuckets | None":
        """The gradients' buckets, overlapped with the backward pass; None: one sum after it."""
        return None


class MPIWorld(Single):
    """MPI.COMM_WORLD with counted, in-place sums."""

    def __init__(self, size: int):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError(
                f"started by an MPI launcher with {size} ranks, but mpi4py is not installed: "
                f"pip install -e \".[mpi]\"") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_rank, self.local_size = self._node()

    def _node(self) -> tuple[int, int]:
        """(this rank's number on its node, the ranks on its node): from the communicator of
        the ranks that share this one's memory, else from the launcher's environment."""
        try:
            node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        except Exception:  # noqa: BLE001 - an MPI without shared-memory splits: ask the launcher
            return _env_int(LOCAL_RANK_VARS, self.rank), _env_int(LOCAL_SIZE_VARS, self.size)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    def _allreduce(self, buf) -> None:
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)

    def _counted(self, op: str, buf, reduce) -> None:
        t0 = METER.clock()
        reduce(buf)
        self._record(op, buf, METER.clock() - t0)

    def _record(self, op: str, buf, seconds: float) -> None:
        """One allreduce of buf, taking `seconds`, as a meter record (the ring's counts)."""
        n, nbytes = int(buf.size), int(buf.nbytes)
        N = self.size
        sent = 2 * (N - 1) * nbytes // N  # the ring's traffic (counting.closed_form.allreduce_bytes predicts it)
        if METER.enabled:
            with METER.in_phase("communication"), METER.scope(scopes.DIST):
                METER.add(kind="allreduce", op=op, dtype=buf.dtype, flops=(N - 1) * n // N,
                          bytes_read=sent, bytes_written=sent, seconds=seconds)

    def sum_gradients(self, g) -> None:
        self._counted("grad_sum", g, self._allreduce)

    def buckets(self, grads) -> "GradientBuckets | None":
        if not overlap_wanted():
            return None
        return GradientBuckets(self, grads.layout, grads.data, BUCKET_BYTES)

    def sum_scalars(self, values: np.ndarray) -> np.ndarray:
        values = np.ascontiguousarray(values, dtype=np.float64)
        self._counted("loss_sum", values, self._allreduce)
        return values

    def abort(self, code: int) -> None:
        self.comm.Abort(code)


class GradientBuckets:
    """The gradients summed in buckets, each by a non-blocking allreduce started as soon as the
    backward pass has finished its blocks (last block first, the order DDP uses), and waited for
    before clipping. A bucket is the blocks finished since the last one, once they hold at least
    cap_bytes of gradients: two contiguous slices of the flat buffer (the blocks' matrices, and
    their vectors; the first bucket's vectors take ln_f's along, finished before any block). The
    rest (the embeddings, tied to the LM head and so finished last, and any blocks not yet sent)
    goes when the backward pass ends. MPI advances a non-blocking allreduce only inside MPI calls,
    so each finished block also tests the pending ones.

    Counting: one allreduce record per slice, as MPIWorld counts one (op "grad_sum", the ring's
    bytes for that slice); its seconds are the time in the MPI calls (the start, its share of the
    tests made while it was pending, and of the final wait)."""

    def __init__(self, world: "MPIWorld", layout, data, cap_bytes: int):
        self.world, self.data, self.cap = world, data, cap_bytes
        self.spans = _block_spans(layout)  # block -> (matrices (a, b), vectors (a, b))
        self.vectors_end = int(data.size)
        self.pending: list[list] = []  # [request, slice, seconds in MPI calls]
        self.sent_from = len(self.spans)  # blocks >= this one are on their way

    def block_done(self, i: int) -> None:
        """Block i's gradients are complete: test the pending sums; start a bucket if the blocks
        finished since the last one are large enough."""
        self._test()
        (m, _), (v, _) = self.spans[i]
        top = self.sent_from
        if top == len(self.spans):
            m_end, v_end = self.spans[top - 1][0][1], self.vectors_end  # ln_f's vectors too
        else:
            m_end, v_end = self.spans[top][0][0], self.spans[top][1][0]
        if (m_end - m + v_end - v) * self.data.itemsize >= self.cap:
            self._start(m, m_end)
            self._start(v, v_end)
            self.sent_from = i

    def finish(self) -> None:
        """The backward pass is over: start the rest, wait for every sum, count each."""
        if self.sent_from == len(self.spans):  # no bucket filled: the whole buffer in one
            self._start(0, self.vectors_end)
        else:  # the embeddings and the blocks below the last bucket: matrices, then vectors
            (m, _), (v, _) = self.spans[self.sent_from]
            self._start(0, m)
            self._start(self.spans[0][1][0], v)
        MPI = self.world.MPI
        t0 = METER.clock()
        MPI.Request.Waitall([p[0] for p in self.pending])
        self._share(METER.clock() - t0)
        for _, buf, seconds in self.pending:
            self.world._record("grad_sum", buf, seconds)
        self.pending = []
        self.sent_from = len(self.spans)

    def _start(self, a: int, b: int) -> None:
        if b <= a:
            return
        buf = self.data[a:b]
        t0 = METER.clock()
        request = self.world.comm.Iallreduce(self.world.MPI.IN_PLACE, buf, op=self.world.MPI.SUM)
        self.pending.append([request, buf, METER.clock() - t0])

    def _test(self) -> None:
        if self.pending:
            t0 = METER.clock()
            self.world.MPI.Request.Testall([p[0] for p in self.pending])
            self._share(METER.clock() - t0)

    def _share(self, seconds: float) -> None:
        for p in self.pending:
            p[2] += seconds / len(self.pending)


def _block_spans(layout) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per block, the flat buffer's (start, end) of its matrices and of its vectors (each
    contiguous: params.layout lists a block's parameters together within each region)."""
    import math

    spans: dict[int, list[list]] = {}
    offset = 0
    for name, shape in layout:
        n = math.prod(shape)
        if name.startswith("transformer.h."):
            i = int(name.split(".")[2])
            region = 0 if len(shape) >= 2 else 1
            r = spans.setdefault(i, [[None, None], [None, None]])[region]
            if r[0] is None:
                r[0] = r[1] = offset
            if r[1] != offset:
                raise ValueError(f"block {i}'s {'matrices' if region == 0 else 'vectors'} are not "
                                 f"contiguous in the flat buffer ({name})")
            r[1] = offset + n
        offset += n
    return [(tuple(spans[i][0]), tuple(spans[i][1])) for i in range(len(spans))]


class NCCLWorld(MPIWorld):
    """Gradients summed on the GPU by NCCL (CuPy); the two scalars still go over MPI."""

    def __init__(self, size: int):
        super().__init__(size)
        backend.use("cuda")  # a one-line ConfigError where CuPy is missing
        cp = backend.cupy()
        try:
            nccl = backend.nccl()
        except ImportError as e:
            raise ConfigError(f"device = \"cuda\" on {size} MPI ranks needs CuPy's NCCL "
                              f"(cupy.cuda.nccl): {e}") from None

        cp.cuda.Device(self.local_rank % cp.cuda.runtime.getDeviceCount()).use()
        uid = np.zeros(128, dtype=np.int8)  # NCCL's unique id: 128 bytes (NCCL_UNIQUE_ID_BYTES)
        if self.rank == 0:
            uid[...] = np.array(nccl.get_unique_id(), dtype=np.int8)
        self.comm.Bcast(uid, root=0)  # a plain buffer: nothing pickled crosses between ranks
        uid = tuple(int(b) for b in uid)
        self.nccl, self.cp = nccl, cp
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.nccl_types = {"float32": nccl.NCCL_FLOAT32, "float64": nccl.NCCL_FLOAT64}

    def _nccl_allreduce(self, buf) -> None:
        stream = self.cp.cuda.get_current_stream()
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self.nccl_types[str(buf.dtype)],
                                 self.nccl.NCCL_SUM, stream.ptr)
        stream.synchronize()  # the optimizer reads the sum next; the meter times the transfer

    def sum_gradients(self, g) -> None:
        self._counted("grad_sum", g, self._nccl_allreduce)

    def buckets(self, grads) -> "GradientBuckets | None":
        """On the GPU the gradients go in one NCCL call after the backward pass."""
        return None


def _env_int(names, default: int) -> int:
    for var in names:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return default


# Overlap: MINIGPT_OVERLAP=1 sums the gradients in buckets during the backward pass, =0 in one
# allreduce after it; unset, OVERLAP. (the module's docstring and docs/benchmarks.md say why)
OVERLAP = False
BUCKET_BYTES = 512 * 1024  # a bucket closes once its blocks hold this many gradient bytes


def overlap_wanted() -> bool:
    """Whether a CPU run's gradients go in buckets during the backward pass (MINIGPT_OVERLAP)."""
    value = os.environ.get("MINIGPT_OVERLAP", "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"MINIGPT_OVERLAP = {value!r}: 1 (buckets during the backward pass) or "
                          f"0 (one allreduce after it)")
    return OVERLAP if value == "" else value == "1"


_WORLD: Single | None = None
MESSAGE_BYTES = 1024  # a setup failure's line, as the ranks compare notes (longer ones are cut)


def world(device: str = "cpu") -> Single:
    """This process's world, made once: Single unless an MPI launcher started more than one rank.
    On "cuda" the GPU is chosen by local rank and gradients go through NCCL."""
    global _WORLD
    if _WORLD is None or (device == "cuda" and type(_WORLD) is MPIWorld):
        size = launched_size()
        if size <= 1:
            _WORLD = Single()
        elif device == "cuda":
            _WORLD = NCCLWorld(size)
        else:
            _WORLD = MPIWorld(size)
    return _WORLD


def local_batch(batch_size: int, ranks: int) -> int:
    """Sequences per rank; a batch that does not split evenly is refused in one line."""
    if batch_size % ranks:
        raise ConfigError(f"[train] batch_size = {batch_size} does not split over {ranks} MPI ranks "
                          f"(it must be a multiple of {ranks})")
    return batch_size // ranks


def first_failure(w: Single, failure: str | None) -> str | None:
    """Every rank says whether its setup failed (a collective: all ranks must call it); returns
    the first failure's line (tagged with its rank when not rank 0), or None if all went well."""
    if w.size == 1:
        return failure
    mine = np.zeros(MESSAGE_BYTES, dtype=np.uint8)  # byte 0: failed?; then the line, UTF-8
    if failure is not None:
        text = failure.encode()[: MESSAGE_BYTES - 1]
        mine[0] = 1
        mine[1:1 + len(text)] = np.frombuffer(text, dtype=np.uint8)
    every = np.zeros((w.size, MESSAGE_BYTES), dtype=np.uint8)
    w.comm.Allgather(mine, every)  # plain buffers: nothing pickled crosses between ranks
    for rank, row in enumerate(every):
        if row[0]:
            line = row[1:].tobytes().rstrip(b"\0").decode(errors="replace")
            return line if rank == 0 else f"rank {rank}: {line}"
    return None


def fail(w: Single, message: str, code: int, say: bool = True) -> None:
    """An error on one rank while training: print its line (rank-tagged when not rank 0) and abort
    every rank, so none waits forever in a collective the failed one will never join."""
    if w.size > 1:
        if say:
            print(message if w.rank == 0 else f"rank {w.rank}: {message}", file=sys.stderr,
                  flush=True)
        time.sleep(0.2)  # let the launcher forward the line before the abort tears the job down
        w.abort(code)
