"""Ceilings by kind of pass: the STREAM kernels (Numba and NumPy twins), their counts, the
profile's [bandwidth.<kind>.<threading>] tables, and roofline.memory_ceiling, which holds each
record against the bandwidth its read/write mix fits (not their speed: bench/ and calibrate)."""

import numpy as np
import pytest

from minigpt import kernels
from minigpt.counting.meter import METER
from minigpt.energy import run_energy
from minigpt.errors import ConfigError
from minigpt.hardware import bandwidth, calibrate, profiles, roofline
from minigpt.kernels import stream

PATHS = ["numpy"] + (["numba"] if kernels.AVAILABLE else [])

PROFILE = """name = "box"
description = "a test machine"
[peak_flops.fp32]
value = 100e9
source = "test"
[peak_flops.tf32]
value = "unsupported"
[peak_flops.fp16]
value = "unknown"
[peak_flops.int8]
value = "unknown"
[memory_bandwidth]
value = 10e9
source = "test copy"
[memory_bytes]
value = 1e9
source = "test"
[power_watts]
value = "unknown"
"""

STREAM = """
[bandwidth.read.one_thread]
value = 20e9
source = "test"
note = "read, 1 thread"
[bandwidth.read.all_cores]
value = 30e9
source = "test"
note = "read, all cores"
[bandwidth.copy.one_thread]
value = 16e9
source = "test"
note = "copy, 1 thread"
[bandwidth.triad.all_cores]
value = 18e9
source = "test"
note = "triad, all cores"
"""


@pytest.fixture
def use_path():
    outer = kernels.active()
    yield kernels.use
    kernels.use(outer)


