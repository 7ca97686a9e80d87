"""Filesystem faults: a full disk, a read-only file system, a folder that cannot be created.

Each ends in one line naming the path and the reason, exit code 2, the last good checkpoint (and
log, and costs.json) byte-identical, and no temporary file left behind.

How the faults are made (tests run as root here, where chmod does not stop writes):
- a full disk mid-write: the file object safeio writes through raises OSError(ENOSPC) after some
  bytes (in-process, and in a subprocess running the real command);
- a real full disk and a real read-only file system: a small tmpfs mounted in a private mount
  namespace (unshare -m); skipped where mounting is not allowed;
- a folder that cannot be created: a path under a regular file (ENOTDIR), which stops root too.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, TINY, TINY_TOML, merge, run_cli, set_args, snapshot

from minigpt import safeio
from minigpt.counting import tables
from minigpt.errors import FileSystemError
from minigpt.train import checkpoint


class _FillsUp:
    """A binary file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        n = len(memoryview(data).cast("B"))
        if n > self.room:
            self.f.write(memoryview(data).cast("B")[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def full_disk(monkeypatch, room):
    """Every file safeio opens from now on holds at most `room` bytes."""
    real_open = open
    monkeypatch.setattr(safeio, "open", lambda *a, **k: _FillsUp(real_open(*a, **k), room), raising=False)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(run_copy, monkeypatch, room):
    before = snapshot(run_copy)
    meta, arrays = checkpoint.load(run_copy)
    arrays["params"] = arrays["params"] + 1.0
    full_disk(monkeypatch, room)
    with pytest.raises(FileSystemError) as e:
        checkpoint.save(run_copy / "ckpt.npz", {k: v for k, v in meta.items() if k not in ("format", "sha256")},
                        arrays)
    msg = str(e.value)
    assert str(run_copy / "ckpt.npz") in msg and "disk full" in msg and "unchanged" in msg
    assert "\n" not in msg
    assert snapshot(run_copy) == before and leftovers(run_copy) == []
    checkpoint.load(run_copy)


def test_a_full_disk_during_a_report_keeps_the_previous_costs_json(run_copy, monkeypatch):
    before = snapshot(run_copy)
    doc = tables.load(run_copy) if (run_copy / "costs.json").exists() else None
    full_disk(monkeypatch, 10)
    with pytest.raises(FileSystemError, match="costs.json: cannot write: no space left"):
        tables.save(run_copy, [], 1, 1)
    assert snapshot(run_copy) == before and leftovers(run_copy) == []
    if doc is not None:
        assert tables.load(run_copy) == doc


def test_a_full_disk_during_a_log_append_leaves_no_half_line(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n')
    real_write = os.write

    def write_some_then_fail(fd, data):
        if fd > 2:
            real_write(fd, bytes(data[:5]))  # a few bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write_some_then_fail)
    with pytest.raises(FileSystemError, match="log.jsonl: cannot append: no space left"):
        safeio.append_line(log, json.dumps({"step": 2}))
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


def test_a_read_only_file_system_is_named(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(safeio, "open", read_only, raising=False)
    with pytest.raises(FileSystemError, match="read-only file system"):
        safeio.write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_write_removes_the_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def interrupted(f):
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        safeio.atomic_write(tmp_path / "a.txt", interrupted)
    assert (tmp_path / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_out_dir_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    r = run_cli("train.py", TINY_TOML, "--no-progress", *set_args(merge(TINY, {"train": {"out_dir": str(out)}})))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and str(out) in lines[-1]
    assert "a part of the path is a file" in lines[-1]


_FULL_DISK_RUN = textwrap.dedent("""
    import errno, os, sys
    from minigpt import cli, safeio
    real_open = open
    saves = []
    def open_(path, *a, **k):
        f = real_open(path, *a, **k)
        if str(path).endswith("ckpt.npz.tmp"):
            saves.append(path)
            if len(saves) >= 2:  # the second checkpoint of this run meets a full disk
                class Full:
                    def __init__(s, f): s.f, s.n = f, 0
                    def write(s, b):
                        s.n += len(memoryview(b).cast("B"))
                        if s.n > 4096:
                            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                        return s.f.write(b)
                    def __getattr__(s, k): return getattr(s.f, k)
                    def __enter__(s): return s
                    def __exit__(s, *e): s.f.close()
                return Full(f)
        return f
    safeio.open = open_
    sys.exit(cli.main(["train", *sys.argv[1:]]))
""")


def test_a_full_disk_mid_training_exits_2_and_keeps_the_last_good_checkpoint(tmp_path):
    """The real command in a subprocess: the second checkpoint meets a full disk."""
    out = tmp_path / "run"
    args = set_args(merge(TINY, {"train": {"out_dir": str(out), "max_steps": 6}, "eval": {"interval": 3}}))
    r = subprocess.run([sys.executable, "-c", _FULL_DISK_RUN, str(TINY_TOML), "--no-progress", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and str(out / "ckpt.npz") in last and "disk full" in last
    meta, _ = checkpoint.load(out)
    assert meta["run"]["step"] == 3  # the first checkpoint, whole
    assert leftovers(out) == []


# --------------------------------------------------------------------------- a real tmpfs


def _can_mount() -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=20, check=False)
    return probe.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="mounting a tmpfs needs root and unshare")


def _in_namespace(tmp_path, mount_opts, script):
    """Run a shell script in a private mount namespace with a tmpfs (mount_opts) on tmp_path/mnt."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    shell = f"mount -t tmpfs -o {mount_opts} tmpfs {mnt} && {script}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["unshare", "-m", "sh", "-c", shell], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, env=env, check=False), mnt


@needs_mount
def test_a_real_full_tmpfs_keeps_the_last_good_checkpoint(tmp_path):
    """A 4 MiB tmpfs, first used to measure one checkpoint of the tiny model (~110 KiB), then
    filled so that 1.5 checkpoints fit: the first save fits, the next one's temporary beside it
    meets a real ENOSPC."""
    out = "MNT/run"
    train = (f"{sys.executable} train.py {TINY_TOML} --no-progress "
             + " ".join(set_args(merge(TINY, {"train": {"out_dir": out, "max_steps": 12},
                                              "eval": {"interval": 3}}))))
    check = (f"{sys.executable} -c \"from minigpt.train import checkpoint; import os; "
             f"m, _ = checkpoint.load('{out}'); print('STEP', m['run']['step'], sorted(os.listdir('{out}')))\"")
    filler = "dd if=/dev/zero of=MNT/filler bs=1k count=FILL 2>/dev/null"
    # measure how much one checkpoint needs, then fill the disk so one fits but not two
    r, mnt = _in_namespace(tmp_path, "size=4m", f"{train.replace('MNT', str(tmp_path / 'mnt'))} >/dev/null; "
                           f"du -k {tmp_path / 'mnt'}/run/ckpt.npz")
    assert r.returncode == 0, r.stderr
    ckpt_kib = int(r.stdout.split()[-2])
    shutil.rmtree(mnt)
    fill = 4096 - int(ckpt_kib * 1.5)  # room for one checkpoint and the log, not two
    script = "; ".join([filler.replace("FILL", str(fill)), train, "echo EXIT $?", check])
    r, mnt = _in_namespace(tmp_path, "size=4m", script.replace("MNT", str(tmp_path / "mnt")))
    assert "EXIT 2" in r.stdout, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "disk full" in err[0] and "ckpt.npz" in err[0], r.stderr
    assert "Traceback" not in r.stderr
    step = r.stdout.split("STEP")[1].split()
    assert int(step[0]) >= 3 and "ckpt.npz.tmp" not in r.stdout


@needs_mount
def test_a_real_read_only_file_system_is_one_line(tmp_path):
    out = tmp_path / "mnt" / "run"
    train = (f"{sys.executable} train.py {TINY_TOML} --no-progress "
             + " ".join(set_args(merge(TINY, {"train": {"out_dir": str(out)}}))))
    r, _ = _in_namespace(tmp_path, "ro,size=64k", train)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert str(out) in last and "read-only file system" in last


def test_reason_covers_the_usual_faults():
    assert "disk full" in safeio.reason(OSError(errno.ENOSPC, "x"))
    assert "read-only" in safeio.reason(OSError(errno.EROFS, "x"))
    assert "permission denied" in safeio.reason(OSError(errno.EACCES, "x"))
    assert safeio.reason(OSError(errno.ENAMETOOLONG, "File name too long")) == "File name too long"
