"""A finished run's own energy and report: energy.json (an estimated time x power figure and a
roofline figure on a machine without counters, each layer's arithmetic from what is stored, and
floor <= roofline <= time x power at given figures), joules in every grouping of `minigpt costs`
adding up to the run's totals (table, JSON, CSV), generate --costs split into prefill and decode,
and report.html, rendered by headless Chromium where installed."""

import csv
import io
import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from conftest import TINY, TINY_TOML, merge, run_cli, set_args

from minigpt.counting import tables
from minigpt.energy import accounting, run_energy
from minigpt.hardware import cpu_power, roofline
from minigpt.hardware.profiles import Profile
from minigpt.report import html

GROUPINGS = ("scope", "op", "kind", "layer", "phase")


def _doc(run):
    return json.loads((run / "energy.json").read_text())


def _assert_the_layers_arithmetic(doc: dict, rows: list[dict]) -> None:
    """Each layer from its inputs as stored, whatever they came to on a busy or an idle machine:
    time x power = seconds x W x PUE; roofline = the ideal seconds of the rows on the stored
    profile x W x PUE; floor = the rows' FLOPs and bytes at their pJ figures."""
    layers = {k: v["joules"] for k, v in doc["layers"].items()}
    ideal = roofline.roofline_seconds(rows, run_energy.profile_from_doc(doc["profile"]))  # s
    assert layers["time_x_power"] == pytest.approx(doc["seconds"] * doc["watts"] * doc["pue"])
    assert layers["roofline"] == pytest.approx(ideal * doc["watts"] * doc["pue"])
    assert layers["floor"] == pytest.approx(accounting.floor_joules(rows, accounting.settings()))
    assert layers["floor"] > 0


def test_a_run_writes_energy_json_with_every_layer(trained_run):
    doc = _doc(trained_run)
    assert set(doc["layers"]) == {"measured", "time_x_power", "roofline", "floor"}
    for key in ("seconds", "watts", "watts_basis", "pue", "pue_source", "grid_kg_co2e_per_kwh",
                "grid_source", "tokens", "metered", "profile"):
        assert key in doc, key
    layers = {k: v["joules"] for k, v in doc["layers"].items()}
    assert all(v["why"] for v in doc["layers"].values())
    if layers["measured"] is None:  # this machine's case: no readable counters
        assert doc["watts_basis"].startswith("estimated: ")
        assert "logical cores busy" in doc["watts_basis"] and doc["watts_source"]
    assert layers["time_x_power"] is not None and layers["roofline"] is not None
    _assert_the_layers_arithmetic(doc, tables.load(trained_run)["records"])
    tp = doc["layers"]["time_x_power"]
    assert tp["joules"] == pytest.approx(doc["seconds"] * doc["watts"] * doc["pue"])
    assert tp["wh"] == pytest.approx(tp["joules"] / 3600)
    assert tp["j_per_token"] == pytest.approx(tp["joules"] / doc["tokens"])
    assert tp["gco2e"] == pytest.approx(tp["joules"] / 3.6e6 * doc["grid_kg_co2e_per_kwh"] * 1e3)
    assert doc["profile"]["peak_flops"]["fp32"] > 0  # the roofline used, stored with the run


