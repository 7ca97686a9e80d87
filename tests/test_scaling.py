"""Scaling: the projections' FLOPs equal the meter (and a hand formula: test_scaling_flops.py),
GPT-3 175B on Patterson's V100 row reproduces the published FLOPs, MWh and tCO2e, the popular
claims come out with the numbers they state, mixture-of-experts counts, and bad scenarios fail in
one line naming file and field."""

import dataclasses
import json

import numpy as np
import pytest

from minigpt import cli
from minigpt.config import ModelConfig
from minigpt.counting.meter import METER
from minigpt.errors import ConfigError
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init
from minigpt.scale import estimate as estimate_mod
from minigpt.scale import scenario, work
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step


@pytest.fixture(autouse=True)
def _empty_home(tmp_path, monkeypatch):
    """No test sees the developer's own ~/.minigpt (its local-cpu profile)."""
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))


def estimate(name: str, *overrides: str) -> estimate_mod.Estimate:
    return estimate_mod.estimate(scenario.load(name, overrides))


def _flops(records) -> int:
    return sum(r.flops for r in records.values())


def _arch(cfg: ModelConfig) -> work.Arch:
    return work.Arch(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.block_size, cfg.vocab_size)


# ---- the closed form --------------------------------------------------------------------------

def test_closed_form_equals_the_meter_on_this_machine():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=8, block_size=6, vocab_size=13)
    model = GPT(cfg, init(cfg, np.random.default_rng(0)))
    model.grads = FlatBuffer(cfg)
    idx = np.random.default_rng(1).integers(0, 13, (2, 6))
    METER.reset()
    training_step(model, AdamW(model.params), [(idx, idx)], lr=1e-3)
    assert _flops(METER.records) == work.training_step_flops(_arch(cfg), 2, 6)


def test_mixture_of_experts_counts():
    dense = work.Arch(2, 16, 2, 8, 30)
    assert work.arch_params(work.Arch(2, 16, 2, 8, 30, 1, 1)) == work.arch_params(dense)
    moe = work.Arch(2, 16, 2, 8, 30, n_experts=8, experts_per_token=2)
    total, active = work.arch_params(moe)
    mlp, router = work.mlp_params(16), 2 * 16 * 8
    assert total == work.arch_params(dense)[0] + 2 * 7 * mlp + router
    assert active == work.arch_params(dense)[0] + 2 * 1 * mlp + router
    assert work.weights_read(moe, total, active, 1) == active  # batch 1: its 2 experts only
    assert active < work.weights_read(moe, total, active, 16) < total
    r = estimate("gpt4-class-moe")
    w = r.training.flops
    assert r.active_params < r.params
    assert w.six_nd == pytest.approx(6 * r.active_params * w.tokens)
    assert 1.0 < w.closed_form / w.six_nd < 1.15  # attention at 8k context


# ---- GPT-3 175B on Patterson et al. 2021's V100 row -------------------------------------------

def test_gpt3_175b_reproduces_patterson():
    r = estimate("gpt3-175b")
    w, f = r.training.flops, r.training.costs.footprint
    assert r.params == pytest.approx(174.6e9, rel=1e-3)  # Brown et al. Table D.1's N
    assert w.six_nd == pytest.approx(3.14e23, rel=0.02)
    assert f.energy_mwh == pytest.approx(1287, rel=0.02)
    assert f.co2_tonnes == pytest.approx(552, rel=0.02)
    assert r.training.costs.days == pytest.approx(14.8, rel=0.02)
    assert 1.02 < w.closed_form / w.six_nd < 1.04  # ours is higher: attention
    # water on Li et al. 2023's US averages: on-site per IT MWh, off-site per MWh drawn
    assert f.water_onsite_m3 == pytest.approx(1287 / 1.10 * 0.55, rel=0.02)
    assert f.water_offsite_m3 == pytest.approx(1287 * 3.142, rel=0.02)
    assert f.water_m3 == pytest.approx(f.water_onsite_m3 + f.water_offsite_m3)
    assert f.households_year == pytest.approx(1287e3 / 10715, rel=0.02)
    layers = r.training.layers
    assert layers.floor_mwh < layers.roofline_mwh < layers.time_x_power_mwh


