"""Interrupted runs: kill -9 in the middle of a save, SIGTERM, and one run per folder.

kill -9 cannot be caught, so the only defence is the order of writes (temporary file, fsync,
rename, fsync of the folder): whatever moment the process dies, the checkpoint on disk is the
previous one or the new one, whole, and it loads with every hash matching.
"""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, TINY, TINY_TOML, interrupt_training, merge, run_cli, set_args, snapshot

from minigpt.errors import ResourceError
from minigpt.train import checkpoint, runlock
from minigpt.train.runlock import RunLock

_SAVE_LOOP = textwrap.dedent("""
    import sys
    import numpy as np
    from minigpt.train import checkpoint
    path, n = sys.argv[1], 1 << 19
    try:
        i = checkpoint.load(path)[0]["i"]  # go on from the last whole checkpoint
    except Exception:
        i = 0
    while True:  # each checkpoint holds the number i everywhere, so a mix of two would show
        i += 1
        a = np.full(n, i, dtype=np.float32)
        checkpoint.save(path, {"i": i, "layout": [["w", [n]]]}, {"params": a, "adam_m": a, "adam_v": a})
        print(i, flush=True)
""")


def test_kill_9_at_random_moments_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    rng = random.Random(15)
    last = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            proc.stdout.readline()  # one save finished in this process: the kill lands in a later one
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        meta, arrays = checkpoint.load(path)  # every hash checked
        i = meta["i"]
        for a in arrays.values():
            assert a.shape == (1 << 19,) and (a == i).all()
        assert sorted(p.name for p in tmp_path.iterdir()) in (["ckpt.npz"], ["ckpt.npz", "ckpt.npz.tmp"])
        assert i >= last  # never an older checkpoint than one already seen
        last = i


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    code, out, _, err = interrupt_training(tmp_path, signal.SIGTERM)
    assert code == 143, err
    assert "Traceback" not in err and "SIGTERM: finishing this step" in err
    stopped = re.search(r"stopped at step (\d+)", err)
    assert stopped, err
    meta, _ = checkpoint.load(out)
    assert meta["run"]["step"] == int(stopped.group(1)) >= 5


# --------------------------------------------------------------------------- one run per folder


def test_a_second_lock_on_the_same_folder_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path), pytest.raises(ResourceError, match=rf"a live run \(pid {os.getpid()} on"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released: free again
        pass


_HOLD = "import sys, time; from minigpt.train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); " \
        "print('held', flush=True); time.sleep(120)"


def test_a_live_run_blocks_a_second_and_a_killed_one_does_not(tmp_path, run_copy):
    before = snapshot(run_copy)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_copy)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = set_args(merge(TINY, {"train": {"out_dir": str(run_copy), "max_steps": 9}}))
        r = run_cli("train.py", TINY_TOML, "--no-progress", "--resume", *args)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert f"pid {holder.pid}" in lines[-1] and str(run_copy) in lines[-1]
        assert "Traceback" not in r.stderr
        after = snapshot(run_copy)
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops its lock
        holder.wait(timeout=30)
        r = run_cli("train.py", TINY_TOML, "--no-progress", "--resume", *args)
        assert r.returncode == 0, r.stderr
        assert checkpoint.load(run_copy)[0]["run"]["step"] == 9
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdout.close()


def test_without_fcntl_a_pid_file_is_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "fcntl", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    (tmp_path / runlock.LOCK_NAME).write_text(f'{{"pid": {dead.stdout.strip()}, "host": "h"}}')
    with RunLock(tmp_path), pytest.raises(ResourceError, match="a live run"):  # taken over,
        RunLock(tmp_path).acquire()  # since its process is gone; then held against a second one
    assert not (tmp_path / runlock.LOCK_NAME).exists()
