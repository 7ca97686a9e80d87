"""A run's power figure: RAPL on a fake powercap tree (packages and DRAM added, subdomains and psys
never; two counter wraps inside one run caught by the sampling thread; the permission-denied line),
the order of preference (measured > --watts > profile > estimate), and the sourced TDP estimate."""

import threading
import time

import pytest
from conftest import rapl_domain

from minigpt.energy import accounting
from minigpt.hardware import counters, cpu_power
from minigpt.hardware.counters import Measurement, RaplReader, measure
from minigpt.hardware.profiles import load_profile

MAX_UJ = 10_000_000  # a 10 J counter range, so that two wraps fit in a short test


def _domain(root, name, label, energy_uj, max_uj=MAX_UJ):
    return rapl_domain(root, name, label, energy_uj, max_uj)


@pytest.fixture
def powercap(tmp_path):
    """A package with a core and a dram subdomain, a separate top-level dram domain, and psys."""
    root = tmp_path / "powercap"
    doms = {"pkg": _domain(root, "intel-rapl:0", "package-0", 1_000_000),
            "core": _domain(root, "intel-rapl:0:0", "core", 500_000),
            "pkg_dram": _domain(root, "intel-rapl:0:1", "dram", 200_000),
            "dram": _domain(root, "intel-rapl:1", "dram", 300_000),
            "psys": _domain(root, "intel-rapl:2", "psys", 4_000_000)}
    (root / "intel-rapl").mkdir()  # the control type, not a zone
    return root, doms


def _set(d, uj):
    (d / "energy_uj").write_text(f"{uj}\n")


def test_packages_and_dram_are_added_subdomains_and_psys_never(powercap):
    root, d = powercap
    r = RaplReader(root)
    assert [p.name for p in r.domains()] == ["intel-rapl:0", "intel-rapl:0:1", "intel-rapl:1"]
    with measure([r], interval=60) as m:
        _set(d["pkg"], 3_000_000)  # +2 J
        _set(d["pkg_dram"], 700_000)  # +0.5 J: DRAM is metered apart from the package
        _set(d["dram"], 550_000)  # +0.25 J
        _set(d["core"], 9_500_000)  # +9 J inside the package: must not be added again
        _set(d["psys"], 9_000_000)  # +5 J for the whole platform: contains the rest
    assert m.joules["rapl"] == pytest.approx(2.75)
    assert m.measured and "rapl 2.75 J" in m.describe()