def _profile(tmp_path, text: str) -> profiles.Profile:
    path = tmp_path / "box.toml"
    path.write_text(text)
    return profiles.load_profile(path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_stream_kernels_compute_what_they_say(use_path, path, threads):
    use_path(path)
    rng = np.random.default_rng(threads)
    a, b, c = (rng.standard_normal(100_003) for _ in range(3))
    assert stream.read(a, threads) == pytest.approx(a.sum(), rel=1e-12)
    stream.triad(a, b, c, 3.0, threads)
    np.testing.assert_allclose(a, b + 3.0 * c, rtol=1e-15)
    stream.copy(a, c, threads)
    assert np.array_equal(a, c)
    stream.write(a, 2.5, threads)
    assert np.all(a == 2.5)
    with pytest.raises(ValueError):
        stream.copy(a, c[1:], threads)  # arrays of different sizes are refused


def test_numpy_triad_blocks_cover_every_element(use_path):
    use_path("numpy")
    n = 3 * stream.BLOCK + 17  # a last block shorter than the others
    a, b, c = np.zeros(n), np.arange(n, dtype=float), np.ones(n)
    stream.triad(a, b, c, -1.0, 2)
    assert np.array_equal(a, b - 1.0)


@pytest.mark.parametrize("kind", bandwidth.KINDS)
def test_a_pass_is_counted_with_what_it_reads_and_writes(kind):
    a, b, c = np.ones(1000), np.ones(1000), np.ones(1000)
    expected = {"read": (1000, 8000, 0), "write": (0, 0, 8000), "copy": (0, 8000, 8000),
                "triad": (2000, 16000, 8000)}[kind]
    METER.reset()
    try:
        bandwidth.run_pass(kind, a, b, c, 1)
        (key, rec), = METER.records.items()
        assert (key.kind, key.op) == ("stream", kind)
        assert (rec.flops, rec.bytes_read, rec.bytes_written) == expected
        METER.reset()
        with METER.paused():
            bandwidth.run_pass(kind, a, b, c, 1)
        assert METER.records == {}
    finally:
        METER.reset()


@pytest.mark.parametrize(("read", "written", "kind"), [
    (1, 0, "read"), (0, 1, "write"), (1, 1, "copy"), (2, 1, "triad"),
    (768 * 3072 * 4, 3072 * 4, "read"),  # a decode step's matrix-vector product: weights in
    (6, 1, "read"), (4, 1, "triad"), (3, 2, "triad"), (5, 4, "copy"), (1, 4, "write"), (1, 2, "copy"),
])
def test_the_mix_picks_the_nearest_kind(read, written, kind):
    assert roofline.stream_kind(read, written) == kind


def test_memory_ceiling_takes_the_better_threading_else_memory_bandwidth(tmp_path):
    prof = _profile(tmp_path, PROFILE + STREAM)
    read = roofline.memory_ceiling(prof, 100, 0)
    assert read == roofline.Ceiling("read bandwidth", 30e9, "read, all cores")
    assert roofline.memory_ceiling(prof, 1, 1).value == 16e9  # only one_thread given
    assert roofline.memory_ceiling(prof, 2, 1).how == "triad, all cores"
    write = roofline.memory_ceiling(prof, 0, 1)  # no write figure: the profile's one figure
    assert write.name == "memory_bandwidth" and write.value == 10e9 and "no write figure" in write.how
    old = _profile(tmp_path, PROFILE)  # a profile from before the STREAM figures
    assert old.bandwidth == {} and roofline.memory_ceiling(old, 1, 0).value == 10e9
    none = _profile(tmp_path, PROFILE.replace("value = 10e9", 'value = "unknown"'))
    with pytest.raises(ConfigError, match="memory_bandwidth"):
        roofline.memory_ceiling(none, 1, 0)


def test_bound_holds_each_record_against_its_own_ceiling(tmp_path):
    prof = _profile(tmp_path, PROFILE + STREAM)

    def row(flops, read, written):
        return {"flops": flops, "bytes_read": read, "bytes_written": written, "dtype": "float32"}

    matvec = roofline.bound(row(2e6, 4e6, 4e3), prof)  # 0.5 FLOP/B: memory bound, reading
    assert matvec.kind == "memory" and matvec.ceiling.name == "read bandwidth"
    assert matvec.seconds == pytest.approx(4.004e6 / 30e9)
    add = roofline.bound(row(1e6, 8e6, 4e6), prof)  # x + y into z: a triad's mix
    assert add.ceiling.name == "triad bandwidth" and add.seconds == pytest.approx(12e6 / 18e9)
    gemm = roofline.bound(row(2e12, 1e9, 5e8), prof)
    assert gemm.kind == "compute" and gemm.ceiling.label() == "fp32 peak 100 GFLOP/s"
    rows = [row(2e6, 4e6, 4e3), row(1e6, 8e6, 4e6), row(2e12, 1e9, 5e8)]
    used = roofline.by_ceiling(rows, prof)
    assert [c.name for c in used] == ["fp32 peak", "triad bandwidth", "read bandwidth"]
    assert sum(used.values()) == pytest.approx(roofline.roofline_seconds(rows, prof))
    line = roofline.ceilings_line(rows, prof)
    assert "fp32 peak 100 GFLOP/s" in line and "read bandwidth 30 GB/s" in line


@pytest.mark.parametrize(("table", "words"), [
    ("[bandwidth.reed.all_cores]\nvalue = 1e9\nsource = \"x\"\n", "bandwidth.reed: unknown field"),
    ("[bandwidth.read.both]\nvalue = 1e9\nsource = \"x\"\n", "bandwidth.read.both: unknown field"),
    ("[bandwidth.read]\nvalue = 1e9\nsource = \"x\"\n", "bandwidth.read: expected tables"),
    ("[bandwidth.copy.one_thread]\nvalue = -1e9\nsource = \"x\"\n", "must be positive"),
    ("[bandwidth.copy.one_thread]\nvalue = 1e9\n", "missing required field 'source'"),
])
def test_a_bad_bandwidth_table_is_one_line_naming_it(tmp_path, table, words):
    with pytest.raises(ConfigError, match=words):
        _profile(tmp_path, PROFILE + table)


def _figures(values=(20e9, 30e9)):
    return tuple(bandwidth.StreamFigure(kind, threads, v * (k + 1), 128, 3, "numba prange", 32.0)
                 for k, kind in enumerate(bandwidth.KINDS) for threads, v in zip((1, 2), values))


def test_calibrate_keeps_each_figure_with_its_method(tmp_path):
    m = calibrate.MachineFigures(fp32=1e11, fp64=5e10, bandwidth=9e9, n=1024, copy_mib=64,
                                 stream=_figures())
    prof = _profile(tmp_path, calibrate.profile_toml(m))
    assert prof.bandwidth == {f.key: f.bytes_per_s for f in m.stream}
    assert prof.notes["bandwidth.triad.all_cores"] == m.stream[-1].method()
    assert "2 threads (all cores)" in m.stream[-1].method() and "best of 3" in m.stream[-1].method()
    assert prof.memory_bandwidth == 9e9  # the copy figure stays where older code reads it
    assert roofline.memory_ceiling(prof, 1, 0).value == 30e9
    lines = bandwidth.table_lines(m.stream, (512, 27e9))
    assert any(line.startswith("read (sum of 128 MiB), 1 thread") and "20.0" in line for line in lines)
    assert "BLAS matrix-vector product over 512 MiB" in lines[-1] and "27.0" in lines[-1]
    doc = run_energy.profile_dict(prof)  # energy.json keeps them: the run's joules use the same
    again = run_energy.profile_from_doc(doc)
    assert roofline.memory_ceiling(again, 2, 1) == roofline.memory_ceiling(prof, 2, 1)
    del doc["bandwidth"], doc["bandwidth_notes"]  # an energy.json from before: memory_bandwidth
    assert roofline.memory_ceiling(run_energy.profile_from_doc(doc), 1, 0).value == 9e9


def test_an_old_quick_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))
    calls = []

    def fake_measure(quick=False):
        calls.append(quick)
        return calibrate.MachineFigures(fp32=1e11, fp64=5e10, bandwidth=9e9, n=1024, copy_mib=64,
                                        stream=_figures())

    monkeypatch.setattr(calibrate, "measure", fake_measure)
    path = calibrate.cache_path()
    path.parent.mkdir(parents=True)
    old = calibrate.MachineFigures(fp32=1e11, fp64=5e10, bandwidth=9e9, n=1024, copy_mib=64)
    path.write_text(calibrate.profile_toml(old, calibrate.QUICK_NAME))  # no [bandwidth.*]
    assert profiles.load_profile(path).bandwidth == {}  # it loads
    assert calibrate.quick_profile().bandwidth["read.all_cores"] == 30e9 and calls == [True]
    calibrate.quick_profile()
    assert calls == [True]  # the new cache is kept


