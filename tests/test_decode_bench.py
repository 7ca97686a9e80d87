"""bench/decode.py's bookkeeping (not its speed): bytes per token is the closed form's decode
bytes at the positions decoded, the ceiling is bandwidth over it; and minigpt.hardware.blas.threads."""

import argparse
import importlib.util

import pytest
from conftest import ROOT

from minigpt.counting import closed_form as cost_model
from minigpt.hardware import blas, calibrate


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bytes_per_token_is_the_closed_forms_and_the_ceiling_follows(trained_run, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(calibrate, "copy_bandwidth", lambda *a: 8e9)  # no 256 MiB copies in a test
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a: 6e9)
    monkeypatch.setattr(bench, "copy_bandwidth_threads", lambda *a: 7e9)
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
    assert r["ceiling_tokens_per_s"] == pytest.approx(8e9 / r["bytes_per_token"])
    assert r["fraction_of_ceiling"] == pytest.approx(r["tokens_per_s"] / r["ceiling_tokens_per_s"])
    assert r["plain_matvec_two_threads_tokens_per_s"] > 0
    assert r["params"] == sum(v.size for v in minigpt.load(trained_run).params.values())
    prefill = cost_model.predict_forward(cfg, 1, args.prompt, "prefill")
    assert r["prefill_flops_per_token"] == pytest.approx(sum(x.flops for x in prefill.values()) / args.prompt)


def test_w8a32_reports_what_the_widening_moves(trained_run, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(calibrate, "copy_bandwidth", lambda *a: 8e9)
    monkeypatch.setattr(calibrate, "matmul_flops", lambda *a: 1e11)
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a: 6e9)
    monkeypatch.setattr(bench, "copy_bandwidth_threads", lambda *a: 9e9)
    args = argparse.Namespace(run=trained_run, tokens=3, prompt=4, int8="w8a32", kv_int8=False, blas_threads=[1, 2],
                              repeats=1)
    r = bench.measure(args)
    assert r["bandwidth"] == 9e9 and len(r["by_blas_threads"]) == 2
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
