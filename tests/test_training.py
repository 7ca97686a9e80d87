"""The trainer: its log and checkpoint, exact resumption (in-process and after a real SIGINT), a
loss that stops being finite, and the config file's documentation of every field."""

import dataclasses
import json
import math
import re
import shlex
import signal

import numpy as np
import pytest
from conftest import (
    TINY,
    TINY_TOML,
    interrupt_training,
    merge,
    run_cli,
    set_args,
    snapshot,
    tiny_config,
)

from minigpt import config
from minigpt.config import tomllib  # tomllib, or tomli before Python 3.11
from minigpt.nn.model import GPT
from minigpt.train import checkpoint
from minigpt.train.trainer import Trainer, TrainingDiverged

LOG_KEYS = {"step", "train_loss", "val_loss", "val_bpb", "lr", "tokens", "elapsed_s"}


def read_log(run_dir) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def without_time(log: list[dict]) -> list[dict]:
    """The log minus elapsed_s, the one field that may differ between identical runs."""
    return [{k: v for k, v in entry.items() if k != "elapsed_s"} for entry in log]


# --------------------------------------------------------------------------- (a) end to end


def test_training_writes_a_log_and_a_checkpoint_and_the_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, train={"max_steps": 30, "warmup_steps": 5, "learning_rate": 1e-2},
                      eval={"interval": 10, "batches": 4})
    result = Trainer(cfg, progress=False).run()

    assert (result.steps, result.interrupted) == (30, False)
    log = read_log(tmp_path)
    assert [e["step"] for e in log] == [10, 20, 30]
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size
    for entry in log:
        assert set(entry) == LOG_KEYS
        assert entry["tokens"] == entry["step"] * tokens_per_step
        assert all(math.isfinite(entry[k]) for k in ("train_loss", "val_loss", "lr"))
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert log[-1]["val_loss"] < log[0]["val_loss"]
    assert log[0]["val_loss"] < math.log(256)  # better than uniform over bytes
    assert [e["elapsed_s"] for e in log] == sorted(e["elapsed_s"] for e in log)

    meta, arrays = checkpoint.load(tmp_path / "ckpt.npz")
    assert meta["run"]["step"] == 30
    assert {"params", "adam_m", "adam_v"} <= set(arrays)


# --------------------------------------------------------------------------- (b) resumption


def test_resume_after_a_stop_mid_interval_reproduces_the_uninterrupted_run(tmp_path):
    # dropout and gradient accumulation on, so their random state must survive the checkpoint too
    sections = {"train": {"max_steps": 12, "grad_accum": 2}, "eval": {"interval": 4},
                "model": {"dropout": 0.1}}
    Trainer(tiny_config(tmp_path / "a", **sections), progress=False).run()

    def stop_at_6(trainer):
        if trainer.state.step == 6:
            trainer.request_stop()

    first = Trainer(tiny_config(tmp_path / "b", **sections), progress=False, on_step=stop_at_6).run()
    assert (first.steps, first.interrupted) == (6, True)
    assert checkpoint.load(tmp_path / "b")[0]["run"]["step"] == 6
    second = Trainer(tiny_config(tmp_path / "b", **sections), resume=True, progress=False).run()
    assert (second.steps, second.interrupted) == (12, False)

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [e["step"] for e in log_a] == [4, 8, 12]
    assert without_time(log_b) == without_time(log_a)  # exactly: ==, not approximately
    arrays_a, arrays_b = checkpoint.load(tmp_path / "a")[1], checkpoint.load(tmp_path / "b")[1]
    for name in ("params", "adam_m", "adam_v"):
        assert np.array_equal(arrays_a[name], arrays_b[name]), name
    # the cost report covers the whole run, across the stop: the same counts as the uninterrupted one
    costs_a, costs_b = (json.loads((tmp_path / d / "costs.json").read_text()) for d in "ab")
    counted = ("scope", "op", "kind", "phase", "dtype", "calls", "flops", "bytes_read", "bytes_written")
    assert (costs_a["steps"], costs_a["tokens"]) == (costs_b["steps"], costs_b["tokens"])
    assert sorted(tuple(r[k] for k in counted) for r in costs_a["records"]) == sorted(
        tuple(r[k] for k in counted) for r in costs_b["records"])


def test_resuming_a_finished_run_reports_its_last_losses_not_nan(tmp_path):
    sections = {"train": {"max_steps": 4}, "eval": {"interval": 2}}
    done = Trainer(tiny_config(tmp_path, **sections), progress=False).run()
    again = Trainer(tiny_config(tmp_path, **sections), resume=True, progress=False).run()
    assert again.steps == done.steps == 4
    assert (again.val_loss, again.train_loss, again.val_bpb) == (
        done.val_loss, done.train_loss, done.val_bpb)
    assert [e["step"] for e in read_log(tmp_path)] == [2, 4]


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    code, out, stdout, err = interrupt_training(tmp_path, signal.SIGINT)
    output = stdout + err
    assert code == 130, output
    assert "Traceback" not in output
    assert "--resume" in err
    # the suggested command resumes this run: it carries the --set overrides (out_dir among them)
    suggested = shlex.split(err.split("Continue with: ", 1)[1].splitlines()[0])
    assert suggested[-1] == "--resume" and f'train.out_dir="{out}"' in suggested, suggested
    stopped = re.search(r"stopped at step (\d+)", err)
    assert stopped, err
    meta, arrays = checkpoint.load(out / "ckpt.npz")
    assert meta["run"]["step"] == int(stopped.group(1)) >= 5
    assert arrays["params"].shape == arrays["adam_m"].shape == arrays["adam_v"].shape


