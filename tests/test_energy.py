"""Energy in four layers: each given where it can be (by hand-checked arithmetic), each saying why
where it cannot; sourced defaults; the roofline; the one-line GPT-3 projection."""

import pytest

from minigpt.config import ModelConfig
from minigpt.counting import closed_form as cost_model
from minigpt.counting import tables
from minigpt.energy import accounting, run_energy
from minigpt.errors import ConfigError
from minigpt.hardware import roofline
from minigpt.hardware.counters import Measurement
from minigpt.hardware.profiles import load_profile
from minigpt.scale import projection

NO_POWER = ("needs a power figure (local-cpu has none: pass --watts or add power_watts to your "
            "profile)")

LOCAL_CPU = """
name = "local-cpu"
description = "a test machine"
[peak_flops.fp32]
value = 100e9
source = "measured by minigpt calibrate"
[peak_flops.fp64]
value = 50e9
source = "measured by minigpt calibrate"
[peak_flops.tf32]
value = "unsupported"
[peak_flops.fp16]
value = "unknown"
[peak_flops.int8]
value = "unknown"
[memory_bandwidth]
value = 10e9
source = "measured by minigpt calibrate"
[memory_bytes]
value = 8e9
source = "os.sysconf"
[power_watts]
value = "unknown"
"""


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A $MINIGPT_HOME with a calibrated local-cpu profile that has no power figure."""
    folder = tmp_path / "home" / "hardware"
    folder.mkdir(parents=True)
    (folder / "local-cpu.toml").write_text(LOCAL_CPU)
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    return folder


def _row(flops, nbytes, dtype="float32", phase="forward"):
    return {"scope": "x", "op": "y", "kind": "matmul", "phase": phase, "dtype": dtype, "calls": 1,
            "flops": flops, "useful_flops": flops, "bytes_read": nbytes, "bytes_written": 0,
            "seconds": 0.0}


ROWS = [_row(2e9, 1e6), _row(1e6, 1e9)]  # one compute-bound, one memory-bound on local-cpu


def report_lines(rows, seconds, **kwargs) -> list[str]:
    """The end-of-run energy table, printed from the document a run stores."""
    return run_energy.report_lines(run_energy.build(rows, seconds, **kwargs))


def test_defaults_are_the_sourced_constants():
    s = accounting.settings()
    assert (s.pue, s.carbon_kg_per_kwh, s.household_kwh_per_year) == (1.10, 0.367, 10715)
    assert (s.water_onsite_l_per_kwh, s.water_offsite_l_per_kwh) == (0.55, 3.142)  # Li et al.
    assert s.water_l_per_kwh == s.water_onsite_l_per_kwh  # the old name, an alias
    assert s.carbon_net_kg_per_kwh is None  # no general figure
    assert "2304.03271" in s.origins["water_onsite_l_per_kwh"]
    assert accounting.water_litres(3.6e6 * 1.1, s) == pytest.approx(0.55 + 1.1 * 3.142)
    assert s.pj_per_flop["fp32"] == 2.3 and s.pj_per_byte == 162.5
    assert s.origins["pue"].startswith("default: Patterson")
    given = accounting.settings(pue=1.5, given_by="--pue")
    assert given.pue == 1.5 and given.origins["pue"] == "--pue"
    with pytest.raises(ConfigError, match="pue must be >= 1"):
        accounting.settings(pue=0.5)


def test_roofline_takes_the_slower_bound_of_each_record():
    prof = load_profile("local-cpu")
    assert roofline.bound(ROWS[0], prof).kind == "compute"
    assert roofline.bound(ROWS[1], prof).kind == "memory"
    ideal = 2e9 / 100e9 + 1e9 / 10e9  # s
    assert roofline.roofline_seconds(ROWS, prof) == pytest.approx(ideal)
    assert roofline.split(ROWS, prof) == pytest.approx({"compute": 0.02, "memory": 0.1})
    assert roofline.decode_ceiling(140e9, 3.35e12) == pytest.approx(23.93, abs=0.01)
    with pytest.raises(ConfigError, match="peak fp16 FLOP/s is unknown"):
        roofline.bound(_row(1, 1, "float16"), prof)


def test_without_power_or_counters_each_layer_says_why():
    lines = report_lines(ROWS, 10.0, measured=Measurement(reasons={"rapl": "no RAPL"}))
    text = "\n".join(lines)
    assert "measured        not measured here (rapl: no RAPL)" in text
    assert f"time x power    {NO_POWER}" in text
    assert f"roofline        {NO_POWER}; ideal time on local-cpu 0.12 s" in text
    floor = (2e9 + 1e6) * 2.3e-12 + (1e6 + 1e9) * 162.5e-12
    layers = accounting.run_layers(ROWS, 10.0)
    assert [layer.name for layer in layers] == ["measured", "time x power", "roofline",
                                                "physics floor"]
    assert layers[3].joules == pytest.approx(floor)
    assert accounting.run_layers(ROWS, 10.0, profile=None)[0].basis == "not measured here"


def test_the_printed_table_is_the_document_s():
    """The table reads every number from energy.json's document, and names the profile asked for
    when it could not be loaded."""
    doc = run_energy.build(ROWS, 10.0, profile="no-such-chip", watts=60, tokens=1000)
    assert doc["hardware"] == "no-such-chip" and doc["profile"] is None
    lines = run_energy.report_lines(doc)
    assert lines[0] == "energy, four ways (10 s measured; profile no-such-chip)"
    doc["layers"]["time_x_power"] |= {"joules": 1234.0, "wh": 0.5, "gco2e": 7.0, "j_per_token": 2.0}
    assert run_energy.report_lines(doc)[4].split()[3:8] == ["1.23", "kJ", "0.5", "7", "2"]
    assert run_energy.build(ROWS, 10.0, profile=None)["hardware"] is None
    assert "profile no profile" in run_energy.report_lines(run_energy.build(ROWS, 10.0,
                                                                            profile=None))[0]


def test_with_a_power_figure_every_layer_is_given():
    m = Measurement(joules={"rapl": 500.0, "nvml": None}, reasons={"nvml": "no GPU"}, seconds=10.0)
    layers = {layer.name: layer for layer in accounting.run_layers(ROWS, 10.0, measured=m, watts=60)}
    assert layers["measured"].joules == pytest.approx(500 * 1.10)
    # a measurement is never replaced: its mean power (50 W) beats --watts 60, and says so
    assert layers["time x power"].joules == pytest.approx(10 * 50 * 1.10)
    assert "measured: rapl; --watts 60 not used" in layers["time x power"].basis
    assert layers["roofline"].joules == pytest.approx(0.12 * 50 * 1.10)
    assert all(layer.joules is not None for layer in layers.values())
    lines = report_lines(ROWS, 10.0, watts=60, tokens=1000)
    assert "J/token" in lines[1] and "660 J" in "\n".join(lines) and "60 W (--watts)" in lines[4]
    assert lines[-1].startswith("PUE 1.10 (default: Patterson")


def test_a_profile_with_power_needs_no_watts():
    layers = accounting.run_layers(ROWS, 2.0, profile="h100-sxm")
    assert layers[1].joules == pytest.approx(2.0 * 700 * 1.10)
    assert layers[2].joules is not None and layers[2].joules < layers[1].joules


def test_no_local_profile_uses_the_cached_quick_measurement(home, monkeypatch):
    from minigpt.hardware import bandwidth, calibrate

    (home / "local-cpu.toml").unlink()
    calls = []

    def fake_measure(quick=False):
        calls.append(quick)
        stream = tuple(bandwidth.StreamFigure(kind, 1, 10e9, 64, 3, "test", None)
                       for kind in bandwidth.KINDS)
        return calibrate.MachineFigures(fp32=100e9, fp64=50e9, bandwidth=10e9, n=1024,
                                        copy_mib=64, stream=stream)

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    text = "\n".join(report_lines(ROWS, 1.0, watts=60))
    assert "no local-cpu profile" not in text
    assert "roofline" in text and "ideal time on quick-cpu 0.12 s" in text
    layers = accounting.run_layers(ROWS, 1.0, watts=60)
    assert layers[2].joules == pytest.approx(0.12 * 60 * 1.10)
    assert calls == [True]  # measured once, then read from the cache
    first = calibrate.cache_path()
    assert first.is_file() and first.parent == home.parent / "cache"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # another BLAS set-up: another cache entry
    assert calibrate.cache_path() != first
    calibrate.quick_profile()
    assert calls == [True, True] and calibrate.cache_path().is_file()
    calibrate.cache_path().write_text("name = [")  # damaged: measured again, not trusted
    assert calibrate.quick_profile().name == "quick-cpu" and calls == [True, True, True]


def test_floor_dtypes_and_unknowns():
    s = accounting.settings()
    assert accounting.floor_joules([_row(1e12, 0, "float16")], s) == pytest.approx(0.75)
    assert accounting.floor_joules([_row(1e12, 0, "float64")], s) == pytest.approx(2.3)  # fp32 bound
    assert accounting.floor_joules([_row(1e12, 0, "int8")], s) == pytest.approx(0.115)
    assert accounting.floor_joules([_row(1e12, 0, "w8a32")], s) == pytest.approx(2.3)
    # packed weights: 16 and 8 bits widen into float32 products; 4 bits multiplies int8 values
    from minigpt.counting.meter import packed_dtype

    floors = [accounting.floor_joules([_row(1e12, 0, packed_dtype(b))], s) for b in (16, 8, 4)]
    assert floors == pytest.approx([2.3, 2.3, 0.115])
    layer = accounting.floor_layer([_row(1, 1, "complex64")], s)
    assert layer.joules is None and "complex64" in layer.basis


def test_report_on_a_real_training_step():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    rows = tables.rows_from_records(cost_model.predict_training_step(cfg, 4, 16))
    lines = report_lines(rows, 0.5, watts=15, tokens=64)
    assert len(lines) == 8 and all("needs" not in line for line in lines)


def test_gpt3_projection_line():
    rows = [_row(6e9, 0, phase=p) for p in ("forward", "backward", "optimizer")] + [
        _row(1e20, 0, phase="eval")]  # evaluation is not training
    line = projection.gpt3_projection_line(1000, rows, joules=90.0)
    assert "\n" not in line and line.startswith("at GPT-3 scale: this run 1.8e+07 FLOP/token")
    assert "(5e+03 pJ/FLOP" in line and "GPT-3 175B counted the same way" in line
    assert "3.23e+23 FLOPs" in line and "10,000 v100-sxm2" in line and "tCO2e" in line
    with pytest.raises(ValueError):
        projection.gpt3_projection_line(0, rows)
