"""The energy accounting's edges that mutation testing (bench/mutation.py accounting) found
unchecked: SI text at every prefix and boundary, each unit conversion, each settings check, each
power source in order, the reasons a layer gives when it has no figure, and the report's columns,
all against values worked by hand."""

import dataclasses

import pytest
from test_energy import (
    ROWS,
    _row,
    home,  # noqa: F401 - autouse: test_energy's calibrated local-cpu, no power
)

from minigpt import units
from minigpt.energy import accounting, run_energy
from minigpt.energy.accounting import PowerBasis
from minigpt.errors import ConfigError
from minigpt.hardware import cpu_power
from minigpt.hardware.counters import NOT_MEASURED, Measurement
from minigpt.hardware.profiles import load_profile

NEEDS_NO_PROFILE = "needs a power figure (no hardware profile; or pass --watts)"


@pytest.mark.parametrize("joules, text", [
    (1.5e12, "1.5 TJ"), (1e12, "1 TJ"), (2e9, "2 GJ"), (1e9, "1 GJ"), (3e6, "3 MJ"), (1e6, "1 MJ"),
    (4e3, "4 kJ"), (1e3, "1 kJ"), (999, "999 J"), (5, "5 J"), (1, "1 J"), (6e-3, "6 mJ"),
    (1e-3, "1 mJ"), (7e-6, "7 µJ"), (1e-6, "1 µJ"), (8e-9, "8 nJ"), (1e-9, "1 nJ"),
    (1e-10, "1e-10 J"), (0.0, "0 J"), (-2500, "-2.5 kJ"), (123456, "123 kJ"),
])
def test_joules_text_has_three_figures_and_the_largest_prefix_that_fits(joules, text):
    assert units.si(joules, "J") == text  # the energy report's joules column


def test_conversions():
    s = accounting.settings()
    assert accounting.kwh(3.6e6) == 1.0
    assert accounting.co2_kg(7.2e6, s) == pytest.approx(2 * s.carbon_kg_per_kwh)
    assert accounting.household_years(3.6e6 * s.household_kwh_per_year, s) == pytest.approx(1.0)
    none = dataclasses.replace(s, water_onsite_l_per_kwh=None, water_offsite_l_per_kwh=None)
    assert accounting.water_litres(3.6e6, none) is None
    offsite = dataclasses.replace(s, water_onsite_l_per_kwh=None)
    assert accounting.water_litres(3.6e6, offsite) == pytest.approx(s.water_offsite_l_per_kwh)


def test_settings_checks_and_origins():
    s = accounting.settings(pue=1.2)
    assert s.origins["pue"] == "given"  # the default given_by
    assert accounting.settings(pue=1.0).pue == 1.0  # no overhead at all is allowed
    assert accounting.settings(carbon_kg_per_kwh=0.0).carbon_kg_per_kwh == 0.0  # all-clean power
    with pytest.raises(ConfigError, match=r"--carbon: carbon_kg_per_kwh must be >= 0, got -1"):
        accounting.settings(carbon_kg_per_kwh=-1.0, given_by="--carbon")
    with pytest.raises(ConfigError, match="water_l_per_kwh is another name for water_onsite_l_per_kwh"):
        accounting.settings(water_l_per_kwh=1.0, water_onsite_l_per_kwh=1.0)
    old = accounting.settings(water_l_per_kwh=2.5)  # the old name alone sets the on-site term
    assert old.water_onsite_l_per_kwh == 2.5 and old.origins["water_l_per_kwh"] == "given"
    new = accounting.settings(water_onsite_l_per_kwh=3.5)
    assert new.water_onsite_l_per_kwh == 3.5 and new.origins["water_l_per_kwh"] == "given"
    flat = accounting.settings(pj_per_flop=1.5)
    assert flat.pj_per_flop == {"fp32": 1.5, "fp16": 1.5, "int8": 1.5}
    assert s.pj_per_byte_sram < s.pj_per_byte  # SRAM (a few pJ/B) is far cheaper than DRAM


def test_the_floor_counts_bytes_both_ways_at_each_dtypes_cost():
    s = accounting.settings()
    rows = [dict(_row(10, 100, "int8"), bytes_written=50), _row(20, 0, "float64")]
    f = s.pj_per_flop
    by_hand = 10 * f["int8"] + 150 * s.pj_per_byte + 20 * f["fp32"]  # float64 costs fp32's
    assert accounting.floor_joules(rows, s) == pytest.approx(by_hand * 1e-12)
    assert accounting.floor_joules(rows, s, pj_per_byte=1.0) == pytest.approx(
        (10 * f["int8"] + 150 + 20 * f["fp32"]) * 1e-12)
    assert accounting.floor_joules([], s) == 0.0
    layer = accounting.floor_layer([_row(1e12, 1e12)], s)
    sram = (1e12 * f["fp32"] + 1e12 * s.pj_per_byte_sram) * 1e-12
    assert layer.name == "physics floor"
    assert f"(DRAM; {units.si(sram, 'J')} if every byte came from SRAM)" in layer.basis
    bad = accounting.floor_layer([_row(1, 1, "float8")], s)
    assert bad == accounting.Layer("physics floor", None,
                                   "no per-operation energy for records of dtype 'float8'")


