"""Threads per process (minigpt.hardware.blas.plan / apply, and `train`'s startup): the cores of a
node shared among the ranks on it, the variables that override that, the line rank 0 prints, and
that OpenBLAS and Numba really run with the chosen count."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, merge, write_toml

from minigpt import cli
from minigpt.errors import ConfigError
from minigpt.hardware import blas

THREAD_VARS = ("MINIGPT_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


@pytest.mark.parametrize("cores, processes, each", [(2, 1, 2), (2, 2, 1), (16, 2, 8), (16, 3, 5),
                                                     (8, 8, 1), (2, 3, 1), (1, 4, 1)])
def test_the_cores_are_shared_among_the_processes_on_the_node(cores, processes, each):
    p = blas.plan(processes, cores, environ={})
    assert (p.blas, p.numba) == (each, each) and p.automatic
    assert p.oversubscribed == (processes > cores)
    line = p.line()
    assert f"threads: {each} per {'rank' if processes > 1 else 'process'}" in line
    assert f"{cores} cores / {processes}" in line
    assert ("oversubscribed" in line) == (processes > cores)


def test_minigpt_threads_overrides_everything():
    env = {"MINIGPT_THREADS": "3", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "NUMBA_NUM_THREADS": "1"}
    p = blas.plan(2, 8, environ=env)
    assert (p.blas, p.numba) == (3, 3) and not p.automatic and not p.oversubscribed
    assert "from MINIGPT_THREADS=3" in p.line()
    over = blas.plan(2, 4, environ=env)  # 6 threads on 4 cores
    assert over.oversubscribed
    assert "oversubscribed: 6 threads on 4 cores" in over.line()
    assert "MINIGPT_THREADS=2 would not" in over.line()


def test_each_library_keeps_its_own_variable_then_omp():
    p = blas.plan(2, 8, environ={"OMP_NUM_THREADS": "2"})
    assert (p.blas, p.numba) == (2, 2) and p.blas_from == p.numba_from == "OMP_NUM_THREADS=2"
    p = blas.plan(2, 8, environ={"OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "3"})
    assert (p.blas, p.numba) == (3, 2)
    assert "3 per rank for the BLAS (OPENBLAS_NUM_THREADS=3), 2 for Numba (OMP_NUM_THREADS=2)" in (
        p.line())
    p = blas.plan(2, 8, environ={"NUMBA_NUM_THREADS": "1"})
    assert (p.blas, p.numba) == (4, 1)  # the BLAS still shares the cores
    p = blas.plan(2, 8, environ={"OMP_NUM_THREADS": "4,2"})  # OpenMP's nested levels: the first
    assert p.blas == 4
    p = blas.plan(2, 8, environ={"OMP_NUM_THREADS": "lots"})  # unreadable: the automatic count
    assert p.blas == 4 and p.automatic


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_minigpt_threads_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=rf"MINIGPT_THREADS = '{value}': threads per process must "
                                          r"be a positive whole number"):
        blas.plan(1, 2, environ={"MINIGPT_THREADS": value})


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return env | extra


@pytest.mark.skipif(blas.current() is None, reason="NumPy's BLAS is not OpenBLAS")
def test_apply_sets_openblas_and_numbas_threads_after_numpy_has_loaded():
    """The plan reaches both libraries, and the variables reach the processes this one starts;
    NUMBA_NUM_THREADS only while Numba has not read it yet (minigpt's kernels import Numba)."""
    code = ("import json, os, sys, numpy; from minigpt.hardware import blas; "
            "loaded = 'numba' in sys.modules; "
            "before = blas.current(); took = blas.apply(blas.plan(4, 4)); "
            "import numba; "
            "print(json.dumps([before, took, blas.current(), numba.get_num_threads(), loaded, "
            "{k: os.environ.get(k) for k in ('OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', "
            "'NUMBA_NUM_THREADS')}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(), cwd=ROOT, check=True)
    _, took, after, numba_threads, loaded, env = json.loads(out.stdout)
    assert took is True and after == 1 and numba_threads == 1
    assert env == {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                   "NUMBA_NUM_THREADS": None if loaded else "1"}


def test_apply_after_numba_is_imported_sets_its_threads():
    numba = pytest.importorskip("numba")
    code = ("import numba; from minigpt.hardware import blas; "
            "blas.apply(blas.plan(1, 1, environ={'MINIGPT_THREADS': '1'})); "
            "print(numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(NUMBA_NUM_THREADS="2"), cwd=ROOT, check=True)
    assert out.stdout.strip() == "1"
    assert numba.config.NUMBA_NUM_THREADS >= 1


def test_numba_compiles_after_apply_with_numba_imported_and_a_fresh_cache(tmp_path):
    """minigpt's kernels import Numba, which reads NUMBA_NUM_THREADS then and again at every
    compile: apply must not change the variable under it, or a rank's first compile on a fresh
    install (no cached kernels) fails (`mpiexec -n 2 python train.py` did)."""
    pytest.importorskip("numba")
    code = ("import numba, minigpt.kernels.quant; from minigpt.hardware import blas; "
            "blas.apply(blas.plan(2, 2)); "
            "f = numba.njit(lambda x: x + 1); print(f(1), numba.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=_clean_env(NUMBA_CACHE_DIR=str(tmp_path)), cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split() == ["2", "1"]


def _train(tmp_path, **env) -> subprocess.CompletedProcess:
    cfg = write_toml(tmp_path / "c.toml", merge(TINY, {"train": {"out_dir": str(tmp_path / "o"),
                                                                 "max_steps": 2}}))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), str(cfg), "--no-progress"],
                          capture_output=True, text=True, env=_clean_env(**env), cwd=ROOT,
                          timeout=120, check=False)


def test_a_plain_run_says_nothing_and_an_override_is_printed_once(tmp_path):
    plain = _train(tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "threads:" not in plain.stderr
    cores = blas.usable_cores()
    over = _train(tmp_path, MINIGPT_THREADS=str(cores + 1))
    assert over.returncode == 0, over.stderr[-2000:]
    assert over.stderr.count("threads:") == 1
    assert (f"threads: {cores + 1} per process (BLAS and Numba), from MINIGPT_THREADS={cores + 1}; "
            f"oversubscribed: {cores + 1} threads on {cores} cores") in over.stderr


def test_a_bad_minigpt_threads_stops_train_in_one_line(tmp_path):
    proc = _train(tmp_path, MINIGPT_THREADS="many")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: MINIGPT_THREADS = 'many': threads per process must be a positive whole number"]
    assert not (tmp_path / "o").exists()


def test_cli_train_in_process_leaves_the_thread_count_when_nothing_is_set(tmp_path, monkeypatch,
                                                                            capsys):
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    before = blas.current()
    cfg = write_toml(tmp_path / "c.toml", merge(TINY, {"train": {"out_dir": str(tmp_path / "o"),
                                                                 "max_steps": 1}}))
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    assert blas.current() == before
    assert not any(var in os.environ for var in THREAD_VARS)
    assert "threads:" not in capsys.readouterr().err


@pytest.mark.parametrize("given, want", [(None, ("passive", "10000")), ("50", ("passive", "50"))])
def test_openmp_workers_sleep_after_a_short_spin_unless_told_otherwise(given, want):
    """The kernels' OpenMP workers sleep between kernels (passive) after a short spin, which
    bridges the gaps between a packed decode step's products; a GOMP_SPINCOUNT
    already set is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if given is not None:
        env["GOMP_SPINCOUNT"] = given
    code = "import os, minigpt.kernels; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert tuple(out) == want
