"""Data-parallel training over MPI (minigpt.train.dist): the ring allreduce's closed form, the
launcher detection, and, with mpi4py and mpiexec installed (the test extra has both), two real
ranks: the same losses and weights as one process in float64, counted == predicted communication,
resume on another number of ranks, and an error on one rank stopping both."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, merge, write_toml

from minigpt.counting import closed_form as cost_model
from minigpt.counting import tables
from minigpt.errors import ConfigError
from minigpt.hardware import blas
from minigpt.train import checkpoint, dist

WORKER = Path(__file__).with_name("mpi_worker.py")
THREAD_VARS = ("MINIGPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
# float64, so "equal to rounding" is a tight tolerance; two micro-batches a step; eval at the end
RUN = merge(TINY, {"train": {"dtype": "float64", "max_steps": 4, "batch_size": 4, "grad_accum": 2},
                   "eval": {"interval": 100, "batches": 1}})


def ring_traffic(elements: int, ranks: int) -> list[tuple[int, int]]:
    """Simulate a ring allreduce chunk by chunk: (elements sent, elements received) per rank."""
    bounds = np.linspace(0, elements, ranks + 1).astype(int)
    chunk = [int(bounds[i + 1] - bounds[i]) for i in range(ranks)]
    sent, received = [0] * ranks, [0] * ranks
    for _phase in ("reduce-scatter", "all-gather"):
        for step in range(ranks - 1):
            for r in range(ranks):  # rank r passes one chunk to rank r + 1
                c = chunk[(r - step) % ranks]
                sent[r] += c
                received[(r + 1) % ranks] += c
    return list(zip(sent, received))


@pytest.mark.parametrize("ranks", [2, 3, 4, 8])
def test_allreduce_bytes_is_the_ring_simulated(ranks):
    elements = 840  # divisible by every N above: each chunk the same size
    for sent, received in ring_traffic(elements, ranks):
        assert sent * 4 == received * 4 == cost_model.allreduce_bytes(elements * 4, ranks)
    assert cost_model.allreduce_bytes(float(elements * 4), ranks) == pytest.approx(
        2 * (ranks - 1) / ranks * elements * 4)
    assert cost_model.allreduce_bytes(100, 1) == 0


def test_one_rank_predicts_no_communication():
    cfg = merge(TINY, {})["model"]
    from minigpt.config import ModelConfig

    m = ModelConfig(**cfg)
    one = cost_model.predict_training_step(m, 4, 16)
    two = cost_model.predict_training_step(m, 2, 16, ranks=2)
    assert not [k for k in one if k.phase == "communication"]
    comm = {k: v for k, v in two.items() if k.phase == "communication"}
    grad = comm["dist", "grad_sum", "allreduce", "communication", "float32"]
    assert grad.bytes_read == grad.bytes_written == cost_model.n_params(m) * 4  # 2 (N-1)/N = 1


def test_costs_predicts_one_ranks_step(capsys, tmp_path):
    from minigpt import cli

    cfg = write_toml(tmp_path / "c.toml", RUN)
    assert cli.main(["costs", "--config", str(cfg), "--ranks", "2", "--format", "json"]) == 0
    groups = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    from minigpt.config import ModelConfig

    P = cost_model.n_params(ModelConfig(**RUN["model"]))
    assert groups["dist"]["bytes_read"] == P * 4 + 2 * 8  # (costs predicts float32) + two scalars
    assert cli.main(["costs", "--config", str(cfg), "--ranks", "3"]) == 2  # 4 does not split in 3
    assert "does not split over 3 MPI ranks" in capsys.readouterr().err


def test_the_launcher_is_found_by_its_environment(monkeypatch):
    for var in dist.SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert dist.launched_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert dist.launched_size() == 4
    monkeypatch.setenv("PMI_SIZE", "2")
    assert dist.launched_size() == 2


def test_a_batch_that_does_not_split_is_refused():
    assert dist.local_batch(8, 2) == 4
    with pytest.raises(ConfigError, match=r"batch_size = 6 does not split over 4 MPI ranks"):
        dist.local_batch(6, 4)


def test_a_plain_run_does_not_import_mpi4py():
    code = ("import sys; from minigpt.train import trainer, dist; from minigpt import cli; "
            "assert isinstance(dist.world(), dist.Single); print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in dist.SIZE_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- two real ranks


def _mpiexec() -> str | None:
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or _mpiexec() is None,
    reason="mpi4py or mpiexec not installed (pip install -e '.[mpi]')")


def _ranks(n: int, *args, timeout: float = 120, threads: str | None = "1",
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the worker on n ranks, with OMP_NUM_THREADS and OPENBLAS_NUM_THREADS = threads (None:
    no thread variable set, so train's own choice) and env added to the environment."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS + ("MINIGPT_OVERLAP",)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if threads is not None:
        env |= {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    env |= extra
    return subprocess.run([_mpiexec(), "-n", str(n), sys.executable, str(WORKER), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          check=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same float64 config trained by one process (in this one) and by two ranks."""
    base = tmp_path_factory.mktemp("dist")
    result = {}
    for name in ("one", "two"):
        out = base / name
        out.mkdir()
        cfg = write_toml(base / f"{name}.toml", merge(RUN, {"train": {"out_dir": str(out)}}))
        result[name] = out
    import mpi_worker

    mpi_worker.train(str(base / "one.toml"), result["one"])
    if _mpiexec() and importlib.util.find_spec("mpi4py"):
        proc = _ranks(2, cfg, result["two"])
        assert proc.returncode == 0, proc.stderr[-2000:]
    return result


