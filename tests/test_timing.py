"""The time model and the forecast (minigpt.hardware.timing, minigpt.energy.forecast): its
interpolation, its per-call sums, its agreement with the closed form, the whole-run forecast and its
joules, `minigpt costs --predict`, the quick machine figures that a faster run replaces (the
poisoned cache), `minigpt calibrate --check`, and a real (small) measurement of this machine."""

import json
import math
import subprocess
import sys

import pytest

from minigpt import config
from minigpt.counting import closed_form
from minigpt.energy import forecast
from minigpt.errors import ConfigError
from minigpt.hardware import calibrate, profiles, timing
from tests.conftest import ROOT, TINY, TINY_TOML, fixed_time_model, merge, set_args


def _cfg(**model):
    return config.ModelConfig(**({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
                                  "vocab_size": 64} | model))


# ----------------------------------------------------------------------------- interpolation


def test_interpolate_is_log_log_between_points_and_holds_bandwidth_beyond():
    points = [[1e3, 1e-6], [1e5, 1e-4], [1e7, 4e-3]]
    assert timing.interpolate(points, 10) == 1e-6  # below the first: the call's fixed cost
    assert timing.interpolate(points, 1e4) == pytest.approx(1e-5)  # halfway in logs
    assert timing.interpolate(points, 1e6) == pytest.approx(math.sqrt(1e-4 * 4e-3))
    assert timing.interpolate(points, 4e7) == pytest.approx(16e-3)  # the last point's bandwidth


def test_tidy_points_keeps_the_fastest_try_and_never_falls_with_bytes():
    raw = [(1000, 5e-6), (1050, 3e-6), (1e5, 2e-4), (1e6, 1e-4), (1e7, 1e-3)]
    assert timing.tidy_points(raw) == [[1000.0, 3e-6], [1e5, 1e-4], [1e6, 1e-4], [1e7, 1e-3]]


def test_rate_is_exact_for_a_power_law_and_clamped_outside_the_grid():
    grid = [[1, 16, 256], [8, 64, 512], [8, 64, 512]]

    def law(m, k, n):  # log-linear in each log size: trilinear interpolation is exact
        return 1e9 * m ** 0.5 * k ** 0.25 * n ** 0.125

    rates = [[[law(m, k, n) for n in grid[2]] for k in grid[1]] for m in grid[0]]
    tm = timing.TimeModel.constant(1e9, 1e9, 1e-6)
    tm.grid, tm.rates = grid, rates
    for m, k, n in ((4, 20, 300), (100, 8, 9), (1, 512, 64), (200, 300, 100)):
        assert tm.rate(m, k, n) == pytest.approx(law(m, k, n), rel=1e-9)
    assert tm.rate(4096, 4096, 4096) == pytest.approx(law(256, 512, 512))  # held at the edge
    assert tm.rate(1, 1, 1) == pytest.approx(law(1, 8, 8))


def test_a_call_costs_its_fixed_cost_plus_the_slower_of_arithmetic_and_streaming():
    tm = timing.TimeModel.constant(flops=1e10, bandwidth=1e9, call_s=1e-5)
    key = closed_form.RecordKey("h0.attn.c_attn", "x@w", "matmul", "forward", "float32")
    compute_bound = closed_form.OpCall(key, 2 * 4 * 64 * 64 * 64, 100, 100, (4, 64, 64, 64))
    assert tm.call_seconds(compute_bound) == pytest.approx(1e-5 + 2 * 4 * 64 ** 3 / 1e10)
    streaming = closed_form.OpCall(key, 2 * 512 * 512, 4 * 512 * 513, 2048, (1, 1, 512, 512))
    assert tm.call_seconds(streaming) == pytest.approx(1e-5 + (4 * 512 * 513 + 2048) / 1e9)
    small = closed_form.OpCall(key._replace(kind="gelu", op="tanh"), 8, 40, 80, None)
    big = small._replace(bytes_read=4e6, bytes_written=8e6)
    assert tm.call_seconds(small) == pytest.approx(1e-5)  # below the point: the fixed cost
    assert tm.call_seconds(big) == pytest.approx(12e6 / 1e9)