def test_gpt3_family_matches_table_2_1():
    nominal = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9,
               "6.7b": 6.7e9, "13b": 13.0e9, "175b": 175e9}
    for tag, n in nominal.items():
        r = estimate(f"gpt3-{tag}")
        assert r.params == pytest.approx(n, rel=0.025), tag
        assert r.training.flops.tokens == 300e9, tag
        assert r.training.costs.footprint.energy_mwh > 0, tag


def test_sensitivity_moves_with_utilisation_and_pue():
    r = estimate("gpt3-175b")
    sens = r.training.sensitivity
    base = next(row for row in sens.rows if row.factor == 1.0)
    assert base.energy_mwh[sens.pue.index(1.1)] == pytest.approx(
        r.training.costs.footprint.energy_mwh)
    half = next(row for row in sens.rows if row.factor == 0.5)
    assert half.energy_mwh[0] == pytest.approx(2 * base.energy_mwh[0])


def test_water_l_per_kwh_is_the_on_site_term():
    r = estimate("gpt3-175b", "hardware.water_l_per_kwh=2", "hardware.water_offsite_l_per_kwh=0")
    f = r.training.costs.footprint
    assert f.water_m3 == f.water_onsite_m3 == pytest.approx(2 * f.energy_it_mwh)
    assert r == dataclasses.replace(
        estimate("gpt3-175b", "hardware.water_onsite_l_per_kwh=2",
                 "hardware.water_offsite_l_per_kwh=0"),
        assumptions=r.assumptions, settings=r.settings)
    with pytest.raises(ConfigError, match="another name for water_onsite_l_per_kwh"):
        estimate("gpt3-175b", "hardware.water_l_per_kwh=2", "hardware.water_onsite_l_per_kwh=1")


# ---- popular claims, checked ------------------------------------------------------------------

def test_70b_in_16_bits_is_140_gb_and_streams_about_24_times_a_second():
    r = estimate("dense-70b-h100")
    roof = r.serving.roofline
    assert roof.weight_bytes == 140e9
    assert roof.weights_only_tokens_per_s == pytest.approx(3.35e12 / 140e9)
    assert round(roof.weights_only_tokens_per_s) == 24
    assert roof.decode_tokens_per_s_ceiling == pytest.approx(24, rel=0.03)  # KV cache adds a little
    assert r.serving.fits_in_memory is False  # 140 GB > one H100's 80 GB, and the report says so
    at3 = estimate("dense-70b-h100", "hardware.memory_bandwidth=3e12")
    assert round(at3.serving.roofline.weights_only_tokens_per_s) == 21


def test_int8_doubles_the_ceiling_and_4_bits_work():
    r16 = estimate("dense-70b-h100").serving
    r8 = estimate("dense-70b-h100", "inference.weight_bits=8").serving
    assert r8.roofline.weight_bytes == 70e9 and r8.fits_in_memory is True
    assert r8.roofline.weights_only_tokens_per_s == pytest.approx(
        2 * r16.roofline.weights_only_tokens_per_s)
    ratio = r8.roofline.decode_tokens_per_s_ceiling / r16.roofline.decode_tokens_per_s_ceiling
    assert ratio == pytest.approx(2, rel=0.03)
    r4 = estimate("dense-70b-h100", "model.params=7e9", "inference.weight_bits=4")
    assert r4.serving.roofline.weight_bytes == 3.5e9  # a 7B model in 4-bit weights


def test_100_million_1_wh_queries_a_day_is_36_5_gwh_a_year():
    r = estimate("dense-70b-h100", "inference.wh_per_query=1",
                 "inference.queries_per_day=100e6").serving
    assert r.gwh_per_year == pytest.approx(36.5)
    assert r.wh_per_query_basis == "stated" and r.wh_per_query_roofline > 0


# ---- the command ------------------------------------------------------------------------------

KEYS = ("params", "active_params", "train_flops", "train_flops_6nd", "chip_hours", "days",
        "energy_mwh", "co2_tonnes", "water_m3", "households_year", "weight_bytes",
        "kv_bytes_per_token", "prefill_s_per_token", "decode_s_per_token",
        "decode_tokens_per_s_ceiling", "wh_per_query", "gwh_per_year", "assumptions")