def test_the_tiny_model_prints_an_estimate_and_floor_roofline_time_x_power_in_order(tmp_path):
    # configs/tiny.toml's model (4 x 128, 64 tokens), two small steps. The order below is a fact
    # about this model on a CPU, not a law: the floor uses 45 nm energies per FLOP and byte, which
    # a modern chip at a small power figure can beat on a model this narrow (a 16-wide one is
    # memory bound at ~250 pJ/B here against the floor's 162.5). It is checked at given figures:
    # the run's own watts (its share of the cores) and roofline (the quick measurement) fall when
    # the machine is busy, and the order with them.
    out = tmp_path / "tiny"
    r = run_cli("train.py", "configs/tiny.toml", "--no-progress", "--set", f"train.out_dir={out!s}",
                "--set", "train.batch_size=8", "--set", "train.max_steps=2", "--set",
                "eval.batches=1", "--set", "eval.interval=2", "--set",
                'data.path="corpora/fables.txt"', timeout=120)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip()}
    if "not measured here" in lines["measured"]:
        assert "estimated: " in lines["time"] and "logical cores busy" in lines["time"]
    assert "ideal time on" in lines["roofline"] and "J" in lines["roofline"]
    assert "no local-cpu profile" not in r.stdout and "report.html" in r.stdout
    rows = tables.load(out)["records"]
    _assert_the_layers_arithmetic(_doc(out), rows)
    # This run's counts on docs/benchmarks.md's calibrated CPU (354.9 GFLOP/s fp32, 24.9 GB/s) at
    # the README's 7.55 W, the run taking its ideal time / 0.665 (the README's run: 66.5%).
    cpu = Profile("benchmarks-cpu", "docs/benchmarks.md's 2-core VM", {"fp32": 354.9e9,
                  "fp64": 172.1e9}, 24.9e9, None, None)
    seconds = roofline.roofline_seconds(rows, cpu) / 0.665
    _, time_power, roof, floor = accounting.run_layers(rows, seconds, cpu, watts=7.55)
    assert 0 < floor.joules <= roof.joules <= time_power.joules


@pytest.mark.parametrize("by", GROUPINGS)
def test_joules_of_every_grouping_add_up(trained_run, by):
    doc, rows = _doc(trained_run), tables.load(trained_run)["records"]
    groups = tables.group(rows, by, extra=run_energy.row_joules(doc))
    total = sum(g["joules"] for g in groups)
    assert total == pytest.approx(doc["metered"]["joules"])
    assert total == pytest.approx(doc["metered"]["seconds"] * doc["watts"] * doc["pue"])
    assert sum(g["joules_roofline"] for g in groups) == pytest.approx(
        doc["layers"]["roofline"]["joules"])
    assert doc["metered"]["joules"] <= doc["layers"]["time_x_power"]["joules"]
    for g in groups:
        assert g["joules"] == pytest.approx(g["seconds"] * doc["watts"] * doc["pue"])
    # the command, in each format
    js = json.loads(run_cli("-m", "minigpt", "costs", trained_run, "--by", by, "--format",
                            "json").stdout)
    assert sum(g["joules"] for g in js["groups"]) == pytest.approx(total)
    assert js["energy"]["watts_basis"] == doc["watts_basis"]
    rows_csv = list(csv.DictReader(io.StringIO(run_cli("-m", "minigpt", "costs", trained_run,
                                                        "--by", by, "--format", "csv").stdout)))
    assert sum(float(r["joules_roofline"]) for r in rows_csv) == pytest.approx(
        doc["layers"]["roofline"]["joules"])
    table = run_cli("-m", "minigpt", "costs", trained_run, "--by", by).stdout
    assert "joules" in table and "J roofline" in table and "x PUE" in table


def test_a_resumed_run_reports_this_session_energy(run_copy):
    before = tables.load(run_copy)
    r = run_cli("train.py", TINY_TOML, "--no-progress", "--resume",
                *set_args(merge(TINY, {"train": {"out_dir": str(run_copy), "max_steps": 9}})))
    assert r.returncode == 0, r.stderr
    doc, after = _doc(run_copy), tables.load(run_copy)
    step_tokens = TINY["train"]["batch_size"] * TINY["model"]["block_size"]
    assert doc["tokens"] == 3 * step_tokens  # steps 7 to 9, not the whole run
    session = sum(r["seconds"] for r in after["records"]) - sum(
        r["seconds"] for r in before["records"])
    assert doc["metered"]["seconds"] == pytest.approx(session)


def test_a_run_without_energy_json_says_so(run_copy):
    (run_copy / "energy.json").unlink()
    r = run_cli("-m", "minigpt", "costs", run_copy, "--by", "layer")
    assert r.returncode == 0 and "no joules: this run has no energy.json" in r.stdout
    (run_copy / "energy.json").write_text("{not json")
    r = run_cli("-m", "minigpt", "costs", run_copy)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "energy.json" in r.stderr