def test_a_product_of_several_rows_streams_at_the_several_rows_bandwidth():
    """One row streams its weight at stream_bandwidth; two or more at stream_bandwidth_rows (BLAS
    packs the weight first), where measured."""
    tm = timing.TimeModel.constant(flops=1e13, bandwidth=4e10, call_s=0.0)
    key = closed_form.RecordKey("lm_head", "x@wte.T", "matmul", "decode", "float32")
    one = closed_form.OpCall(key, 2 * 768 * 50257, 4 * 768 * 50257, 0, (1, 1, 768, 50257))
    eight = one._replace(shape=(1, 8, 768, 50257))
    assert tm.call_seconds(eight) == pytest.approx(4 * 768 * 50257 / 4e10)  # not measured: one row's
    tm.stream_bandwidth_rows = 1e10
    assert tm.call_seconds(one) == pytest.approx(4 * 768 * 50257 / 4e10)
    assert tm.call_seconds(eight) == pytest.approx(4 * 768 * 50257 / 1e10)


def test_an_elementwise_call_larger_than_the_cache_is_held_to_the_memorys_bandwidth():
    """Calibrated in the cache at 100 GB/s, an op over 100 MB runs at the memory's 10 GB/s."""
    tm = timing.TimeModel.constant(flops=1e10, bandwidth=1e11, call_s=1e-6)
    tm.stream_bandwidth, tm.cache_bytes = 1e10, 1 << 20
    key = closed_form.RecordKey("clip", "scale", "clip", "optimizer", "float32")
    in_cache = closed_form.OpCall(key, 0, 250_000, 250_000, None)
    from_memory = closed_form.OpCall(key, 0, 50_000_000, 50_000_000, None)
    assert tm.call_seconds(in_cache) == pytest.approx(500_000 / 1e11)
    assert tm.call_seconds(from_memory) == pytest.approx(100_000_000 / 1e10)


def test_a_packed_product_runs_at_the_packed_kernels_rate_where_they_run():
    """A 4-bit product at the measured packed rate (log-linear in m between points, held beyond
    them); the same call on NumPy's path, or with no packed figure, at the float32 rate."""
    tm = timing.TimeModel.constant(flops=1e10, bandwidth=1e9, call_s=1e-6)
    tm.packed = {"w4a8": [[1, 2e10], [16, 8e10]]}
    key = closed_form.RecordKey("h0.mlp.c_fc", "x@w", "matmul", "decode", "w4a8")
    one = closed_form.OpCall(key, 2 * 768 * 3072, 0, 0, (1, 1, 768, 3072))
    four = one._replace(shape=(1, 4, 768, 3072))
    many = one._replace(shape=(1, 64, 768, 3072))
    assert tm.call_seconds(one, False, packed=True) == pytest.approx(1e-6 + 2 * 768 * 3072 / 2e10)
    assert tm.packed_rate("w4a8", 4) == pytest.approx(4e10)  # halfway in log m
    assert tm.call_seconds(four, False, packed=True) == pytest.approx(1e-6 + 8 * 768 * 3072 / 4e10)
    assert tm.packed_rate("w4a8", 64) == pytest.approx(8e10)
    assert tm.call_seconds(many, False, packed=False) == pytest.approx(1e-6 + 128 * 768 * 3072 / 1e10)
    assert tm.packed_rate("w8a32", 1) is None


