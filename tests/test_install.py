"""A plain, non-editable install works from any folder: the wheel carries the hardware profiles and
the shipped scenarios, so `minigpt scale gpt3-175b`, `minigpt hardware` and `minigpt train CONFIG`
run from a folder that is not the clone (each broke once with "no such scenario file").

The wheel is built from this tree and installed into a fresh virtual environment that does not see
this environment's editable install; its dependencies (NumPy, tqdm) come from this interpreter's
site-packages through a plain path entry, so nothing is downloaded.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env, timeout=300):
    return subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's python, the venv's minigpt script, an environment for them)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy, so the build leaves no build/ or egg-info in the clone
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "out", "build", "*.egg-info",
                                                            "__pycache__", ".pytest_cache", "mutants"))
    # setuptools, when this interpreter has it, builds without a download
    isolation = ["--no-build-isolation"] if _has_setuptools() else []
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                 "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=os.environ.copy())
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("minigpt-*.whl")

    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=os.environ.copy())
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                       cwd=tmp, env=os.environ.copy()).stdout.strip())
    # dependencies only: a plain path line, so this environment's editable-install hook (a .pth
    # that runs code) is not executed in the venv
    (purelib / "_deps_from_host.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                     "--no-index", "-q", str(wheel)], cwd=tmp, env=os.environ.copy())
    assert installed.returncode == 0, installed.stderr[-2000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["MINIGPT_HOME"] = str(tmp / "home")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return python, venv / "bin" / "minigpt", env, wheel


def _has_setuptools() -> bool:
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return False
    return True


def test_the_wheel_carries_the_data_files(installed):
    *_, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "minigpt/scale/scenarios/gpt3-175b.toml" in names
    assert "minigpt/hardware/data/constants.toml" in names
    assert "minigpt/hardware/data/cpu_power.toml" in names
    assert "minigpt/hardware/data/h100-sxm.toml" in names


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    python, _, env, _ = installed
    out = run([str(python), "-c", "import minigpt; print(minigpt.__file__)"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert str(ROOT) not in out.stdout and "venv" in out.stdout


def test_scale_by_name_from_another_folder(installed, tmp_path):
    _, minigpt, env, _ = installed
    out = run([str(minigpt), "scale", "gpt3-175b"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "gpt3-175b" in out.stdout and "MWh" in out.stdout


def test_hardware_from_another_folder(installed, tmp_path):
    _, minigpt, env, _ = installed
    out = run([str(minigpt), "hardware"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "h100-sxm" in out.stdout and "tpu-v4" in out.stdout


def test_train_a_config_from_another_folder(installed, tmp_path):
    """The main job, shortened: the config copied elsewhere, trained to the end, the GPT-3 line."""
    _, minigpt, env, _ = installed
    config = tmp_path / "elsewhere" / "tiny.toml"
    config.parent.mkdir()
    shutil.copy(ROOT / "configs" / "tiny.toml", config)
    work = tmp_path / "work"
    work.mkdir()
    out = run([str(minigpt), "train", str(config), "--no-progress",
               "--set", "train.max_steps=2", "--set", "eval.interval=2", "--set", "eval.batches=1",
               "--set", "data.max_bytes=200000", "--set", "train.batch_size=4"],
              cwd=work, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "GPT-3" in out.stdout and "no such scenario" not in out.stdout + out.stderr
    assert (work / "out" / "tiny" / "report.html").exists()