def test_generate_costs_splits_energy_into_prefill_and_decode(trained_run, tmp_path):
    out = tmp_path / "gen.json"
    r = run_cli("generate.py", trained_run, "--prompt", "The fox", "--max-new-tokens", "8",
                "--seed", "1", "--costs", "--energy-json", out)
    assert r.returncode == 0, r.stderr
    assert "energy by phase" in r.stdout and "J/token" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["phases"]["prefill"]["tokens"] == 7 and doc["phases"]["decode"]["tokens"] == 7
    for p in doc["phases"].values():
        assert p["j_per_token"] == pytest.approx(p["joules"] / p["tokens"])
    assert sum(p["joules"] for p in doc["phases"].values()) == pytest.approx(
        doc["metered"]["joules"])
    bad = run_cli("generate.py", trained_run, "--max-new-tokens", "2", "--energy-json", out)
    assert bad.returncode == 2 and "--energy-json needs --costs" in bad.stderr
    bad = run_cli("generate.py", trained_run, "--costs", "--energy-json", tmp_path / "no" / "x.json")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no folder" in bad.stderr


def test_generate_costs_count_the_cache_rebuilds(trained_run, tmp_path):
    """Past the context (TINY's block of 16) the cache is rebuilt by a prefill of the last 8 tokens,
    which gives the next token: a generation's tokens are its prefills plus its decode steps, and
    the prefill's tokens include what the rebuilds read again."""
    out = tmp_path / "gen.json"
    r = run_cli("generate.py", trained_run, "--prompt", "The fox", "--max-new-tokens", "30",
                "--seed", "1", "--costs", "--energy-json", out)
    assert r.returncode == 0, r.stderr
    prefills = int(next(line.split()[1] for line in r.stdout.splitlines()
                        if line.startswith("prefill ") and "tokens" not in line))
    assert prefills > 1  # the cache filled at least once
    phases = json.loads(out.read_text())["phases"]
    assert phases["decode"]["tokens"] + prefills == 30
    assert phases["prefill"]["tokens"] == 7 + (prefills - 1) * 8


def test_a_short_measurement_still_sees_its_cpu_time(monkeypatch):
    """The busy share of a few milliseconds of work is not rounded away: this process's CPU time
    comes from the nanosecond clock, not from os.times, whose 10 ms ticks show none of 3 ms; its
    finished children's from os.times. The clocks are stand-ins, so no figure depends on how busy
    the machine is: 2.9 ms of CPU in 3 ms of wall time; then in one second 0.5 s of its own and a
    finished child's 0.3 s."""
    wall = iter([100.0, 100.003, 101.003])  # s
    process = iter([5.0, 5.0029, 5.5029])  # s
    # user and system ticks frozen (10 ms resolution); children_user, children_system
    ticks = iter([(5.0, 0.0, 1.0, 0.5, 0.0), (5.0, 0.0, 1.0, 0.5, 0.0), (5.0, 0.0, 1.2, 0.6, 0.0)])
    monkeypatch.setattr(cpu_power, "time", SimpleNamespace(perf_counter=lambda: next(wall),
                                                           process_time=lambda: next(process)))
    monkeypatch.setattr(cpu_power, "os",
                        SimpleNamespace(times=lambda: os.times_result(next(ticks))))
    (wall0, cpu0), (wall1, cpu1), (wall2, cpu2) = (cpu_power.usage_now() for _ in range(3))
    assert (cpu1 - cpu0) / (wall1 - wall0) == pytest.approx(0.0029 / 0.003)
    assert (cpu2 - cpu1) / (wall2 - wall1) == pytest.approx(0.5 + 0.2 + 0.1)
    est = cpu_power.estimate(cpu1 - cpu0, wall1 - wall0, "", cores=2)
    assert est.basis.endswith("0.97 of 2 logical cores busy")
    per_core = cpu_power.load_table()[1]["watts_per_logical_core"]  # W per busy core
    assert est.watts == pytest.approx(per_core * 0.0029 / 0.003)


