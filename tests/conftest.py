"""Shared test helpers: the repository root, a tiny model config, a runner for the real commands,
and one tiny training run (trained once per session through train.py) that other tests reuse."""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# The suite runs NumPy's passes unless a test chooses the fused kernels (kernels.use("numba"), as
# tests/test_fused.py and the cost-model equality tests do): the commands it starts inherit this.
os.environ["MINIGPT_KERNELS"] = "numpy"

from minigpt import config, kernels  # after the environment it reads


@pytest.fixture(autouse=True)
def _numpy_kernels_unless_chosen():
    """Each test starts on NumPy's path, whatever the test before it chose."""
    kernels.use("numpy")
    yield
    kernels.use("numpy")

# Tests never write the user's real ~/.minigpt: one private $MINIGPT_HOME for the whole session
# (the quick roofline measurement is cached there once), inherited by the commands tests run.
os.environ["MINIGPT_HOME"] = tempfile.mkdtemp(prefix="minigpt-test-home-")
atexit.register(shutil.rmtree, os.environ["MINIGPT_HOME"], True)


def fixed_time_model(home: Path) -> Path:
    """Give a $MINIGPT_HOME a fixed time model (50 GFLOP/s, 10 GB/s, 5 us a call) as if
    `minigpt calibrate` had written it, so a run's prediction neither waits for this machine to be
    measured nor depends on its speed (tests/test_timing.py measures the real one)."""
    from minigpt.hardware import timing

    path = home / "hardware" / timing.calibrated_path().name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timing.TimeModel.constant(50e9, 10e9, 5e-6, 2e-6).to_json()))
    return path


fixed_time_model(Path(os.environ["MINIGPT_HOME"]))

ROOT = Path(__file__).resolve().parents[1]
TINY_TOML = ROOT / "configs" / "tiny.toml"
FABLES = ROOT / "corpora" / "fables.txt"

# A model and run small enough that training a few steps takes well under a second.
TINY = {
    "model": {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 16},
    "data": {"path": str(FABLES)},
    "train": {"batch_size": 4, "max_steps": 6},
    "eval": {"interval": 3, "batches": 2},
}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string (JSON escapes are valid TOML)


def overrides(sections: dict) -> list[str]:
    """{"train": {"max_steps": 6}} -> ["train.max_steps=6"], values written as TOML."""
    return [f"{s}.{k}={_toml_value(v)}" for s, table in sections.items() for k, v in table.items()]


def set_args(sections: dict) -> list[str]:
    """The same as command-line arguments: ["--set", "train.max_steps=6", ...]."""
    return [arg for o in overrides(sections) for arg in ("--set", o)]


def merge(base: dict, extra: dict) -> dict:
    """A copy of base with extra's sections merged in, key by key."""
    out = {s: dict(t) for s, t in base.items()}
    for s, t in extra.items():
        out.setdefault(s, {}).update(t)
    return out


def write_toml(path: Path, sections: dict) -> Path:
    """Write {section: {key: value}} as a TOML file."""
    lines = []
    for section, table in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def tiny_config(out_dir, **sections):
    """configs/tiny.toml shrunk to the TINY model, writing to out_dir, plus sections' overrides."""
    extra = merge(merge(TINY, {"train": {"out_dir": str(out_dir)}}), sections)
    return config.load(TINY_TOML, overrides(extra))


def run_cli(script: str, *args, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run train.py or generate.py from the repository root; text output, never raises on failure."""
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, encoding="utf-8", timeout=timeout, check=False,
    )


def interrupt_training(tmp_path: Path, signum) -> tuple[int, Path, str, str]:
    """Start train.py on TINY (a million steps, evaluating every 5), send signum once the first
    log line is written, and wait for it to end: (exit code, run folder, stdout, stderr)."""
    out = tmp_path / "run"
    args = set_args(merge(TINY, {"train": {"out_dir": str(out), "max_steps": 1_000_000},
                                 "eval": {"interval": 5}}))
    log = out / "log.jsonl"
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "train.py", str(TINY_TOML), "--no-progress", *args],
                                cwd=ROOT, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            while not (log.exists() and log.read_text().strip()) and proc.poll() is None:
                if time.monotonic() > deadline:
                    pytest.fail("timed out after 60 s waiting for the first log line")
                time.sleep(0.05)
            assert proc.poll() is None, "train.py ended before it was interrupted"
            proc.send_signal(signum)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return code, out, (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()


def snapshot(folder: Path) -> dict:
    """{relative path: bytes} of every file under folder, to check that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rapl_domain(root: Path, name: str, label: str, energy_uj: int, max_uj: int) -> Path:
    """One domain of a fake /sys/class/powercap tree: its name, counter and wrap range."""
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A run folder (ckpt.npz and log.jsonl) from `python train.py configs/tiny.toml` on TINY.
    Shared: tests must not modify it (copy it with the run_copy fixture instead)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    r = run_cli("train.py", TINY_TOML, "--no-progress",
                *set_args(merge(TINY, {"train": {"out_dir": str(out)}})))
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt.npz").is_file() and (out / "log.jsonl").is_file()
    return out


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the trained run, free to be resumed, overwritten or damaged."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))
