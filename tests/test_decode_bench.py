"""bench/decode.py's bookkeeping (not its speed): bytes per token is the closed form's decode
bytes at the positions decoded, the ceiling is bandwidth over it; and minigpt.hardware.blas.threads."""

import argparse
import importlib.util

import pytest
from conftest import ROOT

from minigpt.counting import closed_form as cost_model
from minigpt.hardware import bandwidth, blas, calibrate, roofline

# fixed STREAM figures, bytes/s (kind: one thread, all cores): no 256 MiB passes in a test
FIGURES = {"read": (6e9, 8e9), "write": (3e9, 4e9), "copy": (5e9, 7e9), "triad": (5.5e9, 7.5e9)}


def _fake_stream(*a, **k):
    return tuple(bandwidth.StreamFigure(kind, threads, bps, 256, 5, "test", None)
                 for kind, pair in FIGURES.items() for threads, bps in zip((1, 2), pair))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bytes_per_token_is_the_closed_forms_and_the_ceiling_follows(trained_run, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    args = argparse.Namespace(run=trained_run, tokens=5, prompt=4, int8=None, kv_int8=False, blas_threads=[1],
                              repeats=2, bits=32, batch=[1])
    r = bench.measure(args)
    assert len(r["decode_runs_tokens_per_s"]) == 2  # the headline is the best run's
    assert r["tokens_per_s"] == pytest.approx(max(r["decode_runs_tokens_per_s"]))
    import minigpt

    cfg = minigpt.load(trained_run).config.model
    predicted = 0
    for pos in range(args.prompt, args.prompt + args.tokens):
        recs = cost_model.predict_decode(cfg, 1, pos)
        predicted += sum(x.bytes_read + x.bytes_written for x in recs.values())
    assert r["bytes_per_token"] == pytest.approx(predicted / args.tokens, rel=1e-12)
    # a decode step's bytes are mostly reads (under 1/6 written, halfway to a triad's 1/3): held
    # against the read bandwidth, all cores' 8e9
    read, written = r["decode_bytes_read_per_token"], r["decode_bytes_written_per_token"]
    assert read + written == pytest.approx(r["bytes_per_token"]) and written / (read + written) < 1 / 6
    assert r["ceiling"] == "read bandwidth" and "all cores" in r["ceiling_how"]
    assert r["ceiling_tokens_per_s"] == pytest.approx(8e9 / r["bytes_per_token"])
    assert r["fraction_of_ceiling"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"])
    assert r["fraction_of_copy_ceiling"] == pytest.approx(r["fraction_of_ceiling"] * 8e9 / 7e9)
    assert r["fraction_of_read_ceiling"] == pytest.approx(r["fraction_of_ceiling"])
    assert r["plain_matvec_two_threads_tokens_per_s"] > 0
    assert r["params"] == sum(v.size for v in minigpt.load(trained_run).params.values())
    prefill = cost_model.predict_forward(cfg, 1, args.prompt, "prefill")
    assert r["prefill_flops_per_token"] == pytest.approx(sum(x.flops for x in prefill.values()) / args.prompt)


def test_w8a32_reports_what_the_widening_moves(trained_run, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    args = argparse.Namespace(run=trained_run, tokens=3, prompt=4, int8="w8a32", kv_int8=False, blas_threads=[1, 2],
                              repeats=1)
    r = bench.measure(args)
    # int8 weights move a quarter of the bytes; the mix may then fit another kind: the ceiling is
    # the kind the decode's own read/write mix picks, at its better (all cores) figure
    kind = roofline.stream_kind(r["decode_bytes_read_per_token"], r["decode_bytes_written_per_token"])
    assert r["ceiling"] == f"{kind} bandwidth" and r["bandwidth"] == FIGURES[kind][1]
    assert len(r["by_blas_threads"]) == 2
    split = r["int8_split"]
    assert r["bytes_per_token_here"] == r["bytes_per_token"] + 8 * split["int8_bytes"]
    assert split["widen_s"] > 0 and split["float_products_s"] > 0


@pytest.mark.parametrize("bits", [32, 4])
def test_the_compute_ceiling_is_the_peak_of_the_kernel_the_products_run_on(trained_run, monkeypatch, bits):
    """On the compiled kernels, a decode step's products run on the tiled or packed kernel, not on
    OpenBLAS: their peak (kernel_peak) is the decode's compute ceiling; a float32 prefill's block
    products stay on OpenBLAS and keep its peak. On NumPy's path both are OpenBLAS's."""
    from minigpt import kernels

    if not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    bench = _bench()
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    monkeypatch.setattr(bench, "kernel_peak", lambda b, rows=64, n=None: 3e11 + b)
    args = argparse.Namespace(run=trained_run, tokens=2, prompt=4, int8=None, kv_int8=False, blas_threads=[1],
                              repeats=1, bits=bits, group_size=16, storage16="fp16", batch=[1], kernels="numba")
    r = bench.measure(args)
    assert r["matmul_peak_flops"] == 3e11 + bits and r["compute_peak"] == f"{bits}-bit kernel peak"
    assert r["prefill_peak_flops"] == (1e11 if bits == 32 else 3e11 + bits)
    assert r["prefill_ceiling_tokens_per_s"] == pytest.approx(r["prefill_peak_flops"] / r["prefill_flops_per_token"])
    assert r["compute_ceiling_tokens_per_s"] == pytest.approx((3e11 + bits) / r["flops_per_step"])
    r = bench.measure(argparse.Namespace(**{**vars(args), "kernels": "numpy"}))
    assert r["matmul_peak_flops"] == r["prefill_peak_flops"] == 1e11 and r["compute_peak"] == "float32 matmul peak"


def test_each_batchs_compute_ceiling_is_the_kernels_peak_at_its_rows(trained_run, monkeypatch):
    """A kernel that computes faster the more rows it has (it reuses each weight for more of them):
    each batch's compute ceiling is its own rows' peak, and the predicted knee weighs each
    batch at its own; OpenBLAS's one figure serves every batch on NumPy's path."""
    from minigpt import kernels

    if not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    bench = _bench()
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    monkeypatch.setattr(bench, "kernel_peak", lambda b, rows=64, n=None: 1e9 * rows)
    args = argparse.Namespace(run=trained_run, tokens=2, prompt=4, int8=None, kv_int8=False, blas_threads=[1],
                              repeats=1, bits=4, group_size=16, storage16="fp16", batch=[1, 3, 8], kernels="numba")
    r = bench.measure(args)
    assert r["kernel_peaks"] == [[rows, 1e9 * rows] for rows in bench.PEAK_ROWS]
    for p in r["batches"]:  # 3: between 2 and 4, log-log; 1: held at 2 rows' (not measured)
        assert p["peak_flops"] == pytest.approx(1e9 * max(p["batch"], 2))
        assert p["compute_ceiling_tokens_per_s"] == pytest.approx(p["batch"] * p["peak_flops"] / p["flops_per_step"])
    assert r["matmul_peak_flops"] == pytest.approx(2e9)  # the headline batch's
    assert r["prefill_peak_flops"] == pytest.approx(64e9)


def test_the_peak_between_and_beyond_its_rows():
    bench = _bench()
    table = [[1, 1e9], [4, 4e9], [64, 16e9]]
    assert bench.peak_at(table, 2) == pytest.approx(2e9)  # log-log: halfway in log rows
    assert bench.peak_at(table, 16) == pytest.approx(8e9)
    assert bench.peak_at(table, 0.5) == pytest.approx(bench.peak_at(table, 1)) and bench.peak_at(table, 1) == 1e9
    assert bench.peak_at(table, 512) == pytest.approx(16e9)
    assert bench.peak_at(3e11, 7) == 3e11


def test_the_kernel_peak_measures_each_width():
    from minigpt import kernels

    if not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    bench = _bench()
    kernels.use("numba")
    for bits in (32, 16, 8, 4):
        assert bench.kernel_peak(bits, rows=2, n=256) > 1e8  # FLOP/s, however slow the machine


def test_blas_threads_sets_and_restores():
    before = blas.current()
    if before is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS here")
    with blas.threads(1) as applied:
        assert applied and blas.current() == 1
    assert blas.current() == before


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_a_batch_sweep_reports_each_batch_against_both_ceilings(trained_run, monkeypatch, bits):
    bench = _bench()
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    args = argparse.Namespace(run=trained_run, tokens=3, prompt=4, int8=None, kv_int8=False, blas_threads=[1],
                              repeats=1, bits=bits, group_size=16, storage16="fp16", batch=[1, 2, 5],
                              kernels="numpy")
    r = bench.measure(args)
    import minigpt
    from minigpt.energy import forecast
    from minigpt.train import timing_runs

    model = bench.load_model(args)
    cfg = model.config.model
    qcfg = model.gpt.quant.qcfg if model.gpt.quant is not None else None
    time_model = timing_runs.time_model()
    assert (r["bits"], r["batch"], r["kernels"]) == (bits, 1, "numpy")
    # the prefill forecast is one sequence's, as each sequence is prefilled on its own
    one = forecast.generation(cfg, time_model, args.prompt, args.tokens, batch=1, quant=qcfg)
    assert r["predicted_prefill_tokens_per_s"] == pytest.approx(args.prompt / one.prefill_s)
    assert ("float32 product rates" in r["predicted_how"]
            and (bits == 32) == ("no rate" not in r["predicted_how"]))
    assert r["params"] == sum(v.size for v in minigpt.load(trained_run).params.values())
    for p in r["batches"]:
        B = p["batch"]
        predicted = [cost_model.predict_decode_batch(cfg, [pos] * B, quant=qcfg)
                     for pos in range(args.prompt, args.prompt + args.tokens)]
        nbytes = sum(x.bytes_read + x.bytes_written for recs in predicted for x in recs.values())
        flops = sum(x.flops for recs in predicted for x in recs.values())
        assert p["bytes_per_step"] == pytest.approx(nbytes / args.tokens, rel=1e-12)
        assert p["bytes_per_token"] == pytest.approx(p["bytes_per_step"] / B)
        assert p["flops_per_step"] == pytest.approx(flops / args.tokens, rel=1e-12)
        # the bandwidth is the STREAM kind of this batch's own read/write mix, at its all-cores figure
        read = sum(x.bytes_read for recs in predicted for x in recs.values())
        kind = roofline.stream_kind(read, nbytes - read)
        assert p["decode_bytes_read_per_token"] == pytest.approx(read / (args.tokens * B), rel=1e-12)
        assert p["bandwidth_ceiling"] == f"{kind} bandwidth" and p["bandwidth"] == FIGURES[kind][1]
        assert p["bandwidth_ceiling_tokens_per_s"] == pytest.approx(B * FIGURES[kind][1] / p["bytes_per_step"])
        assert p["compute_ceiling_tokens_per_s"] == pytest.approx(B * 1e11 / p["flops_per_step"])
        binding = min(p["bandwidth_ceiling_tokens_per_s"], p["compute_ceiling_tokens_per_s"])
        assert p["ceiling_tokens_per_s"] == binding
        assert p["bound"] == ("bandwidth" if binding == p["bandwidth_ceiling_tokens_per_s"] else "compute")
        assert p["fraction_of_ceiling"] == pytest.approx(p["tokens_per_s"] / binding)
        assert p["ceiling"] == (p["bandwidth_ceiling"] if p["bound"] == "bandwidth" else "float32 matmul peak")
        assert ("all cores" in p["ceiling_how"]) == (p["bound"] == "bandwidth")
        g = forecast.generation(cfg, time_model, args.prompt, args.tokens, batch=B, quant=qcfg)
        assert p["predicted_tokens_per_s"] == pytest.approx(B * args.tokens / g.decode_s) and g.steps == args.tokens
    assert r["batches"][0]["tokens_per_s"] == r["tokens_per_s"]
    assert r["predicted_tokens_per_s"] == r["batches"][0]["predicted_tokens_per_s"]
    assert r["ceiling"] == r["batches"][0]["ceiling"] and r["bandwidth"] == r["batches"][0]["bandwidth"]
    assert r["fraction_of_read_ceiling"] == pytest.approx(r["tokens_per_s"] * r["bytes_per_token"] / 8e9)
    # the predicted knee: B sequences' own work (FLOPs at the peak, their own bytes at the
    # bandwidth) as long as the weights' read there, shorter one batch before
    k = r["knee_batch_predicted"]

    def counts(B):
        recs = cost_model.predict_decode_batch(cfg, [args.prompt + args.tokens // 2] * B, quant=qcfg)
        return (sum(x.flops for x in recs.values()), sum(x.bytes_read for x in recs.values()),
                sum(x.bytes_written for x in recs.values()))

    def compute_bound(B):
        (f1, r1, w1), (f3, r3, w3) = counts(1), counts(3)
        flops_each, bytes_each = (f3 - f1) / 2, (r3 + w3 - r1 - w1) / 2
        bw = FIGURES[roofline.stream_kind(r1, w1)][1]
        return B * (flops_each / 1e11 + bytes_each / bw) >= (r1 + w1 - bytes_each) / bw

    if k is None:
        assert not compute_bound(bench.KNEE_SEARCH_LIMIT)
    else:
        assert compute_bound(k) and (k == 1 or not compute_bound(k - 1))
    assert r["knee_batch_measured"] is None or r["knee_batch_measured"] >= 1


def test_the_measured_knee_is_where_the_two_lines_meet():
    bench = _bench()
    cfg = minigpt_config()
    points = [{"batch": b, "step_s": t, "_cfg": cfg, "_position": 4, "_quant": None}
              for b, t in ((1, 0.010), (8, 0.011), (64, 0.040))]
    # flat at 10 ms (batch 8 a little above it, still bandwidth-bound); 40 ms at 64 is 0.625 ms
    # a sequence: that line reaches 10 ms at batch 16. A line through batches 8 and 64 would meet
    # it below 8.
    assert bench.knee(points, 1e11, 8e9)["knee_batch_measured"] == pytest.approx(16)
    assert bench.knee(points[::2], 1e11, 8e9)["knee_batch_measured"] == pytest.approx(16)  # two batches do
    assert bench.knee(points[:1], 1e11, 8e9)["knee_batch_measured"] is None
    # still bandwidth-bound at the largest batch (11 ms at 8 against 10 at 1): the crossing, 7.3,
    # is not below half of it, so nothing is measured
    assert bench.knee(points[:2], 1e11, 8e9)["knee_batch_measured"] is None
    twice = [points[0], dict(points[2], step_s=0.020)]  # 32 exactly half of 64: still located
    assert bench.knee(twice, 1e11, 8e9)["knee_batch_measured"] == pytest.approx(32)
    steep = [dict(p, step_s=0.010 * p["batch"]) for p in points]  # time grows from batch 1 on
    assert bench.knee(steep, 1e11, 8e9)["knee_batch_measured"] == 1.0
    # this model's weights (4.6 KB a step) are not twice a sequence's own bytes (2.8 KB: its
    # activations and cache): two sequences' own work outlasts the weights' read
    assert bench.knee(points, 1e11, 8e9)["knee_batch_predicted"] == 2
    # at 1e5 FLOP/s compute binds from batch 1
    assert bench.knee(points, 1e5, 8e9)["knee_batch_predicted"] == 1
    # GPT-2 124M's shape: 2 FLOPs a weight a sequence against ~4 bytes a weight a step: at 1e11
    # FLOP/s and 2e10 B/s the weights' 0.5 GB take 25 ms, a sequence's 0.25 GFLOP 2.5 ms and its
    # 4.7 MB KV cache 0.24: about 10
    from minigpt import config

    gpt2 = config.load(str(ROOT / "configs" / "gpt2-124m.toml"), []).model
    big = [dict(p, _cfg=gpt2, _position=64) for p in points]
    k = bench.knee(big, 1e11, 2e10)["knee_batch_predicted"]
    assert 8 <= k <= 14
    # a kernel at a quarter of that rate below 8 rows, the full rate from 8 on: compute-bound
    # from about a quarter of the batch (each batch judged at its own rows' peak)
    slow = [[1, 2.5e10], [4, 2.5e10], [8, 1e11], [64, 1e11]]
    k_slow = bench.knee(big, slow, 2e10)["knee_batch_predicted"]
    assert 2 <= k_slow <= 4
    # the caches count as the sequences' own work: at a bandwidth that makes each cache's read
    # as long as its arithmetic, the knee comes at about half the batch
    k_caches = bench.knee([dict(p, _position=1000) for p in big], 1e11, 2e10)["knee_batch_predicted"]
    assert k_caches < 0.75 * k


def minigpt_config():
    from minigpt import config

    return config.ModelConfig(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=32)


def test_the_grid_reports_every_bits_and_batch_point(trained_run, monkeypatch, capsys):
    bench = _bench()
    spec = importlib.util.spec_from_file_location("bench_decode_grid", ROOT / "bench" / "decode_grid.py")
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    monkeypatch.setattr(grid, "_decode_bench", lambda: bench)
    monkeypatch.setattr(bandwidth, "measure_stream", _fake_stream)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    args = argparse.Namespace(run=trained_run, bits=[32, 8], batch=[1, 3], tokens=2, prompt=3, repeats=1,
                              blas_threads=[1], group_size=16, storage16="fp16", kernels="numpy", watts=10.0)
    g = grid.grid(args)
    assert [(r["bits"], r["batch"]) for r in g["rows"]] == [(32, 1), (32, 3), (8, 1), (8, 3)]
    by = {(r["bits"], r["batch"]): r for r in g["rows"]}
    for (bits, batch), r in by.items():
        assert r["speedup_over_fp32"] == pytest.approx(r["tokens_per_s"] / by[32, batch]["tokens_per_s"])
        assert r["j_per_token"] == pytest.approx(10.0 / r["tokens_per_s"])  # W x step s / batch
        # the grid's ceiling is bench/decode.py's: bandwidth-bound on the read figure, "of ceiling"
        # is the share of the all-cores read bandwidth the decode moved
        if r["ceiling"] == "read bandwidth":
            assert r["fraction_of_ceiling"] == pytest.approx(r["tokens_per_s"] * r["bytes_per_token"] / 8e9)
            assert r["fraction_of_ceiling"] == pytest.approx(r["fraction_of_read_ceiling"])
        assert r["predicted_tokens_per_s"] > 0
    assert by[32, 1]["ceiling"] == "read bandwidth"
    assert by[8, 1]["bytes_per_token"] < by[32, 1]["bytes_per_token"] / 2
    grid.print_table(g)
    assert "J/token at 10.0 W" in capsys.readouterr().out
    # no --watts and no profile's figure: each point's own CPU-time estimate (cpu_power)
    monkeypatch.setattr(grid, "power_watts", lambda watts: None)
    g = grid.grid(argparse.Namespace(**{**vars(args), "bits": [32], "batch": [1], "watts": None}))
    (r,) = g["rows"]
    assert r["power_basis"].startswith("estimated") and r["watts"] > 0
    assert r["j_per_token"] == pytest.approx(r["watts"] / r["tokens_per_s"])
    grid.print_table(g)
    assert "J/token at each row's W: estimated" in capsys.readouterr().out


def test_the_step_floor_bench_compares_the_two_steps(trained_run):
    """bench/step_floor.py times the Python step and the compiled one (it stops with a message
    where their logits differ), and the compiled call inside the model's step."""
    from minigpt import kernels

    if not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    spec = importlib.util.spec_from_file_location("bench_step_floor", ROOT / "bench" / "step_floor.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    args = argparse.Namespace(run=trained_run, bits=[32, 4], group_size=16, prompt=3, tokens=2, rounds=1, threads=2)
    rows = floor.measure(args)
    assert [r["bits"] for r in rows] == [32, 4]
    for r in rows:
        assert 0 < r["call_s"] < r["model_step_s"]
        assert r["outside_s"] == pytest.approx(r["model_step_s"] - r["call_s"])
        assert r["model_vs_fp32"] > 0 and r["python_vs_fp32"] > 0

def test_a_prompt_past_the_context_is_one_line_and_exit_2(trained_run, capsys):
    """--prompt + --tokens beyond the run's context: one line naming both and the run, exit 2."""
    bench = _bench()
    args = argparse.Namespace(run=trained_run, tokens=8, prompt=10_000, int8=None, kv_int8=False,
                              blas_threads=[1], repeats=1, bits=32, batch=[1], kernels="numpy")
    with pytest.raises(SystemExit) as stop:
        bench.measure(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prompt 10000" in err and str(trained_run) in err