def test_report_html_is_self_contained(trained_run, run_copy):
    text = (trained_run / "report.html").read_text()
    for part in ("<svg", "loss against tokens seen", "FLOPs", "bytes moved", "metered seconds",
                 "joules (seconds x power x PUE)", "against the roofline", "time x power",
                 "physics floor", "at GPT-3 scale", "PUE"):
        assert part in text, part
    assert "<script" not in text and "src=" not in text and "<link" not in text
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in text
    (run_copy / "energy.json").unlink()
    (run_copy / "report.html").unlink()
    r = run_cli("-m", "minigpt", "report", run_copy)
    assert r.returncode == 0 and (run_copy / "report.html").is_file()
    assert "no energy.json" in (run_copy / "report.html").read_text()
    bad = run_cli("-m", "minigpt", "report", run_copy / "nothing")
    assert bad.returncode == 2 and "no costs.json" in bad.stderr


def test_report_html_renders_in_headless_chromium(trained_run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium)")
    shot = tmp_path / "report.png"
    page = tmp_path / "report.html"
    page.write_text(html.render(trained_run))
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                        "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'p'}",
                        f"--screenshot={shot}", "--window-size=1100,2400", page.as_uri()],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a drawn page, not blank


def test_svg_ticks_and_labels():
    from minigpt.report import svg

    assert svg.nice_ticks(3.5, 5.4) == [3.5, 4.0, 4.5, 5.0, 5.5]
    one = svg.nice_ticks(1024, 1024)  # a single evaluation: a range around it, not a point
    assert one[0] < 1024 < one[-1] and len(set(one)) == len(one)
    assert svg.log_ticks(0.3, 250) == [0.1, 1.0, 10.0, 100.0, 1000.0]
    assert [svg.si(x) for x in (0, 2.5e9, 4.2e-3, 999)] == ["0", "2.5G", "4.2m", "999"]
    chart = svg.bar_chart(["a<b", "c"], [1.0, None], "t & u")
    assert "a&lt;b" in chart and "t &amp; u" in chart and "n/a" in chart


def test_a_loss_curve_skips_non_finite_points():
    from minigpt.report import svg

    chart = svg.line_chart([svg.Series("train", [0, 1, 2, 3], [4.0, float("nan"), float("inf"),
                                                              3.0])], "loss")
    assert "nan" not in chart and "inf" not in chart and chart.count("<circle") == 2
    empty = svg.line_chart([svg.Series("train", [0], [float("nan")])], "loss")
    assert "no points" in empty


def test_a_measured_run_stores_measured_power(monkeypatch):
    from minigpt.hardware.counters import Measurement

    rows = [{"scope": "h0", "op": "x@w", "kind": "matmul", "phase": "forward", "dtype": "float32",
             "calls": 1, "flops": 2e9, "useful_flops": 2e9, "bytes_read": 1e6, "bytes_written": 0,
             "seconds": 0.5}]
    m = Measurement(joules={"rapl": 40.0, "nvml": None}, reasons={"nvml": "no GPU"}, seconds=2.0,
                    cpu_seconds=1.0)
    doc = run_energy.build(rows, 2.0, "h100-sxm", m, watts=None, tokens=100)
    assert doc["watts"] == pytest.approx(20.0) and doc["watts_basis"] == "measured: rapl"
    assert doc["layers"]["measured"]["joules"] == pytest.approx(40.0 * doc["pue"])
    assert doc["layers"]["time_x_power"]["joules"] == pytest.approx(40.0 * doc["pue"])
    assert doc["metered"]["joules"] == pytest.approx(0.5 * 20.0 * doc["pue"])


def test_report_needs_no_plotting_package(trained_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    text = html.render(trained_run)
    assert text.count("<svg") >= 6 and "</html>" in text