def test_a_decode_steps_few_row_float32_products_run_at_the_tiled_kernels_rate():
    """With the decode kernels (packed=True), a float32 weight product runs at the tiled kernel's
    measured rate (nn/tiled.py), held past its last point; an attention product (many heads a
    call) and any product on NumPy's path at the float32 grid's rate or the stream's."""
    tm = timing.TimeModel.constant(flops=1e10, bandwidth=1e12, call_s=0.0)
    tm.packed = {"float32": [[1, 2e10], [8, 8e10], [32, 16e10]]}
    key = closed_form.RecordKey("h0.mlp.c_fc", "x@w", "matmul", "decode", "float32")
    call = closed_form.OpCall(key, 0, 0, 0, (1, 8, 768, 3072))
    flops = 2 * 8 * 768 * 3072
    assert tm.call_seconds(call, False, packed=True) == pytest.approx(flops / 8e10)
    assert tm.call_seconds(call, False, packed=False) == pytest.approx(flops / 1e10)
    one = call._replace(shape=(1, 1, 768, 3072))
    assert tm.call_seconds(one, False, packed=True) == pytest.approx(flops / 8 / 2e10)
    many = call._replace(shape=(1, 64, 768, 3072))
    assert tm.call_seconds(many, False, packed=True) == pytest.approx(8 * flops / 16e10)
    for shape in ((12, 8, 64, 100),):
        other = call._replace(shape=shape)
        b, m, k, n = shape
        assert tm.call_seconds(other, False, packed=True) == pytest.approx(2 * b * m * k * n / 1e10)


def test_the_packed_kernels_are_measured_where_numba_runs_them(monkeypatch):
    pytest.importorskip("numba")
    from minigpt import kernels

    monkeypatch.setattr(kernels, "active", lambda: "numba")
    rates = timing.measure_packed(1, nbytes=1 << 20)
    assert sorted(rates) == ["float32", "w16a32", "w4a8", "w8a32"]
    for dtype, points in rates.items():
        rows = timing.TILED_M if dtype == "float32" else timing.PACKED_M
        assert [m for m, _ in points] == list(rows) and all(r > 0 for _, r in points)
    monkeypatch.setattr(kernels, "active", lambda: "numpy")
    assert timing.measure_packed(1, nbytes=1 << 20) == {}


def test_building_a_model_keeps_freed_memory_for_reuse(monkeypatch):
    """Every process that runs a model does so on memory glibc keeps: the calibration's figures
    are then a run's, not those of a process page-faulting through fresh memory each step."""
    import numpy as np

    from minigpt import backend
    from minigpt.nn.model import GPT
    from minigpt.nn.params import init

    calls = []
    monkeypatch.setattr(backend, "_memory_kept", False)
    monkeypatch.setattr(backend, "keep_freed_memory", lambda: calls.append(1))
    GPT(_cfg(), init(_cfg(), np.random.default_rng(0)))
    assert calls == [1]


# ----------------------------------------------------------------------------- calls and steps


@pytest.mark.parametrize("mode", closed_form.MODES)
@pytest.mark.parametrize("model", [{}, {"n_layer": 3, "n_embd": 48, "n_head": 3, "dropout": 0.1}])
def test_op_calls_sum_to_the_closed_form_records(mode, model):
    cfg = _cfg(**model)
    calls = closed_form.op_calls(cfg, mode, 3, 16, grad_accum=2)
    want = {"train": lambda: closed_form.predict_training_step(cfg, 3, 16, grad_accum=2),
            "eval": lambda: closed_form.predict_forward(cfg, 3, 16, "eval", targets=True),
            "prefill": lambda: closed_form.predict_forward(cfg, 3, 16, "prefill"),
            "decode": lambda: closed_form.predict_decode(cfg, 3, 16)}[mode]()
    got = {}
    for c in calls:
        g = got.setdefault(c.key, [0, 0, 0, 0])
        g[0] += 1
        g[1] += c.flops
        g[2] += c.bytes_read
        g[3] += c.bytes_written
        if c.shape is not None:  # a product's shape gives its FLOPs
            b, m, k, n = c.shape
            assert c.flops == 2 * b * m * k * n and c.key.kind == "matmul"
    assert got == {k: [r.calls, r.flops, r.bytes_read, r.bytes_written] for k, r in want.items()}


def test_a_step_is_the_sum_of_its_calls_and_the_unmetered_gap():
    tm = timing.TimeModel.constant(2e10, 5e9, 3e-6, gap_per_call=1e-6)
    calls = closed_form.op_calls(_cfg(), "train", 4, 32)
    step = timing.predict_calls(tm, calls, "train")
    assert step.calls == len(calls)
    assert step.unmetered == pytest.approx(1e-6 * len(calls))
    streaming = sum(c.bytes_read + c.bytes_written for c in calls) > tm.cache_bytes
    assert step.seconds == pytest.approx(sum(tm.call_seconds(c, streaming) for c in calls)
                                         + 1e-6 * len(calls))
    faster = timing.TimeModel.constant(4e10, 10e9, 1.5e-6, gap_per_call=0.5e-6)
    assert timing.predict_calls(faster, calls, "train").seconds == pytest.approx(step.seconds / 2)


