"""Per-query energy in the terms analysts use (minigpt/scale/per_query.py): the throughput form,
the boundaries, fleets and the training break-even, and a stated figure on a profile without rated
watts. Every expectation is worked by hand in the comments beside it, with inputs chosen so that
dropping or swapping any term of a formula changes the answer."""

import json
from pathlib import Path

import pytest

from minigpt import cli
from minigpt.errors import ConfigError
from minigpt.scale import estimate as estimate_mod
from minigpt.scale import scenario, table

# 8 H100s (700 W rated) at a quarter of their power, a 1,600 W host at half, PUE 1.2,
# 300 tokens at 50 tokens/s after 0.5 s to the first token
THROUGHPUT = """
[inference]
output_tokens = 300
tokens_per_s = 50
latency_s = 0.5
chips = 8
[hardware]
profile = "h100-sxm"
accelerator_utilization = 0.25
host_watts = 1600
host_utilization = 0.5
pue = 1.2
"""
SECONDS = 300 / 50 + 0.5  # 6.5 s
ACCELERATOR_W = 8 * 700 * 0.25  # 1,400 W
HOST_W = 1600 * 0.5  # 800 W
WH = SECONDS * (ACCELERATOR_W + HOST_W) * 1.2 / 3600  # 17,160 J = 4.7667 Wh


@pytest.fixture(autouse=True)
def _empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return path


def estimate(name_or_path, *overrides) -> estimate_mod.Estimate:
    return estimate_mod.estimate(scenario.load(name_or_path, overrides))


# ---------------------------------------------------------------------------- the throughput form

def test_throughput_form_by_hand(tmp_path):
    sv = estimate(_write(tmp_path, THROUGHPUT)).serving
    assert sv.wh_per_query_basis == "throughput" and sv.roofline is None  # no model needed
    assert WH == pytest.approx(4.766667, rel=1e-6)
    assert sv.wh_per_query == pytest.approx(WH)
    tp = sv.throughput
    assert (tp.chips, tp.seconds) == (8, 6.5)
    assert tp.accelerator_watts == pytest.approx(1400) and tp.host_watts == pytest.approx(800)
    # the footprint follows from Wh as for any basis: IT Wh = Wh / PUE
    assert sv.per_query.wh_it_per_query == pytest.approx(6.5 * 2200 / 3600)


def test_throughput_defaults_latency_0_utilisation_1_no_host(tmp_path):
    text = ('[inference]\noutput_tokens = 300\ntokens_per_s = 50\n'
            '[hardware]\nprofile = "h100-sxm"\nchips = 4\npue = 1.2\n')
    sv = estimate(_write(tmp_path, text)).serving
    # [hardware] chips when [inference] gives none: 6 s × 4 × 700 W × 1.2 = 20,160 J = 5.6 Wh
    assert sv.throughput.chips == 4 and sv.throughput.host_watts == 0
    assert sv.wh_per_query == pytest.approx(5.6)


def test_throughput_uses_the_chips_power_basis_and_fraction(tmp_path):
    text = THROUGHPUT + "power_fraction = 0.5\n"
    sv = estimate(_write(tmp_path, text)).serving
    # 8 × 700 × 0.5 × 0.25 = 700 W beside the host's 800: 6.5 × 1,500 × 1.2 / 3600 = 3.25 Wh
    assert sv.throughput.accelerator_watts == pytest.approx(700)
    assert sv.wh_per_query == pytest.approx(3.25)


def test_throughput_beside_a_model_and_a_stated_figure():
    sv = estimate("dense-70b-h100", "inference.tokens_per_s=20").serving
    # 300 / 20 = 15 s on one 700 W H100 at the default PUE 1.10: 11,550 J = 3.2083 Wh
    assert sv.wh_per_query_basis == "throughput"
    assert sv.wh_per_query == pytest.approx(15 * 700 * 1.1 / 3600)
    assert sv.wh_per_query_roofline == pytest.approx(
        estimate("dense-70b-h100").serving.wh_per_query)  # the roofline still beside it
    stated = estimate("dense-70b-h100", "inference.tokens_per_s=20",
                      "inference.wh_per_query=1").serving
    assert stated.wh_per_query_basis == "stated" and stated.wh_per_query == 1
    assert stated.throughput.wh_per_query == pytest.approx(15 * 700 * 1.1 / 3600)


