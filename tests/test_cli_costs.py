"""The cost commands as a user runs them: minigpt costs (measured and predicted), calibrate,
hardware, and the reports a training run leaves behind."""

import csv
import io
import json
import shutil

import pytest

from minigpt.counting import tables
from tests.conftest import TINY_TOML, run_cli


def test_a_run_leaves_costs_json_and_csv_with_the_schema(trained_run):
    doc = json.loads((trained_run / "costs.json").read_text())
    assert set(doc) == {"steps", "tokens", "conventions", "records", "totals"}
    assert doc["steps"] == 6 and doc["tokens"] == 6 * 4 * 16
    assert set(doc["records"][0]) == set(tables.FIELDS)
    assert {r["phase"] for r in doc["records"]} == {"forward", "backward", "optimizer", "eval"}
    train = [r for r in doc["records"] if r["phase"] != "eval"]
    assert doc["totals"]["forward"]["flops"] == sum(r["flops"] for r in train if r["phase"] == "forward")
    rows = list(csv.DictReader(io.StringIO((trained_run / "costs.csv").read_text())))
    assert len(rows) == len(doc["records"])


def test_the_end_of_run_summary_shows_the_evaluations_beside_training(trained_run):
    doc = json.loads((trained_run / "costs.json").read_text())
    text = tables.summary(doc["records"], doc["steps"], doc["tokens"])
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.split()}
    train = [r for r in doc["records"] if r["phase"] != "eval"]
    evals = [r for r in doc["records"] if r["phase"] == "eval"]
    assert lines["all"].split()[1:3] == tables.si(sum(r["flops"] for r in train)).split()
    assert lines["eval"].split()[1:3] == tables.si(sum(r["flops"] for r in evals)).split()
    assert "not in all" in lines["eval"]


@pytest.mark.parametrize("by", ["scope", "op", "kind", "layer", "phase"])
def test_costs_groups_a_run(trained_run, by):
    r = run_cli("-m", "minigpt", "costs", trained_run, "--by", by, "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    doc = json.loads((trained_run / "costs.json").read_text())
    assert sum(g["flops"] for g in out["groups"]) == doc["totals"]["all"]["flops"]


def test_costs_table_phase_top_and_csv(trained_run):
    r = run_cli("-m", "minigpt", "costs", trained_run, "--by", "op", "--phase", "backward", "--top", "3")
    assert r.returncode == 0 and "phase backward" in r.stdout and "conventions:" in r.stdout
    assert "more" in r.stdout  # --top cut the list
    c = run_cli("-m", "minigpt", "costs", trained_run, "--by", "kind", "--format", "csv")
    assert c.stdout.splitlines()[0].startswith("name,calls,flops")


def test_costs_predicts_without_a_run():
    r = run_cli("-m", "minigpt", "costs", "--config", TINY_TOML, "--batch", "2", "--seq", "16",
                "--by", "kind", "--format", "json")
    assert r.returncode == 0, r.stderr
    matmul = next(g for g in json.loads(r.stdout)["groups"] if g["name"] == "matmul")
    C, L, V, N = 128, 4, 256, 2 * 16
    assert matmul["flops"] == (6 * (12 * L * C * C + V * C) + 12 * L * 16 * C) * N
    d = run_cli("-m", "minigpt", "costs", "--config", TINY_TOML, "--mode", "decode", "--seq", "10")
    assert d.returncode == 0 and "decode step at position 10" in d.stdout


@pytest.mark.parametrize("args, words", [
    ((), "give a run folder"),
    (("--config", "configs/nope.toml"), "no such config"),
    (("/no/such/run",), "no costs.json"),
    (("--config", str(TINY_TOML), "--seq", "999"), "does not fit block_size"),
])
def test_costs_bad_input_is_one_line(args, words):
    r = run_cli("-m", "minigpt", "costs", *args)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (("--phase", "bogus"), "no records of phase 'bogus'"),
    (("--memory",), "--memory estimates a training run from a config"),
])
def test_costs_of_a_run_refuses_options_it_would_ignore(trained_run, args, words):
    r = run_cli("-m", "minigpt", "costs", trained_run, *args)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["{}", '{"steps": 1, "tokens": 2, "records": [{"op": "x"}]}',
                                  "[1, 2]"])
