"""One process's tokens/s per config, remembered (minigpt.train.throughput) and printed beside a
data-parallel job's own at the end of `mpiexec -n N python train.py`."""

import json

import pytest
from conftest import TINY, merge, write_toml

from minigpt import cli, config
from minigpt.train import throughput

THREAD_VARS = throughput.THREAD_VARS


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    for var in THREAD_VARS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def _cfg(tmp_path, **train):
    return config.load(write_toml(tmp_path / "c.toml", merge(TINY, {"train": train})))


def test_a_long_enough_default_run_is_remembered_per_config(home, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, batch_size=4)
    assert throughput.recall(cfg) is None
    assert throughput.remember(cfg, 4000, 2.0, throughput.MIN_STEPS)
    got = throughput.recall(cfg)
    assert got["tokens_per_s"] == 2000 and got["steps"] == throughput.MIN_STEPS and "UTC" in got["when"]
    assert throughput.path() == home / "cache" / "throughput.json"
    # what sets a step's cost is in the key; the steps to run and the learning rate are not
    assert throughput.recall(_cfg(tmp_path, batch_size=8)) is None
    assert throughput.recall(_cfg(tmp_path, batch_size=4, max_steps=999, learning_rate=1e-2)) == got
    wider = config.load(write_toml(tmp_path / "w.toml", merge(TINY, {"model": {"n_embd": 32},
                                                                      "train": {"batch_size": 4}})))
    assert throughput.recall(wider) is None


def test_short_runs_and_chosen_threads_are_not_remembered(home, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    assert not throughput.remember(cfg, 4000, 2.0, throughput.MIN_STEPS - 1)
    assert not throughput.remember(cfg, 4000, 0.0, 100)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # not one process as a user runs it by default
    assert not throughput.remember(cfg, 4000, 2.0, 100)
    assert throughput.recall(cfg) is None


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"%s": {"tokens_per_s": "fast"}}'])
def test_a_damaged_file_is_ignored_and_rewritten(home, tmp_path, text):
    cfg = _cfg(tmp_path)
    throughput.path().parent.mkdir(parents=True)
    throughput.path().write_text(text.replace("%s", throughput.key(cfg)))
    assert throughput.recall(cfg) is None
    assert throughput.remember(cfg, 300, 1.0, 50)
    assert throughput.recall(cfg)["tokens_per_s"] == 300


def test_an_unwritable_cache_does_not_fail_the_run(home, tmp_path):
    home.mkdir()
    (home / "cache").write_text("a file where the folder should be")
    assert throughput.remember(_cfg(tmp_path), 300, 1.0, 50) is False


def test_a_plain_train_run_records_its_tokens_per_second(home, tmp_path, capsys):
    steps = throughput.MIN_STEPS
    path = write_toml(tmp_path / "c.toml", merge(TINY, {"train": {"max_steps": steps,
                                                                  "out_dir": str(tmp_path / "o")}}))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    capsys.readouterr()
    log = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()][-1]
    got = throughput.recall(config.load(path))
    assert got["steps"] == steps
    # the log rounds elapsed_s to milliseconds
    assert log["tokens"] / (log["elapsed_s"] + 5e-4) <= got["tokens_per_s"] <= log["tokens"] / (
        log["elapsed_s"] - 5e-4)