def test_measured_layer_names_its_readers():
    s = accounting.settings()
    m = Measurement(joules={"rapl": 100.0, "nvml": 20.0}, seconds=2.0)
    layer = accounting.measured_layer(m, s)
    assert layer.joules == pytest.approx(120 * s.pue)
    assert layer.basis.startswith("rapl, nvml counters, 120 J × PUE 1.10")
    one = accounting.measured_layer(Measurement(joules={"rapl": 100.0, "nvml": None}, seconds=2.0), s)
    assert one.basis.startswith("rapl counters, 100 J")
    assert accounting.measured_layer(None, s) == accounting.Layer("measured", None, NOT_MEASURED)


def _figure(power: accounting.PowerFigure) -> tuple:
    return power.watts, power.note


def test_power_sources_in_order():
    with pytest.raises(ConfigError, match="--watts must be > 0, got 0"):
        accounting.power_figure(None, 0.0)
    given = accounting.power_figure(None, 0.5)
    assert _figure(given) == (0.5, "--watts") and given.basis is PowerBasis.GIVEN
    brief = Measurement(joules={"rapl": 1.0, "nvml": 2.0}, seconds=0.5)  # under a second counts
    measured = accounting.power_figure(None, None, brief)
    assert _figure(measured) == (6.0, "measured: rapl, nvml") and measured.basis is PowerBasis.MEASURED
    instant = Measurement(joules={"rapl": 1.0}, seconds=0.0)  # no time: no mean power
    assert _figure(accounting.power_figure(None, 40.0, instant)) == (40.0, "--watts")
    h100 = accounting.power_figure(load_profile("h100-sxm"), None)
    assert _figure(h100) == (700, "profile h100-sxm") and h100.basis is PowerBasis.PROFILE
    cpu_only = Measurement(reasons={"rapl": "no RAPL"}, seconds=4.0, cpu_seconds=6.0)
    est = cpu_power.estimate(6.0, 4.0)
    estimated = accounting.power_figure(None, None, cpu_only)
    assert _figure(estimated) == (est.watts, est.basis) and estimated.basis is PowerBasis.ESTIMATED
    assert estimated.text == f"{est.watts:.3g} W ({est.basis})"
    assert accounting.power_figure(None, None, cpu_only, estimate=False).watts is None
    none = "needs a power figure (no hardware profile: pass --watts or add power_watts to your profile)"
    nothing = accounting.power_figure(None, None)
    assert _figure(nothing) == (None, none) and nothing.basis is PowerBasis.NONE and nothing.text == none


def test_roofline_layer_reasons_and_share():
    s = accounting.settings()
    prof = load_profile("local-cpu")
    assert accounting.roofline_layer(ROWS, None, 50, "why", s) == accounting.Layer("roofline", None, "why")
    fp16 = accounting.roofline_layer([_row(1, 1, "float16")], prof, 50, "why", s)
    assert fp16.name == "roofline" and fp16.joules is None and fp16.basis.startswith("needs local-cpu: peak fp16")
    half = accounting.roofline_layer(ROWS, prof, 50, "why", s, seconds=0.24)  # ideal 0.12 s
    assert "ideal time on local-cpu 0.12 s (50% of the measured time) × 50 W" in half.basis
    assert "ideal time on local-cpu 0.12 s × 50 W" in accounting.roofline_layer(ROWS, prof, 50, "", s).basis


def test_run_layers_reasons_without_a_profile():
    layers = accounting.run_layers(ROWS, 10.0, profile=None)
    assert layers[1].basis == layers[2].basis == NEEDS_NO_PROFILE
    unknown = accounting.run_layers(ROWS, 10.0, profile="no-such-chip")
    assert unknown[1].basis.startswith("needs a power figure (no hardware profile: ")
    assert unknown[2].basis.startswith("no hardware profile: ")  # the roofline says what is missing
    given = accounting.run_layers(ROWS, 10.0, profile=None, watts=50)
    assert given[1].basis == "10 s × 50 W (--watts) × PUE 1.10"
    cpu_only = Measurement(reasons={"rapl": "no RAPL"}, seconds=10.0, cpu_seconds=10.0)
    assert accounting.run_layers(ROWS, 10.0, profile=None, measured=cpu_only)[1].joules is not None
    assert accounting.run_layers(ROWS, 10.0, profile=None, measured=cpu_only,
                                 estimate=False)[1].joules is None
    timed = accounting.run_layers(ROWS, 0.24, watts=50)
    assert "(50% of the measured time)" in timed[2].basis
    as_object = accounting.run_layers(ROWS, 0.24, profile=load_profile("local-cpu"), watts=50)
    assert as_object[2].joules == pytest.approx(timed[2].joules)