def _rank(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"rank{rank}.json").read_text())


@needs_mpi
def test_two_ranks_train_as_one_process_does(runs):
    one, two = _rank(runs["one"]), [_rank(runs["two"], i) for i in range(2)]
    assert [t["size"] for t in two] == [2, 2]
    assert [t["local"] for t in two] == [[0, 2], [1, 2]]  # both on this node: rank, node's size
    assert two[0]["losses"] == two[1]["losses"]  # the summed loss, identical on both
    np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=1e-12, atol=0)
    w0, w1 = (np.load(runs["two"] / f"rank{i}.npy") for i in range(2))
    np.testing.assert_array_equal(w0, w1)  # every rank holds the same weights
    np.testing.assert_allclose(w0, np.load(runs["one"] / "rank0.npy"), rtol=1e-9, atol=1e-12)
    log_one, log_two = ([json.loads(x) for x in (runs[n] / "log.jsonl").read_text().splitlines()]
                        for n in ("one", "two"))
    assert [e["step"] for e in log_two] == [e["step"] for e in log_one] == [4]
    assert log_two[0]["val_loss"] == pytest.approx(log_one[0]["val_loss"], rel=1e-12)
    assert json.loads((runs["two"] / "costs.json").read_text())["ranks"] == 2


@needs_mpi
def test_counted_communication_equals_predicted(runs):
    from minigpt.config import ModelConfig

    m = ModelConfig(**RUN["model"])
    steps, batch = RUN["train"]["max_steps"], RUN["train"]["batch_size"]
    step = cost_model.predict_training_step(m, batch // 2, grad_accum=2, dtype="float64", ranks=2)
    for rank in (0, 1):
        rows = _rank(runs["two"], rank)["rows"]
        measured = {(x["scope"], x["op"], x["kind"], x["phase"], x["dtype"]): x for x in rows
                    if x["phase"] != "eval"}
        assert measured.keys() == step.keys()
        for key, p in step.items():
            got = measured[key]
            assert (got["calls"], got["flops"], got["bytes_read"], got["bytes_written"]) == (
                steps * p.calls, steps * p.flops, steps * p.bytes_read, steps * p.bytes_written), key
        comm = tables.totals([x for x in rows if x["phase"] == "communication"])["communication"]
        # by hand: with N = 2 each rank sends 2 (N-1)/N = all of the float64 gradients, and the
        # two float64 scalars, every step
        assert comm["bytes_read"] == comm["bytes_written"] == steps * (cost_model.n_params(m) + 2) * 8
        assert comm["seconds"] > 0


@needs_mpi
def test_resume_on_another_number_of_ranks(tmp_path, runs):
    cfg = write_toml(tmp_path / "c.toml", merge(RUN, {"train": {"out_dir": str(tmp_path)}}))
    import mpi_worker

    mpi_worker.train(str(cfg), tmp_path, stop_at=2)  # one process: steps 1-2, then a checkpoint
    proc = _ranks(2, cfg, tmp_path, "--resume")  # two ranks: steps 3-4
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = _rank(runs["one"])["losses"]
    np.testing.assert_allclose(_rank(tmp_path)["losses"], reference[2:], rtol=1e-12, atol=0)
    w_resumed, w_one = np.load(tmp_path / "rank0.npy"), np.load(runs["one"] / "rank0.npy")
    np.testing.assert_allclose(w_resumed, w_one, rtol=1e-9, atol=1e-12)
    # the report's counts: two whole-batch steps, then two of rank 0's half, and its tokens to match
    from minigpt.config import ModelConfig

    m, T, accum = ModelConfig(**RUN["model"]), RUN["model"]["block_size"], 2
    one = cost_model.predict_training_step(m, 4, grad_accum=accum, dtype="float64")
    half = cost_model.predict_training_step(m, 2, grad_accum=accum, dtype="float64", ranks=2)
    doc = json.loads((tmp_path / "costs.json").read_text())
    assert doc["tokens"] == 2 * accum * 4 * T + 2 * accum * 2 * T and doc["ranks"] == 2
    flops = {(r["scope"], r["op"], r["phase"]): r["flops"] for r in doc["records"]}
    for key in one:
        if key.phase != "eval":
            want = 2 * one[key].flops + 2 * half[key].flops
            assert flops[key.scope, key.op, key.phase] == want, key


@needs_mpi
def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    # with dropout: each rank draws its own masks, and the weights must still agree
    cfg = write_toml(tmp_path / "c.toml", merge(RUN, {"train": {"out_dir": str(tmp_path)},
                                                      "model": {"dropout": 0.1}}))
    proc = _ranks(2, cfg, tmp_path, "--stop-at", 2, "--stop-rank", 1, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # rank 1 asked after step 2's allreduce; the flag goes round with step 3's: both stop there
    assert [len(_rank(tmp_path, r)["losses"]) for r in (0, 1)] == [3, 3]
    meta, _ = checkpoint.load(tmp_path / checkpoint.FILENAME)  # rank 0 saved the stop
    assert meta["run"]["step"] == 3
    np.testing.assert_array_equal(np.load(tmp_path / "rank0.npy"), np.load(tmp_path / "rank1.npy"))


@needs_mpi
def test_the_command_prints_once_with_compute_and_communication_side_by_side(tmp_path, monkeypatch):
    cfg = write_toml(tmp_path / "c.toml", merge(RUN, {"train": {"out_dir": str(tmp_path)}}))
    from minigpt import config
    from minigpt.train import throughput

    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    assert throughput.remember(config.load(cfg), 1234, 1.0, 100)  # as a plain run would record
    proc = _ranks(2, "--fail-rank", 9, cfg, "--no-progress", timeout=60, threads=None)  # none fails
    assert proc.returncode == 0, proc.stderr[-2000:]
    # no thread variable set: each rank gets half of this node's cores, and rank 0 says so once
    cores = blas.usable_cores()
    each = max(1, cores // 2)
    assert proc.stderr.count("threads:") == 1
    assert f"threads: {each} per rank (BLAS and Numba): {cores} cores / 2 ranks on this node" in (
        proc.stderr)
    assert ("oversubscribed" in proc.stderr) == (cores < 2)
    assert proc.stdout.count("done: 4 steps") == 1
    assert "communic." in proc.stdout and "went to the allreduces" in proc.stdout
    assert "data parallel over 2 MPI ranks: the table above is rank 0's share, not the job's: its " \
           f"{4 * 2 * 2 * 16:,} of the {4 * 2 * 4 * 16:,} tokens" in proc.stdout
    job = [x for x in proc.stdout.splitlines() if x.startswith("the whole job: ")]
    assert len(job) == 1, proc.stdout
    log = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    rate = float(job[0].split()[3].replace(",", ""))
    # all ranks' tokens over rank 0's step time (the log rounds it to milliseconds)
    assert log["tokens"] / (log["elapsed_s"] + 5e-4) - 1 <= rate <= log["tokens"] / (
        log["elapsed_s"] - 5e-4) + 1
    ratio = float(job[0].rsplit("so ", 1)[1].rstrip("x"))
    assert "one process: 1,234 tokens/s for this config on this machine (100 steps" in job[0]
    assert ratio == pytest.approx(rate / 1234, rel=0.01, abs=0.01)
    assert proc.stderr.count("corpus:") == 1  # rank 1 is quiet


@needs_mpi
def test_an_error_on_one_rank_stops_every_rank(tmp_path, runs):
    cfg = write_toml(tmp_path / "c.toml", merge(RUN, {"train": {"out_dir": str(tmp_path)}}))
    proc = _ranks(2, "--fail-rank", 1, cfg, "--no-progress", timeout=60)
    assert proc.returncode != 0
    assert "rank 1: error: a failure injected on rank 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    odd = write_toml(tmp_path / "odd.toml", merge(RUN, {"train": {"batch_size": 3}}))
    proc = _ranks(2, "--fail-rank", 9, odd, timeout=60)  # a setup error: the same on both ranks
    assert proc.returncode == 2
    assert proc.stderr.count("batch_size = 3 does not split over 2 MPI ranks") == 1, proc.stderr


def _gpus() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device: no GPU test
        return 0


@needs_mpi
@pytest.mark.skipif(_gpus() < 2, reason="NCCL over two ranks needs CuPy and two NVIDIA GPUs")
def test_two_gpu_ranks_through_nccl_train_as_one_gpu_does(tmp_path):
    gpu = merge(RUN, {"train": {"device": "cuda", "out_dir": str(tmp_path / "two")}})
    one = merge(gpu, {"train": {"out_dir": str(tmp_path / "one")}})
    import mpi_worker

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    mpi_worker.train(str(write_toml(tmp_path / "one.toml", one)), tmp_path / "one")
    proc = _ranks(2, write_toml(tmp_path / "two.toml", gpu), tmp_path / "two")
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(_rank(tmp_path / "two")["losses"], _rank(tmp_path / "one")["losses"],
                               rtol=1e-12, atol=0)
    grad = [r for r in _rank(tmp_path / "two")["rows"] if r["op"] == "grad_sum"]
    assert grad and grad[0]["calls"] == RUN["train"]["max_steps"]


# --------------------------------------------------------------------------- gradient buckets


class _FakeMPI:
    """Enough of mpi4py for GradientBuckets: records each allreduce's slice, completes at once."""

    IN_PLACE, SUM = object(), object()

    class Request:
        @staticmethod
        def Testall(requests):
            return True

        @staticmethod
        def Waitall(requests):
            return None


class _FakeWorld(dist.MPIWorld):
    def __init__(self, events):
        self.MPI, self.size, self.rank, self.events = _FakeMPI, 2, 0, events
        self.comm = self

    def Iallreduce(self, sendbuf, buf, op):
        assert sendbuf is _FakeMPI.IN_PLACE and op is _FakeMPI.SUM
        base = buf.base if buf.base is not None else buf
        start = (buf.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // buf.itemsize
        self.events.append(("sum", start, start + buf.size))
        return object()


@pytest.mark.parametrize("model, cap", [({"n_layer": 3}, 0), ({"n_layer": 4}, 1),
                                        ({"n_layer": 4}, 10**9), ({"n_layer": 5}, 40_000),
                                        ({"n_layer": 4, "n_experts": 2, "moe_every": 2}, 0)])
def test_buckets_cover_the_buffer_once_and_start_as_blocks_finish(model, cap):
    from minigpt.config import ModelConfig
    from minigpt.nn.params import FlatBuffer

    cfg = ModelConfig(**(RUN["model"] | model))
    g = FlatBuffer(cfg, "float64")
    events = []
    buckets = dist.GradientBuckets(_FakeWorld(events), g.layout, g.data, cap)
    for i in reversed(range(cfg.n_layer)):
        events.append(("done", i))
        buckets.block_done(i)
    events.append(("end",))
    buckets.finish()
    sums = [e[1:] for e in events if e[0] == "sum"]
    covered = np.zeros(g.size, dtype=int)
    for a, b in sums:
        covered[a:b] += 1
    assert (covered == 1).all()  # every gradient summed exactly once
    offsets, offset = {}, 0
    for name, shape in g.layout:
        offsets[name] = (offset, offset + int(np.prod(shape)))
        offset += int(np.prod(shape))
    done = set()
    for e in events:  # no slice holds a gradient of a block (or embedding) not yet finished
        if e[0] == "done":
            done.add(e[1])
        elif e[0] == "end":
            done.add("all")
        else:
            for name, (a, b) in offsets.items():
                if a < e[2] and e[1] < b and "all" not in done:
                    assert name.startswith(("transformer.h.", "transformer.ln_f"))
                    if name.startswith("transformer.h."):
                        assert int(name.split(".")[2]) in done, (name, e)
    early = [e for e in events[:events.index(("end",))] if e[0] == "sum"]
    block_bytes = sum(b - a for (a, b) in (offsets[n] for n in offsets
                                          if n.startswith("transformer.h.0."))) * 8
    if cap <= block_bytes:  # every block fills a bucket: two slices per block, as it finishes
        assert len(early) == 2 * cfg.n_layer
    elif cap < g.size * 8:  # buckets of two blocks or so: some start during the backward pass
        assert 2 <= len(early) < 2 * cfg.n_layer
    if cap >= g.size * 8:  # none fills: the whole buffer in one, after the backward pass
        assert sums == [(0, g.size)] and not early
    assert len(buckets.pending) == 0


def test_block_spans_are_each_blocks_matrices_and_vectors():
    from minigpt.config import ModelConfig
    from minigpt.nn.params import FlatBuffer

    g = FlatBuffer(ModelConfig(**(RUN["model"] | {"n_layer": 2})), "float32")
    spans = dist._block_spans(g.layout)
    for i, ((ma, mb), (va, vb)) in enumerate(spans):
        names = [n for n, s in g.layout if n.startswith(f"transformer.h.{i}.")]
        assert sum(int(np.prod(s)) for n, s in g.layout if n in names) == (mb - ma) + (vb - va)
        assert g[f"transformer.h.{i}.attn.c_attn.weight"].ctypes.data == g.data[ma:].ctypes.data
        assert g[f"transformer.h.{i}.ln_1.weight"].ctypes.data == g.data[va:].ctypes.data


def test_overlap_is_chosen_by_minigpt_overlap(monkeypatch):
    monkeypatch.delenv("MINIGPT_OVERLAP", raising=False)
    assert dist.overlap_wanted() is dist.OVERLAP
    monkeypatch.setenv("MINIGPT_OVERLAP", "1")
    assert dist.overlap_wanted() is True
    monkeypatch.setenv("MINIGPT_OVERLAP", "0")
    assert dist.overlap_wanted() is False
    monkeypatch.setenv("MINIGPT_OVERLAP", "yes")
    with pytest.raises(ConfigError, match=r"MINIGPT_OVERLAP = 'yes': 1 \(buckets"):
        dist.overlap_wanted()


@needs_mpi
def test_two_ranks_with_buckets_train_as_one_process_and_count_each_slice(tmp_path, runs):
    out = tmp_path / "buckets"
    out.mkdir()
    cfg = write_toml(tmp_path / "b.toml", merge(RUN, {"train": {"out_dir": str(out)}}))
    proc = _ranks(2, cfg, out, env={"MINIGPT_OVERLAP": "1", "MINIGPT_BUCKET_BYTES": "0"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = _rank(runs["one"]), [_rank(out, i) for i in range(2)]
    np.testing.assert_allclose(two[0]["losses"], one["losses"], rtol=1e-12, atol=0)
    w0, w1 = (np.load(out / f"rank{i}.npy") for i in range(2))
    np.testing.assert_array_equal(w0, w1)
    np.testing.assert_allclose(w0, np.load(runs["one"] / "rank0.npy"), rtol=1e-9, atol=1e-12)
    from minigpt.config import ModelConfig

    P, steps = cost_model.n_params(ModelConfig(**RUN["model"])), RUN["train"]["max_steps"]
    for rank in (0, 1):
        grad = [r for r in _rank(out, rank)["rows"] if r["op"] == "grad_sum"]
        assert len(grad) == 1 and grad[0]["phase"] == "communication"
        # one block, in a bucket of its own (matrices, vectors with ln_f's), then the embeddings:
        # three allreduces a step, which a ring of two sends whole: the float64 gradients once
        assert grad[0]["calls"] == 3 * steps
        assert grad[0]["bytes_read"] == grad[0]["bytes_written"] == steps * P * 8
        assert grad[0]["seconds"] > 0