def _wait_for_sample(m: Measurement, seen: int, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while m.samples <= seen:
        assert time.monotonic() - t0 < timeout, "the sampling thread never read the counters"
        time.sleep(0.005)


def test_two_counter_wraps_in_one_run_are_counted(powercap):
    root, d = powercap
    _set(d["pkg"], 2_000_000)
    r = RaplReader(root)
    r.domains = lambda: [d["pkg"]]  # the package alone, to follow one counter
    with measure([r], interval=0.01) as m:
        for uj in (9_000_000, 5_000_000, 3_000_000):  # +7 J, wrap: +6 J, wrap: +8 J
            seen = m.samples
            _set(d["pkg"], uj)
            _wait_for_sample(m, seen + 1)  # a read that began before the write may miss it
    # end - start alone would say 1 J: the wraps were caught because the thread read in between
    assert m.joules["rapl"] == pytest.approx(21.0)
    assert not any(t.name == "minigpt-energy-sampler" for t in threading.enumerate())


def test_unreadable_rapl_says_so_with_the_command(powercap, monkeypatch):
    root, _ = powercap

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(counters, "_read_int", denied)
    r = RaplReader(root)
    assert not r.available()
    assert "\n" not in r.reason and "readable by root only" in r.reason
    assert f"sudo chmod a+r {root}/intel-rapl:*/energy_uj" in r.reason
    with measure([r]) as m:
        pass
    layer = accounting.measured_layer(m, accounting.settings())
    assert layer.joules is None and "sudo chmod a+r" in layer.basis


def test_power_order_measured_then_watts_then_profile_then_estimate():
    Basis = accounting.PowerBasis
    m = Measurement(joules={"rapl": 100.0}, seconds=10.0, cpu_seconds=5.0)
    h100 = load_profile("h100-sxm")

    def figure(*args, **kwargs) -> tuple:
        p = accounting.power_figure(*args, **kwargs)
        return p.watts, p.note, p.basis

    assert figure(h100, 60, m) == (10.0, "measured: rapl; --watts 60 not used", Basis.MEASURED)
    unmeasured = Measurement(joules={"rapl": None}, reasons={"rapl": "x"}, seconds=10.0,
                             cpu_seconds=5.0)
    assert figure(h100, 60, unmeasured) == (60, "--watts", Basis.GIVEN)
    assert figure(h100, None, unmeasured) == (700, "profile h100-sxm", Basis.PROFILE)
    assert accounting.power_figure(h100, None, unmeasured).source == h100.sources["power_watts"]
    w, basis, kind = figure(None, None, unmeasured)
    assert basis.startswith("estimated: ") and w > 0 and kind is Basis.ESTIMATED
    assert figure(None, None, unmeasured, estimate=False)[0] is None
    assert figure(None, None, Measurement())[0] is None  # no CPU time: no estimate
    none = accounting.power_figure(None, None, Measurement())
    assert none.basis is Basis.NONE and none.note.startswith("needs a power figure")
    assert none.text == none.note  # no watts to print
    assert accounting.power_figure(h100, 60, unmeasured).text == "60 W (--watts)"


def test_the_power_figure_in_energy_json_names_its_basis():
    """watts_method is the PowerBasis's value, beside the note (watts_basis) and the source."""
    from minigpt.energy import run_energy

    rows = [{"scope": "h0", "op": "x@w", "kind": "matmul", "phase": "forward", "dtype": "float32",
             "calls": 1, "flops": 2e9, "useful_flops": 2e9, "bytes_read": 1e6, "bytes_written": 0,
             "seconds": 0.5}]
    unmeasured = Measurement(joules={"rapl": None}, reasons={"rapl": "x"}, seconds=2.0,
                             cpu_seconds=1.0)
    measured = Measurement(joules={"rapl": 40.0}, seconds=2.0, cpu_seconds=1.0)
    cases = [("h100-sxm", measured, None, True, "measured"),
             ("h100-sxm", unmeasured, 60, True, "given"),
             ("h100-sxm", unmeasured, None, True, "profile"),
             (None, unmeasured, None, True, "estimated"),
             (None, unmeasured, None, False, "none")]
    for profile, m, watts, estimate, method in cases:
        doc = run_energy.build(rows, 2.0, profile, m, watts, tokens=10, estimate=estimate)
        figure = accounting.power_figure(profile and load_profile(profile), watts, m, estimate)
        assert doc["watts_method"] == method == figure.basis.value
        assert {k: doc[k] for k in figure.to_json()} == figure.to_json()
        assert (doc["watts"] is None) == (method == "none")
        assert bool(doc["watts_source"]) == (method in ("profile", "estimated"))


def test_estimate_from_the_table_names_its_basis():
    est = cpu_power.estimate(19.0, 10.0, "13th Gen Intel(R) Core(TM) i7-1365U", cores=12)
    assert est.watts == pytest.approx(15 * 1.9 / 12)
    assert est.basis == ("estimated: 13th Gen Intel Core i7-1365U, 15 W rated, 1.9 of 12 logical "
                         "cores busy")
    assert "ark.intel.com" in est.source or "Intel" in est.source


def test_estimate_of_an_unknown_cpu_uses_the_stated_default():
    _, default = cpu_power.load_table()
    est = cpu_power.estimate(3.0, 2.0, "Intel(R) Xeon(R) Processor", cores=2)
    assert est.watts == pytest.approx(default["watts_per_logical_core"] * 1.5)
    assert "Intel Xeon Processor (not in the CPU table)" in est.basis
    assert "1.5 of 2 logical cores busy" in est.basis and "Cloud Carbon Footprint" in est.source
    assert "CPU model unknown" in cpu_power.estimate(1.0, 1.0, "", cores=4).basis
    assert cpu_power.estimate(50.0, 1.0, "", cores=4).basis.endswith("4 of 4 logical cores busy")


@pytest.mark.parametrize("model, watts", [
    ("Intel(R) Core(TM) i5-1240P", 28), ("12th Gen Intel(R) Core(TM) i7-12700H", 45),
    ("13th Gen Intel(R) Core(TM) i9-13980HX", 55), ("13th Gen Intel(R) Core(TM) i9-13900K", 125),
    ("13th Gen Intel(R) Core(TM) i5-13400", 65), ("Intel(R) Core(TM) Ultra 7 165U", 15),
    ("Intel(R) Xeon(R) Platinum 8480+", 350), ("AMD EPYC 9654 96-Core Processor", 360),
    ("AMD Ryzen 9 7950X 16-Core Processor", 170), ("AMD Ryzen 7 7840U w/ Radeon 780M Graphics", 28),
    ("AMD Ryzen 5 5600X 6-Core Processor", 65), ("Apple M1", 39), ("Apple M2 Pro", 100),
    ("Apple M4", 65), ("Apple M1 Max", None), ("Intel(R) Xeon(R) Processor", None),
])
def test_table_patterns(model, watts):
    entry = cpu_power.lookup(model)
    assert (entry["watts"] if entry else None) == watts


def test_every_table_entry_has_a_source():
    entries, default = cpu_power.load_table()
    assert len(entries) >= 20 and default["source"]
    assert all(e["source"].strip() and e["watts"] > 0 for e in entries)