def test_throughput_json_and_table(tmp_path, capsys):
    path = _write(tmp_path, THROUGHPUT)
    assert cli.main(["scale", str(path), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["wh_per_query_basis"] == "throughput"
    assert doc["wh_per_query_throughput"] == pytest.approx(WH)
    assert doc["throughput"]["seconds"] == 6.5
    assert cli.main(["scale", str(path)]) == 0
    out = capsys.readouterr().out
    assert "throughput: (output / tokens_per_s + latency)" in out and "4.77" in out


# ---------------------------------------------------------------------------- boundaries

def test_google_boundaries_from_its_shares():
    b = estimate("google-gemini-2025").serving.boundaries
    # 0.24 × 0.58, × (0.58 + 0.25), × (0.58 + 0.25 + 0.10), and all of it
    assert b.accelerator == pytest.approx(0.1392)
    assert b.host == pytest.approx(0.1992)
    assert b.idle == pytest.approx(0.2232)
    assert b.overhead == 0.24
    assert "shares" in b.split


def test_shares_split_any_basis(tmp_path):
    text = THROUGHPUT.replace("chips = 8\n", "chips = 8\naccelerator_share = 0.5\n"
                              "host_share = 0.25\nidle_share = 0.083\n")
    # overhead 0.167 against 1 - 1/1.2 = 0.1667: agreed
    b = estimate(_write(tmp_path, text)).serving.boundaries
    assert b.accelerator == pytest.approx(WH * 0.5)
    assert b.host == pytest.approx(WH * 0.75)
    assert b.idle == pytest.approx(WH * 0.833)
    assert b.overhead == pytest.approx(WH)


def test_each_form_splits_what_it_models(tmp_path):
    tp = estimate(_write(tmp_path, THROUGHPUT)).serving.boundaries
    assert tp.accelerator == pytest.approx(6.5 * 1400 / 3600)  # 2.5278 Wh, no PUE
    assert tp.host == pytest.approx(6.5 * 2200 / 3600)  # 3.9722 Wh
    assert tp.idle == tp.host  # the form has no idle machines
    assert tp.overhead == pytest.approx(WH)
    chip = estimate("dense-70b-h100").serving  # chip basis: the accelerators alone
    it = chip.wh_per_query / 1.1
    assert (chip.boundaries.accelerator, chip.boundaries.host) == (pytest.approx(it),) * 2
    system = estimate("epoch-chatgpt-2025").serving.boundaries  # DGX power: host inside
    assert system.accelerator is None
    assert system.host == pytest.approx(system.overhead / 1.2)
    seed = estimate("seed-1-10-wh").serving.boundaries  # a stated total: no split
    assert (seed.accelerator, seed.host, seed.idle, seed.overhead) == (None, None, None, 1)


def test_rounding_of_published_shares_and_pues():
    assert scenario.rounding(0.58) == pytest.approx(0.005)
    assert scenario.rounding(1.09) == pytest.approx(0.005)
    assert scenario.rounding(1.125) == pytest.approx(0.0005)
    assert scenario.rounding(0.1) == pytest.approx(0.005)  # 0.10 as TOML reads it
    assert scenario.rounding(0) == 0 and scenario.rounding(1) == 0


def test_overhead_tolerance_by_hand():
    # Google's shares, each ±0.005, and PUE 1.09 ±0.005 × 1 / 1.09² (0.004208)
    assert scenario.overhead_tolerance((0.58, 0.25, 0.1), 1.09) == pytest.approx(
        0.015 + 0.005 / 1.1881)
    assert scenario.overhead_tolerance((0.5, 0.125, 0), 2.0) == pytest.approx(0.0055)
    assert scenario.overhead_tolerance((0.58, 0.25, 0.1), None) == pytest.approx(0.015)


@pytest.mark.parametrize("pue, accepted", [
    # the shares leave 7% for overhead; the tolerance is 3 × 0.5 points for the shares plus
    # 0.005 / PUE² for the PUE (d(1 - 1/PUE) / dPUE = 1 / PUE²)
    (1.09, True),  # 1 - 1/1.09 = 8.26%: 1.26 points apart, within ±1.92
    (1.075, True),  # 6.98%: 0.02 points apart (±1.5 + 0.0005 / 1.075² points)
    (1.06, True),  # 5.66%: 1.34 points apart, within ±1.94
    (1.1, False),  # 9.09%: 2.09 points apart, beyond ±1.91
    (1.05, False),  # 4.76%: 2.24 points apart, beyond ±1.95
    (1.12, False),  # 10.7%
])
def test_overhead_must_agree_with_the_pue_within_rounding(pue, accepted):
    if accepted:
        assert estimate("google-gemini-2025", f"hardware.pue={pue}").serving is not None
        return
    with pytest.raises(ConfigError) as e:
        estimate("google-gemini-2025", f"hardware.pue={pue}")
    assert "1 - 1/PUE" in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"--set hardware.pue={pue}:")


def test_shares_without_a_pue_are_not_checked_against_one(tmp_path):
    text = ('[inference]\nwh_per_query = 1\naccelerator_share = 0.5\nhost_share = 0.2\n'
            'idle_share = 0.1\n[hardware]\nprofile = "h100-sxm"\n')
    b = estimate(_write(tmp_path, text)).serving.boundaries
    assert (b.accelerator, b.host, b.idle) == pytest.approx((0.5, 0.7, 0.8))


# ---------------------------------------------------------------------------- fleets, break-even

def test_the_seeds_arithmetic():
    e = estimate("seed-1-10-wh")
    assert e.serving.gwh_per_year == pytest.approx(36.5)  # 1 Wh × 1e8 × 365 / 1e9
    assert e.breakeven.inference_mwh_per_day == pytest.approx(100)
    assert e.breakeven.days == pytest.approx(500)  # 50,000 MWh / 100 MWh a day
    assert e.breakeven.training_mwh_is == "stated" and e.training is None
    ten = estimate("seed-1-10-wh", "inference.wh_per_query=10")
    assert ten.serving.gwh_per_year == pytest.approx(365) and ten.breakeven.days == pytest.approx(50)
    doc = e.to_json()
    assert doc["breakeven_days"] == pytest.approx(500) and doc["energy_mwh"] is None
    assert "  breakeven_days                          500  training MWh / inference MWh" in (
        table.format_table(e))


TRAINED = """
[training]
chip_hours = 1e6
[inference]
wh_per_query = 0.5
queries_per_day = 2e6
[hardware]
profile = "h100-sxm"
pue = 1.2
"""


def test_breakeven_from_a_computed_or_a_stated_training_energy(tmp_path):
    e = estimate(_write(tmp_path, TRAINED))
    # 1e6 chip-hours × 700 W × 1.2 = 840 MWh; 0.5 Wh × 2e6 = 1 MWh a day: 840 days
    assert e.training.costs.footprint.energy_mwh == pytest.approx(840)
    assert e.breakeven.training_mwh_is == "computed"
    assert e.breakeven.days == pytest.approx(840)
    assert e.serving.gwh_per_year == pytest.approx(0.5 * 2e6 * 365 / 1e9)  # 0.365 GWh
    stated = estimate(_write(tmp_path, TRAINED.replace("chip_hours = 1e6",
                                                       "chip_hours = 1e6\nenergy_mwh = 1300")))
    assert stated.breakeven.days == pytest.approx(1300)  # the published total, not ours
    assert stated.training.costs.footprint.energy_mwh == pytest.approx(840)  # still shown


def test_no_breakeven_without_a_fleet_or_a_training_energy(tmp_path):
    assert estimate("google-gemini-2025").breakeven is None  # no queries a day, no training
    assert estimate("patterson-gpt3").breakeven is None  # training only
    none_a_day = estimate(_write(tmp_path, TRAINED), "inference.queries_per_day=0")
    assert none_a_day.breakeven.days is None and none_a_day.serving.gwh_per_year == 0
    doc = estimate("dense-70b-h100").to_json()
    assert doc["breakeven_days"] is None and doc["gwh_per_year"] == pytest.approx(
        doc["wh_per_query"] * 100e6 * 365 / 1e9)


# ---------------------------------------------------------------------------- a stated figure's watts

STATED_ON_TPU_V4 = """
[model]
params = 1e9
[inference]
prompt_tokens = 100
output_tokens = 100
wh_per_query = 0.5
[hardware]
profile = "tpu-v4"
"""


def test_a_stated_figure_needs_no_watts(tmp_path, capsys):
    sv = estimate(_write(tmp_path, STATED_ON_TPU_V4)).serving
    assert sv.wh_per_query_basis == "stated" and sv.wh_per_query == 0.5
    assert sv.wh_per_query_roofline is None  # no watts: no roofline Wh
    assert sv.roofline.weight_bytes == pytest.approx(2e9)  # the bytes still are
    assert cli.main(["scale", "google-gemini-2025", "--set", "model.params=1e11",
                     "--set", "inference.prompt_tokens=0",
                     "--set", "inference.output_tokens=500"]) == 0
    assert "0.24" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="tpu-v4 has no power_watts"):  # a computed one does
        estimate(_write(tmp_path, STATED_ON_TPU_V4.replace("wh_per_query = 0.5\n", "")))


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, words", [
    (["inference.tokens_per_s=-5"], "must be > 0"),
    (["inference.tokens_per_s=50"], "needs output_tokens"),
    (["inference.latency_s=0.5"], "throughput form: give [inference] tokens_per_s"),
    (["hardware.host_watts=100"], "throughput form"),
    (["hardware.host_utilisation=0.5"], "did you mean 'host_utilization'"),
    (["inference.host_share=0.3"], "--set inference.host_share=0.3: [inference] the shares"),
    (["inference.idle_share=1.5"], "must be in [0, 1]"),
    (["inference.idle_share=0.5"], "exceeds 1"),
    (["hardware.pue=1.3"], "1 - 1/PUE"),
    (["training.energy_mwh=0"], "must be > 0"),
    (["training.energy_mwh=abc"], "expected a number"),
])
def test_bad_keys_and_values_are_one_line_exit_2(overrides, words, capsys):
    args = ["scale", "google-gemini-2025"]
    for o in overrides:
        args += ["--set", o]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_shares_come_three_together(capsys):
    assert cli.main(["scale", "seed-1-10-wh", "--set", "inference.accelerator_share=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs host_share and idle_share too" in err and "\n" not in err


@pytest.mark.parametrize("extra, words", [
    ('power_basis = "system"\n', "counts the host twice"),
    ("", "host_utilization needs host_watts"),
])
def test_the_host_is_counted_once_and_only_with_its_watts(tmp_path, extra, words):
    text = THROUGHPUT + extra
    if not extra:
        text = text.replace("host_watts = 1600\n", "")
    with pytest.raises(ConfigError) as e:
        estimate(_write(tmp_path, text))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_shipped_throughput_scenario_as_its_comments_say():
    sv = estimate("throughput-dgx-h100").serving
    # 3.5 s × (8 × 700 × 0.1 + 4,600 × 0.0625 = 847.5 W) × PUE 1.10 / 3600
    assert sv.wh_per_query == pytest.approx(3.5 * 847.5 * 1.1 / 3600)  # 0.906 Wh
    b = sv.boundaries
    assert (round(b.accelerator, 3), round(b.host, 3), round(b.overhead, 3)) == (
        0.544, 0.824, 0.906)
    assert sv.gwh_per_year == pytest.approx(sv.wh_per_query * 100e6 * 365 / 1e9)


def test_the_docs_table_of_per_query_figures_is_the_commands_own():
    """docs/energy.md's per-query table: each row's boundaries, as the command gives them."""
    import re

    text = (Path(__file__).parent.parent / "docs" / "energy.md").read_text()
    section = text.split("## Per-query figures from the literature")[1].split("\n## ")[0]
    pattern = re.compile(r"((?:[\d.]+|not separable)(?: / (?:[\d.]+|not separable)){3})")
    checked = 0
    for line in section.splitlines():
        name = re.search(r"`minigpt scale ([\w.-]+)`", line)
        found = pattern.findall(line.split("|")[-2]) if name else []
        if not found:
            continue
        b = estimate(name.group(1)).serving.boundaries.to_json()
        ours = ["not separable" if v is None else f"{v:.3g}" for v in b.values()]
        assert found[-1].split(" / ") == ours, line
        checked += 1
    assert checked == 4  # Google, Epoch, the throughput form, the 70B roofline


def test_a_throughput_figure_beside_a_stated_one_needs_the_watts(tmp_path):
    text = STATED_ON_TPU_V4.replace("wh_per_query = 0.5\n", "wh_per_query = 0.5\ntokens_per_s = 40\n")
    with pytest.raises(ConfigError, match="tpu-v4 has no power_watts"):
        estimate(_write(tmp_path, text))
    sv = estimate(_write(tmp_path, text + "watts_per_chip = 200\n")).serving
    assert sv.wh_per_query_basis == "stated"
    assert sv.throughput.wh_per_query == pytest.approx(100 / 40 * 200 * 1.1 / 3600)


def test_a_stated_training_energy_set_on_a_serving_scenario():
    e = estimate("dense-70b-h100", "training.energy_mwh=50000")
    assert e.training is None and e.breakeven.training_mwh_is == "stated"
    # 50,000 MWh / (Wh × 100e6 / 1e6 MWh a day)
    assert e.breakeven.days == pytest.approx(50000 / (e.serving.wh_per_query * 100))


def test_the_throughput_forms_chips_are_listed_as_used(tmp_path):
    text = ('[inference]\noutput_tokens = 300\ntokens_per_s = 50\n'
            '[hardware]\nprofile = "h100-sxm"\nchips = 4\n')
    chips = [a for a in estimate(_write(tmp_path, text)).assumptions
             if a.field == "inference.chips"]
    assert [(a.value, a.origin) for a in chips] == [
        (4, "default: the throughput form: [hardware] chips, else 1")]


def test_shares_over_1_within_their_rounding_stop_at_the_total(tmp_path):
    text = ('[inference]\nwh_per_query = 2\naccelerator_share = 0.6\nhost_share = 0.3\n'
            'idle_share = 0.105\n[hardware]\nprofile = "h100-sxm"\n')
    # 1.005, within ±0.0105 of 1: accepted, and the idle boundary is the total, not 2.01 Wh
    b = estimate(_write(tmp_path, text)).serving.boundaries
    assert (b.accelerator, b.host, b.idle, b.overhead) == pytest.approx((1.2, 1.8, 2, 2))
    with pytest.raises(ConfigError, match="exceeds 1"):  # 1.02: beyond
        estimate(_write(tmp_path, text.replace("0.105", "0.12")))