# ----------------------------------------------------------------------------- the forecast


def _config(steps=10, interval=4, batches=3):
    cfg = config.load(TINY_TOML, [f"train.max_steps={steps}", f"eval.interval={interval}",
                                  f"eval.batches={batches}", "model.n_layer=2",
                                  "model.n_embd=32", "model.n_head=2", "model.block_size=32"])
    return cfg


@pytest.mark.parametrize("steps, interval, want", [(10, 4, 3), (8, 4, 2), (1, 100, 1), (500, 100, 5)])
def test_a_training_forecast_counts_steps_and_evaluations(steps, interval, want):
    cfg = _config(steps, interval)
    tm = timing.TimeModel.constant(2e10, 5e9, 3e-6, gap_per_call=1e-6)
    f = forecast.forecast(cfg, tm, "train", watts=20.0)
    assert f.evaluations == want == forecast.evaluations(steps, interval)
    B, T = cfg.train.batch_size, cfg.model.block_size
    step = timing.predict_calls(tm, closed_form.op_calls(cfg.model, "train", B, T), "train")
    ev = timing.predict_calls(tm, closed_form.op_calls(cfg.model, "eval", B, T), "eval")
    assert f.seconds_per_step == pytest.approx(step.seconds)
    assert f.seconds_per_evaluation == pytest.approx(3 * ev.seconds)
    assert f.seconds == pytest.approx(steps * step.seconds + want * 3 * ev.seconds)
    assert f.joules == pytest.approx(f.seconds * 20.0 * f.pue)
    doc = f.to_json()
    assert doc["wh"] == pytest.approx(f.joules / 3600) and doc["watts_basis"] == "--watts"
    layer_sum = sum(g["seconds_per_step"] for g in doc["layers"])
    assert layer_sum + f.unmetered_per_step == pytest.approx(f.seconds_per_step)


def test_a_decode_forecast_sums_each_position_and_stops_at_the_context():
    cfg = _config()
    tm = timing.TimeModel.constant(2e10, 5e9, 3e-6)
    f = forecast.forecast(cfg, tm, "decode", steps=5, batch=1, seq=10)
    each = [timing.predict_calls(tm, closed_form.op_calls(cfg.model, "decode", 1, p), "decode").seconds
            for p in range(10, 15)]
    assert f.seconds_per_step == pytest.approx(sum(each) / 5) and f.seconds == pytest.approx(sum(each))
    assert each[-1] > each[0]  # a longer cache costs more
    late = forecast.forecast(cfg, tm, "decode", steps=50, batch=1, seq=30)  # positions 30, 31 only
    two = [timing.predict_calls(tm, closed_form.op_calls(cfg.model, "decode", 1, p), "decode").seconds
           for p in (30, 31)]
    assert late.seconds_per_step == pytest.approx(sum(two) / 2)


def test_the_predicted_power_prefers_given_then_profile_then_the_estimate():
    given = forecast.predicted_power(None, 12.0, 1.5)
    assert given.watts == 12.0 and given.basis.value == "given"
    est = forecast.predicted_power(None, None, 1.5)
    assert est.basis.value == "estimated" and "1.5 of" in est.note and est.watts > 0
    none = forecast.predicted_power(None, None, 1.5, estimate=False)
    assert none.watts is None and "needs a power figure" in none.note