@pytest.mark.parametrize("command", ["costs", "report"])
def test_a_costs_json_of_another_shape_is_one_line(trained_run, tmp_path, text, command):
    r = _with_damaged_file(trained_run, tmp_path, "costs.json", text, command)
    assert r.returncode == 2 and "costs.json: unreadable: " in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _with_damaged_file(trained_run, tmp_path, name: str, text: str, command: str):
    """Run `minigpt COMMAND` on a copy of the trained run whose file `name` holds `text`."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / name).write_text(text)
    return run_cli("-m", "minigpt", command, run)


@pytest.mark.parametrize("text", ['{"watts": "x", "pue": 1}', '{"watts": 3, "pue": 1}'])
@pytest.mark.parametrize("command", ["costs", "report"])
def test_an_energy_json_of_another_shape_is_one_line(trained_run, tmp_path, text, command):
    r = _with_damaged_file(trained_run, tmp_path, "energy.json", text, command)
    assert r.returncode == 2 and "not a minigpt energy.json" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ['{"a": 1}', "[1]", '{"step": 1, "tokens": "x", "val_loss": 1}'])
def test_report_of_a_log_of_another_shape_is_one_line(trained_run, tmp_path, text):
    r = _with_damaged_file(trained_run, tmp_path, "log.jsonl", text + "\n", "report")
    assert r.returncode == 2 and "log.jsonl: entry 1 is not a minigpt log line" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_calibrate_saves_a_local_profile(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, MINIGPT_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "minigpt", "calibrate", "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "GFLOP/s" in r.stdout
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path))
    from minigpt.hardware import profiles

    prof = profiles.load_profile("local-cpu")
    assert prof.peak_flops["fp32"] > 1e9 and prof.memory_bandwidth > 1e8
    assert "measured by minigpt calibrate" in prof.sources["peak_flops.fp32"]
    assert "read (sum of" in r.stdout and "triad (a = b + s·c" in r.stdout  # the STREAM table
    assert prof.bandwidth["read.one_thread"] > 1e8 and "best of" in prof.notes["bandwidth.read.one_thread"]
    from minigpt.hardware import timing

    tm = timing.load(timing.calibrated_path())  # the time model, measured beside the profile
    assert tm.how == "quick" and tm.rate(256, 256, 256) > 1e8 and "gelu/tanh" in tm.elementwise


def test_hardware_lists_and_shows_profiles():
    r = run_cli("-m", "minigpt", "hardware")
    assert r.returncode == 0 and "h100-sxm" in r.stdout and "v100-sxm2" in r.stdout
    s = run_cli("-m", "minigpt", "hardware", "h100-sxm")
    assert s.returncode == 0 and "power_watts" in s.stdout and "source" not in s.stderr


def test_training_prints_the_cost_and_energy_report(trained_run):
    # The fixture's own run: train.py printed it; run a 2-step one here to read its stdout.
    r = run_cli("train.py", TINY_TOML, "--no-progress", "--set", f"train.out_dir={trained_run.parent / 'r2'!s}",
                "--set", "model.n_layer=1", "--set", "model.n_embd=16", "--set", "model.block_size=16",
                "--set", "train.batch_size=2", "--set", "train.max_steps=2", "--set", "eval.batches=1",
                "--set", 'data.path="corpora/tiny.txt"', "--watts", "50")
    assert r.returncode == 0, r.stderr
    for words in ("cost per layer", "model FLOPs utilisation", "energy, four ways", "time x power",
                  "at GPT-3 scale"):
        assert words in r.stdout, words
