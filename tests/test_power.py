"""Measured energy readers, on a fake powercap tree and a fake pynvml: package domains only,
wraparound arithmetic, NVML millijoules, and "not measured here" when nothing is exposed."""

import sys
import types

import pytest
from conftest import rapl_domain

from minigpt.hardware import counters
from minigpt.hardware.counters import NvmlReader, RaplReader, measure, wrapped_delta

MAX_UJ = 262143328850


def _domain(root, name, label, energy_uj, max_uj=MAX_UJ):
    return rapl_domain(root, name, label, energy_uj, max_uj)


@pytest.fixture
def sysfs(tmp_path):
    """Two packages, a core subdomain and a psys domain (neither of which may be added)."""
    root = tmp_path / "powercap"
    p0 = _domain(root, "intel-rapl:0", "package-0", 1_000_000)
    p1 = _domain(root, "intel-rapl:1", "package-1", MAX_UJ - 500_000)
    _domain(root, "intel-rapl:0:0", "core", 900_000)
    _domain(root, "intel-rapl:2", "psys", 5_000_000)
    (root / "intel-rapl").mkdir()  # the control-type entry, not a domain
    return root, p0, p1


def test_wrapped_delta():
    assert wrapped_delta(100, 250, 1000) == 150
    assert wrapped_delta(900, 50, 1000) == 150  # 100 to the wrap, then 50 past it
    assert wrapped_delta(5, 5, 1000) == 0
    with pytest.raises(ValueError):
        wrapped_delta(10, 5, 0)


def test_rapl_sums_packages_only_and_handles_wraparound(sysfs):
    root, p0, p1 = sysfs
    r = RaplReader(root)
    assert [d.name for d in r.domains()] == ["intel-rapl:0", "intel-rapl:1"]
    assert r.available() and r.reason == ""
    assert r.read_joules() == 0.0  # the first read is the origin
    (p0 / "energy_uj").write_text("3000000\n")  # +2 J
    (p1 / "energy_uj").write_text("1500000\n")  # wrapped: +0.5 J to the wrap, +1.5 J past it
    (root / "intel-rapl:0:0" / "energy_uj").write_text("99999999\n")  # ignored
    assert r.read_joules() == pytest.approx(4.0)
    (p0 / "energy_uj").write_text("4000000\n")  # +1 J more
    assert r.read_joules() == pytest.approx(5.0)


def test_rapl_not_available(tmp_path, sysfs, monkeypatch):
    r = RaplReader(tmp_path / "nothing")
    assert not r.available() and "no RAPL package domains" in r.reason
    root, _, _ = sysfs

    def denied(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(counters, "_read_int", denied)
    r = RaplReader(root)
    assert not r.available() and "readable by root only" in r.reason


class FakeNVMLError(Exception):
    pass


def _fake_pynvml(energies_mj, fail_init=False):
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.energies = list(energies_mj)

    def init():
        if fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    m.nvmlInit = init
    m.nvmlDeviceGetCount = lambda: len(m.energies)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetTotalEnergyConsumption = lambda h: m.energies[h]
    return m


def test_nvml_reads_millijoules_for_all_or_one(monkeypatch):
    fake = _fake_pynvml([10_000, 250_000])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    every, one = NvmlReader(), NvmlReader(1)
    assert every.available() and one.available()
    assert every.read_joules() == pytest.approx(260.0) and one.read_joules() == pytest.approx(250.0)
    assert (every.name, one.name) == ("nvml", "nvml:1")
    with measure([every, one]) as m:
        fake.energies[0] += 1_500
        fake.energies[1] += 3_000
    assert m.joules == {"nvml": pytest.approx(4.5), "nvml:1": pytest.approx(3.0)}
    assert m.measured and m.total_joules == pytest.approx(7.5) and m.seconds >= 0
    assert "nvml 4.5 J" in m.describe()


def test_nvml_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    r = NvmlReader()
    assert not r.available() and "nvidia-ml-py" in r.reason
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([1, 2]))
    r = NvmlReader(5)
    assert not r.available() and "no GPU 5" in r.reason
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([1], fail_init=True))
    r = NvmlReader()
    assert not r.available() and "Driver Not Loaded" in r.reason


def test_measure_with_nothing_available_says_not_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with measure([RaplReader(tmp_path / "none"), NvmlReader()]) as m:
        pass
    assert m.joules == {"rapl": None, "nvml": None}
    assert not m.measured and m.total_joules is None and m.seconds >= 0
    text = m.describe()
    assert text.startswith("energy: not measured here") and "rapl:" in text and "nvml:" in text
    with measure([]) as m:
        pass
    assert m.describe() == "energy: not measured here (no energy readers)"


def test_measure_mixes_measured_and_not(sysfs, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    root, p0, _ = sysfs
    with measure([RaplReader(root), NvmlReader()]) as m:
        (p0 / "energy_uj").write_text("3000000\n")
    assert m.joules["rapl"] == pytest.approx(2.0) and m.joules["nvml"] is None
    assert m.total_joules == pytest.approx(2.0)
    assert "nvml not measured here" in m.describe()


def test_measure_default_readers_never_invent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with measure() as m:
        pass
    assert set(m.joules) == {"rapl", "nvml"} and m.joules["nvml"] is None
    assert m.joules["rapl"] is not None or m.reasons["rapl"]