def test_against_reports_signed_errors():
    f = forecast.forecast(_config(), timing.TimeModel.constant(2e10, 5e9, 3e-6), "train", watts=10.0)
    p = forecast.against(f, f.seconds_per_step / 1.25, f.seconds_per_evaluation * 2, f.seconds / 2,
                         f.joules, "time x power")
    assert p["error"]["seconds_per_step"] == pytest.approx(0.25)
    assert p["error"]["seconds_per_evaluation"] == pytest.approx(-0.5)
    assert p["error"]["seconds"] == pytest.approx(1.0) and p["error"]["joules"] == pytest.approx(0.0)
    lines = forecast.comparison_lines(p)
    assert "(+25.0%)" in lines[0] and "(-50.0%)" in lines[0] and "(+100.0%" in lines[1]


def test_duration_reads_as_a_person_would():
    assert forecast.duration(145) == "2 min 25 s"
    assert forecast.duration(0.42) == "0.42 s"
    assert forecast.duration(3 * 3600 + 300) == "3 h 5 min"
    assert forecast.duration(5 * 86400) == "5.0 days"


# ----------------------------------------------------------------------------- the commands


def _run(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


def test_costs_predict_json_has_the_issue_keys_and_the_forecast_figures():
    r = _run("-m", "minigpt", "costs", "--config", TINY_TOML, "--predict", "--steps", "50",
             "--watts", "30", "--format", "json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("seconds", "seconds_per_step", "joules", "wh", "watts", "watts_basis"):
        assert doc[key] is not None, key
    cfg = config.load(TINY_TOML)
    tm = timing.load(timing.calibrated_path())  # the conftest's fixed model: same in both
    f = forecast.forecast(cfg, tm, "train", 50, watts=30.0)
    assert doc["seconds"] == pytest.approx(f.seconds) and doc["evaluations"] == 1
    assert doc["joules"] == pytest.approx(f.seconds * 30 * f.pue) and doc["watts"] == 30
    assert {g["name"] for g in doc["layers"]} >= {"h0", "h3", "lm_head", "adamw"}
    table = _run("-m", "minigpt", "costs", "--config", TINY_TOML, "--predict", "--mode", "decode",
                 "--seq", "10", "--steps", "20", "--batch", "1")
    assert table.returncode == 0 and "whole run: about" in table.stdout and "20 decode steps" in table.stdout


@pytest.mark.parametrize("args, what", [(["--steps", "0"], "--steps"), (["--watts", "-3"], "--watts"),
                                        (["--ranks", "2"], "--ranks"),
                                        (["--format", "csv"], "--format")])
def test_costs_predict_bad_input_is_one_line(args, what):
    r = _run("-m", "minigpt", "costs", "--config", TINY_TOML, "--predict", *args)
    assert r.returncode == 2 and what in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _stream(bytes_per_s: float) -> tuple:
    """STREAM figures, all at one rate, for a cache written by hand (a cache without them is
    measured again)."""
    from minigpt.hardware.bandwidth import StreamFigure

    return tuple(StreamFigure(kind, threads, bytes_per_s, 64, 3, "numpy, Python threads", None)
                 for kind in ("read", "write", "copy", "triad") for threads in (1, 2))


def _poison(home):
    """A quick-measurement cache whose peak (1 GFLOP/s) and bandwidth (1 MB/s) any run beats."""
    calibrate._write_quick(calibrate.MachineFigures(fp32=1e9, fp64=5e8, bandwidth=1e6, n=1024,
                                                    copy_mib=64, stream=_stream(1e6)),
                           {"measured_at": "2026-01-01T00:00:00+00:00", "load_average": [0.1, 0.1],
                            "cores": 2, "tries": 5, "raised": []})


def test_a_poisoned_cache_is_detected_and_replaced_by_the_run(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    fixed_time_model(tmp_path / "home")
    _poison(tmp_path / "home")
    assert profiles.peak(calibrate.quick_profile(), "fp32") == 1e9
    out = tmp_path / "run"
    # batch 32: the run's products must be long enough to be trusted as rates (MIN_RECORD_SECONDS)
    # on a quiet, fast machine too
    sections = merge(TINY, {"train": {"out_dir": str(out), "max_steps": 10, "batch_size": 32},
                            "model": {"n_embd": 128, "block_size": 64}})
    r = subprocess.run([sys.executable, "train.py", str(TINY_TOML), "--no-progress",
                        *set_args(sections)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, MINIGPT_HOME=str(tmp_path / "home")), check=False)
    assert r.returncode == 0, r.stderr
    assert "suspect figure replaced" in r.stdout and "above the cached quick measurement's fp32 1.0" in r.stdout
    raised = profiles.peak(calibrate.quick_profile(), "fp32")
    assert raised > 1e9
    meta = calibrate.cache_meta()
    assert meta["raised"][0]["figure"] == "fp32" and meta["raised"][0]["from"] == 1e9
    assert meta["raised"][0]["to"] == pytest.approx(raised)
    assert calibrate.quick_profile().bandwidth["read.one_thread"] == 1e6  # rewritten, not re-measured
    mfu = float(r.stdout.split("model FLOPs utilisation: ")[1].split("%")[0])
    assert 0 < mfu <= 100  # against the replaced peak, no longer above it
    assert "prediction: about" in r.stderr
    doc = json.loads((out / "energy.json").read_text())
    p = doc["prediction"]
    assert p["steps"] == 10 and p["measured"]["seconds_per_step"] > 0
    assert p["error"]["seconds_per_step"] == pytest.approx(
        (p["seconds_per_step"] - p["measured"]["seconds_per_step"]) / p["measured"]["seconds_per_step"])
    assert "predicted against measured" in r.stdout
    assert "predicted against measured" in (out / "report.html").read_text()


def test_a_figure_no_run_beats_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    calibrate._write_quick(calibrate.MachineFigures(1e15, 1e15, 1e15, 1024, 64, stream=_stream(1e15)),
                           {"raised": []})
    rows = [{"scope": "lm_head", "op": "x@wte.T", "kind": "matmul", "phase": "forward",
             "dtype": "float32", "calls": 10, "flops": 10 ** 11, "bytes_read": 1, "bytes_written": 1,
             "seconds": 1.0}]
    check = calibrate.check_run(rows)
    assert check.matmul_flops == 1e11 and check.notes == []
    assert profiles.peak(calibrate.quick_profile(), "fp32") == 1e15
    short = [rows[0] | {"seconds": 0.005, "flops": 10 ** 15}]  # too short to time: not trusted
    assert calibrate.best_rates(short).matmul_flops == 0


def test_a_calibrated_profile_is_flagged_not_rewritten(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    m = calibrate.MachineFigures(1e9, 1e9, 1e9, 2048, 256)
    (tmp_path / "home" / "hardware").mkdir(parents=True)
    calibrate.save(calibrate.profile_toml(m))
    rows = [{"scope": "h0.mlp.c_fc", "op": "x@w", "kind": "matmul", "phase": "forward",
             "dtype": "float32", "calls": 1, "flops": 5 * 10 ** 9, "bytes_read": 1,
             "bytes_written": 1, "seconds": 1.0}]
    notes = calibrate.check_run(rows).notes
    assert len(notes) == 1 and "above the local-cpu profile's float32 matmul" in notes[0]
    assert profiles.peak(profiles.load_profile("local-cpu"), "fp32") == 1e9


def test_a_cache_taken_under_load_says_so():
    assert calibrate.suspect_note({"load_average": [3.5, 2.0], "cores": 2, "measured_at": "x"})
    assert "under load" in calibrate.suspect_note({"load_average": [3.5], "cores": 2})
    assert calibrate.suspect_note({"load_average": [0.2, 0.9], "cores": 2}) == ""
    tm = timing.TimeModel.constant(1e9, 1e9, 1e-6)
    assert timing.suspect(tm) == ""
    tm.load_average, tm.cores = [6.0, 6.0], 4
    assert "under load" in timing.suspect(tm) and "load average 6" in timing.provenance(tm)


def test_calibrate_check_compares_and_raises_a_low_cache(tmp_path, monkeypatch, capsys):
    from minigpt.cli.costs import cmd_calibrate

    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    _poison(tmp_path / "home")
    monkeypatch.setattr(calibrate, "measure", lambda quick=False, tries=None: calibrate.MachineFigures(
        fp32=2e9, fp64=1e8, bandwidth=2e6, n=1024, copy_mib=64, stream=_stream(3e6)))
    assert cmd_calibrate(["--check"]) == 0
    out = capsys.readouterr().out
    assert "float32 matmul" in out and "2.00" in out and "suspect" in out
    assert "replaced the cached" in out
    prof = calibrate.quick_profile()
    assert profiles.peak(prof, "fp32") == 2e9 and profiles.peak(prof, "fp64") == 5e8  # higher kept
    assert profiles.require(prof, "memory_bandwidth") == 2e6
    assert prof.bandwidth["read.all_cores"] == 3e6 and "read, all cores" in out  # STREAM raised too


def test_the_quick_measurement_is_the_best_of_its_tries(monkeypatch):
    speeds = iter([1e9, 3e9, 2e9, 5e9, 4e9])
    monkeypatch.setattr(calibrate, "matmul_flops", lambda dtype, n, repeats: next(speeds)
                        if dtype == "float32" else 1.0)
    monkeypatch.setattr(calibrate, "copy_bandwidth", lambda nbytes, repeats: 1.0)
    assert calibrate.measure(quick=True, tries=5).fp32 == 5e9


def test_a_damaged_time_model_is_measured_again(tmp_path, monkeypatch):
    from minigpt.train import timing_runs

    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    made = []

    def fake(quick=True):
        made.append(quick)
        return timing.TimeModel.constant(1e9, 1e9, 1e-6)

    monkeypatch.setattr(timing_runs, "measure", fake)
    first = timing_runs.time_model()
    assert made == [True] and timing_runs.time_model().call_s == first.call_s and made == [True]
    path = timing.cache_path(timing_runs.cache_key())
    path.write_text('{"grid": 1}')
    timing_runs.time_model()
    assert made == [True, True]
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a minigpt time model"):
        timing.load(tmp_path / "x.json")


def test_a_real_measurement_has_every_figure_the_predictions_use():
    """A small real calibration (two shapes, a 2-point grid): every op the shapes ran has points,
    every mode a gap, the grid its rates; an unseen shape then has a finite prediction. (Its
    accuracy is bench/predict.py's to measure: a test does not time this machine.)"""
    from minigpt.counting.meter import METER
    from minigpt.train import timing_runs

    METER.reset()
    shapes = (timing_runs.Shape(1, 32, 2, 32, 2, 128), timing_runs.Shape(1, 64, 2, 64, 4, 256))
    tm = timing_runs.measure(shapes=shapes, grid=((1, 64), (16, 256), (16, 256)), tries=2)
    assert METER.records == {}  # the calibration's records are not left in the meter
    ran = {f"{k.kind}/{k.op}" for k in closed_form.predict_training_step(_cfg(), 2, 8)
           if k.kind != "matmul"}
    assert ran <= set(tm.elementwise)
    assert all(len(p) >= 1 and all(s > 0 for _, s in p) for p in tm.elementwise.values())
    assert all(tm.gap_per_call[m] >= 0 and tm.gap_per_byte[m] >= 0 for m in timing.MODES)
    assert all(r > 0 for plane in tm.rates for row in plane for r in row)
    assert tm.stream_bandwidth > 0 and tm.stream_bandwidth_rows > 0 and tm.call_s > 0 and 0 < tm.busy_cores
    assert tm.how == "quick" and tm.measured_at and len(tm.load_average) == 2
    back = timing.TimeModel.from_json(json.loads(json.dumps(tm.to_json())))
    cfg = config.ModelConfig(n_layer=2, n_head=3, n_embd=48, block_size=48, vocab_size=200)
    calls = closed_form.op_calls(cfg, "train", 3, 48)
    step = timing.predict_calls(back, calls, "train")
    assert 0 < step.seconds < math.inf and step.calls == len(calls)
    assert step.seconds == pytest.approx(timing.predict_calls(tm, calls, "train").seconds)


def test_a_generation_forecast_is_one_prefill_then_each_decode_position():
    cfg = _cfg()
    tm = timing.TimeModel.constant(2e10, 5e9, 3e-6, gap_per_call=1e-6)
    g = forecast.generation(cfg, tm, 5, 100)  # positions 5 .. 31: the context ends the steps
    assert g.steps == 27
    each = [timing.predict_calls(tm, closed_form.op_calls(cfg, "decode", 1, p), "decode")
            for p in range(5, 32)]
    assert g.decode_s == pytest.approx(sum(s.seconds for s in each))
    assert g.decode_metered_s == pytest.approx(sum(s.seconds - s.unmetered for s in each))
    assert g.tokens_per_s == pytest.approx(27 / g.decode_s)
    pre = timing.predict_calls(tm, closed_form.op_calls(cfg, "prefill", 1, 5), "prefill")
    assert g.prefill_s == pytest.approx(pre.seconds)
    line = forecast.generation_line(g, 2 * g.prefill_metered_s, 2 * g.decode_metered_s)
    assert "(measured" in line and "-50%" in line and "+100%" in line  # a rate: twice as fast


def test_an_int8_generation_forecast_reads_fewer_weight_bytes():
    from minigpt.nn import quant

    cfg = _cfg(n_embd=256, n_head=4, vocab_size=4096, block_size=64)
    tm = timing.TimeModel.constant(1e12, 1e9, 1e-7)  # bandwidth-bound on purpose
    tm.cache_bytes = 0  # every step streams
    fp32 = forecast.generation(cfg, tm, 8, 8)
    w8 = forecast.generation(cfg, tm, 8, 8, quant=quant.QuantConfig("w8a32", False, False, None))
    assert w8.tokens_per_s > 1.5 * fp32.tokens_per_s


def test_a_decode_steps_unmetered_bytes_stop_at_the_cache():
    """timing.gap_bytes: a decode step's unmetered seconds grow with its bytes up to the
    last-level cache's and no further (fitted on steps of a few MB, the uncapped term put tens of
    milliseconds of Python into each step of GPT-2 124M); other modes' grow with all of them.
    The fit counts the calibration's bytes the same way, step by step."""
    from minigpt.train import timing_runs

    tm = timing.TimeModel.constant(2e10, 5e9, 3e-6, gap_per_call=1e-6)
    tm.cache_bytes = 1 << 20
    tm.gap_per_byte = dict.fromkeys(timing.MODES, 1e-9)
    assert tm.gap_seconds("decode", 10, 8 << 20) == pytest.approx(10e-6 + 1e-9 * (1 << 20))
    assert tm.gap_seconds("decode", 10, 1 << 19) == pytest.approx(10e-6 + 1e-9 * (1 << 19))
    assert tm.gap_seconds("train", 10, 8 << 20) == pytest.approx(10e-6 + 1e-9 * (8 << 20))
    # three decode runs of 8 steps: 2 us a call and 1 ns a byte of each step's first MiB
    runs = [timing_runs.ModeRun("decode", 0.0, 0.0, calls, 8 * per_step, 8) for calls, per_step in
            ((100, 1 << 18), (300, 1 << 20), (200, 4 << 20))]
    runs = [r._replace(wall=2e-6 * r.calls + 1e-9 * 8 * min(r.nbytes / 8, 1 << 20)) for r in runs]
    a, b = timing_runs._fit_gap(runs, 1 << 20)
    assert a == pytest.approx(2e-6) and b == pytest.approx(1e-9)


def test_the_decode_calibration_runs_the_step_generation_runs(monkeypatch):
    """Decode is calibrated on a model prepared as generation prepares it, so (with Numba) on the
    compiled step (kernels/step.py), not on the Python step no generation runs."""
    from minigpt import kernels
    from minigpt.kernels import step
    from minigpt.train import timing_runs

    if not kernels.AVAILABLE:
        pytest.skip("the compiled step needs Numba")
    shape = timing_runs.Shape(1, 32, 2, 32, 2, 128)
    calls = []
    kernel = step.decode_step
    monkeypatch.setattr(step, "decode_step", lambda *a: (calls.append(1), kernel(*a)))
    before = kernels.active()
    kernels.use("numba")
    try:
        timing_runs.step_functions(*timing_runs.build(shape), shape)["decode"]()
    finally:
        kernels.use(before)
    assert len(calls) == timing_runs.DECODE_STEPS
