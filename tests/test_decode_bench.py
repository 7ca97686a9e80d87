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
                              repeats=2)
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


def test_blas_threads_sets_and_restores():
    before = blas.current()
    if before is None:
        pytest.skip("NumPy's BLAS is not OpenBLAS here")
    with blas.threads(1) as applied:
        assert applied and blas.current() == 1
    assert blas.current() == before