def test_last_level_cache_sums_its_instances(tmp_path):
    def cache(cpu, index, level, size, shared):
        d = tmp_path / f"cpu{cpu}" / "cache" / f"index{index}"
        d.mkdir(parents=True)
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
        (d / "shared_cpu_list").write_text(f"{shared}\n")

    for cpu in range(4):
        cache(cpu, 2, 2, "1024K", str(cpu))
        cache(cpu, 3, 3, "32768K", "0-1" if cpu < 2 else "2-3")  # two L3s, each of two cores
    assert bandwidth.last_level_cache_bytes(str(tmp_path)) == 64 << 20
    assert bandwidth.last_level_cache_bytes(str(tmp_path / "none")) is None
    assert bandwidth.array_mib(quick=True, llc=64 << 20) == 256  # 4 x the cache
    assert bandwidth.array_mib(quick=True, llc=1 << 20) == bandwidth.QUICK_MIB
    assert bandwidth.array_mib(quick=False, llc=0) == bandwidth.FULL_MIB


def test_measure_stream_gives_every_kind_on_one_thread_and_all_cores(monkeypatch):
    monkeypatch.setattr(stream, "max_threads", lambda: 2)
    figures = bandwidth.measure_stream(repeats=1, mib=1)
    assert [f.key for f in figures] == [f"{k}.{t}" for k in bandwidth.KINDS
                                        for t in bandwidth.THREADINGS]
    assert all(f.bytes_per_s > 0 and f.array_mib == 1 and f.path == stream.path() for f in figures)
    monkeypatch.setattr(stream, "max_threads", lambda: 1)
    assert [f.threads for f in bandwidth.measure_stream(repeats=1, mib=1)] == [1, 1, 1, 1]


def test_costs_and_the_report_say_which_ceilings_they_used(trained_run):
    import json

    from minigpt.report import html
    from tests.conftest import run_cli

    r = run_cli("-m", "minigpt", "costs", str(trained_run), "--by", "kind")
    assert r.returncode == 0, r.stderr
    assert "roofline ceilings on " in r.stdout and "peak" in r.stdout
    r = run_cli("-m", "minigpt", "costs", str(trained_run), "--format", "json")
    used = json.loads(r.stdout)["roofline_ceilings"]
    assert sum(c["share_of_ideal_seconds"] for c in used) == pytest.approx(1.0)
    assert {c["name"] for c in used} & {"read bandwidth", "copy bandwidth", "triad bandwidth"}
    page = html.render(trained_run)
    assert "each op's bytes against the bandwidth its read/write mix fits" in page
    doc = run_energy.load(trained_run)
    assert "ceilings: " in doc["layers"]["roofline"]["why"]


def test_the_bandwidth_bench_keeps_each_paths_best_figure(capsys):
    import importlib.util

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("bench_bandwidth", ROOT / "bench" / "bandwidth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    outer = kernels.active()
    assert bench.main(["--rounds", "2", "--mib", "1", "--matvec-mib", "1"]) == 0
    assert kernels.active() == outer  # the bench puts the switch back
    out = capsys.readouterr().out
    assert "read (sum of 1 MiB), 1 thread" in out and "numpy GB/s" in out
    r = bench.measure(1, 1, 1)
    assert {f["kernels"] for f in r["figures"]} == set(PATHS)
    assert len(r["figures"]) == len(PATHS) * len(bandwidth.KINDS) * len({1, stream.max_threads()})