def test_cli_json_and_table(capsys):
    assert cli.main(["scale", "minigpt/scale/scenarios/gpt3-175b.toml", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(KEYS) <= set(doc)
    origins = {a["field"]: a["origin"] for a in doc["assumptions"]}
    assert origins["hardware.pue"].endswith("gpt3-175b.toml")
    assert origins["hardware.dtype"].startswith("default:")
    for bits in ("8", "4"):
        assert cli.main(["scale", "gpt3-175b", "--set", f"inference.weight_bits={bits}"]) == 0
        out = capsys.readouterr().out
        assert f"{bits}-bit weights" in out and "sensitivity" in out and "not measured here" in out


@pytest.mark.parametrize("override, words", [
    ("hardware.muf=0.3",
     "--set hardware.muf=0.3: unknown key 'muf' in [hardware] (did you mean 'mfu'?)"),
    ("hardware.chips=-3", "[hardware] chips: must be > 0, got -3"),
    ("training.tokens=-1", "[training] tokens: must be > 0"),
    ("hardware.pue=0.9", "[hardware] pue: must be >= 1"),
    ("hardware.profile=v100", "did you mean 'v100-sxm2'"),
    ("traning.tokens=1", "unknown section [traning] (did you mean 'training'?)"),
    ("mfu=0.3", "--set mfu=0.3: the key must be section.key, e.g. hardware.mfu"),
    ("inference.weight_bits=0", "weight_bits: must be 1 to 32 bits"),
])
def test_bad_overrides_name_the_set_and_the_field(override, words):
    with pytest.raises(ConfigError) as e:
        estimate("gpt3-175b", override)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_bad_files_name_the_file_and_the_field(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text("[model]\nparams = 7e9\n[inference]\nprompt_tokens = 1\noutput_tokens = 1\n")
    with pytest.raises(ConfigError, match=r"s\.toml: \[hardware\] missing required field"):
        scenario.load(path)
    path.write_text('[model]\nparams = 7e9\nn_layers = 2\n[hardware]\nprofile = "h100-sxm"\n')
    with pytest.raises(ConfigError, match=r"s\.toml: unknown key 'n_layers' .*'n_layer'"):
        scenario.load(path)
    path.write_text("training = 5\n")  # a known section given as a value: no "did you mean" itself
    with pytest.raises(ConfigError) as e:
        scenario.load(path)
    assert "'training' must be a [section] table" in str(e.value) and "mean" not in str(e.value)
    assert cli.main(["scale", "no-such-scenario"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-scenario: no such scenario") and err.count("\n") == 1


def test_a_set_of_mfu_replaces_the_files_achieved_rate():
    r = estimate("gpt3-175b", "hardware.mfu=0.4", "training.flops=3.14e23").training
    assert r.costs.days == pytest.approx(14.8 * 0.197 / 0.4, rel=0.01)
    assert r.flops_per_chip_is == "mfu × fp16 peak"  # not "given": a share of the peak
    assert estimate("gpt3-175b").training.flops_per_chip_is == "given"  # achieved_flops_per_chip


def test_this_machines_measured_rate_is_reported(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "home" / "hardware"
    folder.mkdir(parents=True)
    peaks = "".join(f'[peak_flops.{t}]\nvalue = "unknown"\n' for t in ("tf32", "fp16", "int8"))
    figures = "".join(f'[{f}]\nvalue = "unknown"\n' for f in ("memory_bandwidth", "memory_bytes",
                                                              "power_watts"))
    (folder / "local-cpu.toml").write_text(
        'name = "local-cpu"\ndescription = "test"\n[peak_flops.fp32]\nvalue = 1e11\n'
        'source = "measured by minigpt calibrate"\n' + peaks + figures)
    r = estimate("gpt3-175b")
    assert r.this_machine.flops_per_s == 1e11
    assert r.this_machine.years == pytest.approx(3.14e23 / 1e11 / (365.25 * 86400))
    assert r.to_json()["this_machine"]["flops_per_s"] == 1e11
    assert cli.main(["scale", "gpt3-175b"]) == 0
    assert "this machine's float32 matmul: 100.0 GFLOP/s" in capsys.readouterr().out