def test_report_columns():
    """The energy table's columns: 3.6 MJ is 1 kWh, so Wh = 1000 and gCO2e = the grid's g/kWh."""
    s = accounting.settings()
    seconds = 3.6e6 / (50 * s.pue)  # at 50 W and the PUE: time x power = 3.6 MJ
    lines = run_energy.report_lines(run_energy.build(ROWS, seconds, profile=None, watts=50,
                                                     tokens=1000, s=s))
    grams = 1e3 * s.carbon_kg_per_kwh  # 1 kWh
    assert lines[1].split() == ["layer", "energy", "Wh", "gCO2e", "J/token", "how"]
    assert lines[2] == "-" * len(lines[1])  # the rule underlines the whole header
    assert lines[4].split()[:8] == ["time", "x", "power", "3.6", "MJ", "1000", f"{grams:.3g}",
                                    "3.6e+03"]
    plain = run_energy.report_lines(run_energy.build(ROWS, seconds, profile=None, watts=50, s=s))
    assert plain[1].split() == ["layer", "energy", "Wh", "gCO2e", "how"]
    assert plain[4].split()[:7] == ["time", "x", "power", "3.6", "MJ", "1000", f"{grams:.3g}"]
    low = accounting.settings(carbon_kg_per_kwh=0.12444)  # 124.44 g: "124", not 124.56's "125"
    low_seconds = 3.6e6 / (50 * low.pue)
    assert run_energy.report_lines(run_energy.build(ROWS, low_seconds, profile=None, watts=50,
                                                    s=low))[4].split()[6] == "124"


def test_report_lines_title_settings_and_estimate():
    s = accounting.settings(pue=1.5)
    lines = run_energy.report_lines(run_energy.build(ROWS, 2.0, profile="h100-sxm", s=s))
    assert lines[0] == "energy, four ways (2 s measured; profile h100-sxm)"
    assert lines[-1].startswith("PUE 1.50 (given)")
    assert lines[4].endswith("× PUE 1.50")  # the time x power layer used the settings given
    assert "profile no profile)" in run_energy.report_lines(run_energy.build(ROWS, 2.0, profile=None))[0]
    quick = dataclasses.replace(load_profile("local-cpu"), name="quick-cpu")
    assert run_energy.report_lines(run_energy.build(ROWS, 2.0, profile=quick))[0].endswith(
        "profile quick-cpu (this machine's cached quick measurement; `minigpt calibrate` measures "
        "carefully))")
    cpu_only = Measurement(reasons={"rapl": "no RAPL"}, seconds=2.0, cpu_seconds=2.0)
    text = "\n".join(run_energy.report_lines(run_energy.build(ROWS, 2.0, profile=None, measured=cpu_only)))
    assert "estimated: " in text
    assert "estimated: " not in "\n".join(
        run_energy.report_lines(run_energy.build(ROWS, 2.0, profile=None, measured=cpu_only,
                                                 estimate=False)))


def test_a_profile_power_figure_cites_the_profiles_source_or_none():
    """source is where the profile's power figure was published, and "" when the profile names
    none (energy.json's watts_source)."""
    h100 = load_profile("h100-sxm")
    cited = accounting.power_figure(h100, None)
    assert cited.source == h100.sources["power_watts"] != ""
    bare = dataclasses.replace(h100, sources={k: v for k, v in h100.sources.items() if k != "power_watts"})
    uncited = accounting.power_figure(bare, None)
    assert uncited.basis is PowerBasis.PROFILE and uncited.watts == 700
    assert uncited.source == "" and uncited.to_json()["watts_source"] == ""


def test_layers_without_a_profile_or_its_reason_say_there_is_no_profile():
    """layers_of called without find_profile's reason: the layers that need a power figure say
    that there is no hardware profile, as run_layers does for profile=None."""
    layers = accounting.layers_of(ROWS, 10.0, None, accounting.power_figure(None, None), None,
                                  accounting.settings())
    assert layers[1].basis == layers[2].basis == NEEDS_NO_PROFILE