# --------------------------------------------------------------------------- (c) a non-finite loss


def test_divergence_stops_with_a_message_and_keeps_the_checkpoint(run_copy):
    """Resuming the 6-step run with an absurd learning rate: the loss becomes NaN within a few
    steps, before the next evaluation would overwrite the checkpoint."""
    before = snapshot(run_copy)
    r = run_cli("train.py", TINY_TOML, "--no-progress", "--resume",
                *set_args(merge(TINY, {"train": {"out_dir": str(run_copy), "max_steps": 20,
                                                 "learning_rate": 1e30}})))
    output = r.stdout + r.stderr
    assert r.returncode == 1, output
    assert "Traceback" not in output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0] == r.stderr.splitlines()[-1], r.stderr
    assert "loss became nan" in errors[0] and "learning_rate" in errors[0]
    assert str(run_copy / "ckpt.npz") in errors[0]
    assert snapshot(run_copy) == before
    assert checkpoint.load(run_copy)[0]["run"]["step"] == 6


def test_divergence_before_the_first_checkpoint_claims_no_checkpoint(tmp_path):
    """A fresh run that diverges before its first evaluation has no checkpoint; the message must
    not send the user to one."""
    r = run_cli("train.py", TINY_TOML, "--no-progress",
                *set_args(merge(TINY, {"train": {"out_dir": str(tmp_path), "learning_rate": 1e30,
                                                 "warmup_steps": 0}})))
    assert r.returncode == 1, r.stdout + r.stderr
    message = r.stderr.splitlines()[-1]
    assert "loss became" in message
    ckpt = tmp_path / "ckpt.npz"
    assert ckpt.exists() or str(ckpt) not in message, f"{message}\nbut {ckpt} does not exist"


def test_nan_loss_raises_training_diverged_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned = False
    real_loss = GPT.loss

    def loss(self, idx, targets, rng=None):
        value, cache = real_loss(self, idx, targets, rng)
        return (math.nan if poisoned else value), cache

    monkeypatch.setattr(GPT, "loss", loss)
    saved = {}

    def poison_after_step_4(trainer):
        nonlocal poisoned
        if trainer.state.step == 4:  # the checkpoint of step 3 is on disk
            saved["ckpt"] = (tmp_path / "ckpt.npz").read_bytes()
            poisoned = True

    trainer = Trainer(tiny_config(tmp_path, train={"max_steps": 9}), progress=False,
                      on_step=poison_after_step_4)
    with pytest.raises(TrainingDiverged, match="step 5") as exc:
        trainer.run()
    assert str(tmp_path / "ckpt.npz") in str(exc.value)
    assert (tmp_path / "ckpt.npz").read_bytes() == saved["ckpt"]
    assert checkpoint.load(tmp_path)[0]["run"]["step"] == 3


# --------------------------------------------------------------------------- (d) the config


def test_tiny_toml_documents_exactly_the_config_fields():
    text = TINY_TOML.read_text()
    in_file = {s: set(t) for s, t in tomllib.loads(text).items()}
    in_code = {s: {f.name for f in dataclasses.fields(cls)} for s, cls in config.SECTIONS.items()}
    assert in_file == in_code

    key_line = re.compile(r"^\s*(\w+)\s*=\s*(.*)$")
    for line in text.splitlines():
        m = key_line.match(line)
        if m:
            assert re.search(r"#\s*\S", m.group(2)), f"no comment on: {line}"
    config.load(TINY_TOML)  # and it is valid


def test_set_overrides_parse_ints_floats_and_strings():
    cfg = config.load(TINY_TOML, [
        "train.max_steps=100",
        "train.learning_rate = 1e-2",
        "train.min_lr=0",  # an int where a float is wanted is widened
        "data.path=corpora/fables.txt",  # a bare word is a string
        'train.dtype="float64"',  # so is a quoted one
        "eval.interval=7", "eval.interval=9",  # the last one wins
    ])
    assert cfg.train.max_steps == 100 and type(cfg.train.max_steps) is int
    assert cfg.train.learning_rate == 1e-2 and type(cfg.train.learning_rate) is float
    assert cfg.train.min_lr == 0.0 and type(cfg.train.min_lr) is float
    assert cfg.data.path == "corpora/fables.txt"
    assert cfg.train.dtype == "float64"
    assert cfg.eval.interval == 9
    assert cfg.model.n_layer == 4  # untouched fields keep the file's values
