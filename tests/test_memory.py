"""The memory estimate (costs/memory.py) against the measured peak resident set, the pre-flight
refusal, `minigpt costs --memory`, and MemoryError as one line.

The measurement: a fresh interpreter builds the model, gradients and AdamW (its moments written
once, as a first step would), runs a training step, and reports resource.getrusage's ru_maxrss;
the same script at a tiny shape gives the baseline (interpreter, numpy, BLAS start-up), subtracted.
"""

import resource
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, TINY, TINY_TOML, merge, run_cli, set_args

from minigpt import cli, config
from minigpt.costs import memory
from minigpt.errors import ResourceError

_PEAK = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from minigpt import backend, config
    from minigpt.nn.model import GPT
    from minigpt.nn.params import FlatBuffer, init
    from minigpt.train.optim import AdamW
    from minigpt.train.trainer import training_step
    L, C, H, T, B, V = map(int, sys.argv[1:7])
    drop = float(sys.argv[7])
    m = config.Config().model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.dropout = L, C, H, T, V, drop
    backend.keep_freed_memory()  # as the trainer does
    rng = np.random.default_rng(0)
    model = GPT(m, init(m, rng))
    model.grads = FlatBuffer(m)
    opt = AdamW(model.params)
    drop_rng = np.random.default_rng(1) if drop > 0 else None
    opt.m.fill(1e-3)  # resident, as after a first step (zeros_like leaves pages untouched)
    opt.v.fill(1e-6)
    x, y = rng.integers(0, V, size=(2, B, T))
    training_step(model, opt, [(x, y)], 1e-3, 1.0, drop_rng)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")

# (n_layer, n_embd, n_head, block_size, batch, vocab, dropout): each needs 75-130 MiB, well
# above the baseline's noise, in under a second of CPU: narrow models with many tokens.
SHAPES = [(1, 64, 2, 64, 128, 256, 0.0), (3, 48, 2, 256, 16, 256, 0.0),
          (2, 32, 2, 128, 64, 256, 0.1), (1, 32, 2, 64, 256, 512, 0.0)]


def peak_rss_bytes(shape) -> int:
    r = subprocess.run([sys.executable, "-c", _PEAK, *map(str, shape)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=True)
    kib = int(r.stdout.split()[-1])
    return kib * 1024 if sys.platform.startswith("linux") else kib  # macOS reports bytes


def estimate(shape) -> int:
    L, C, H, T, B, V, drop = shape
    cfg = config.Config()
    m = cfg.model
    m.n_layer, m.n_embd, m.n_head, m.block_size, m.vocab_size, m.dropout = L, C, H, T, V, drop
    cfg.train.batch_size = B
    # the probe holds no eval batches: leave out the trainer's token batches
    return sum(i.nbytes for i in memory.training_estimate(cfg) if i.name != "token batches")


@pytest.mark.skipif(not hasattr(resource, "getrusage"), reason="needs resource.getrusage")
def test_the_estimate_is_within_20_percent_of_the_measured_peak():
    baseline = peak_rss_bytes((1, 8, 2, 8, 1, 256, 0.0))
    for shape in SHAPES:
        measured = peak_rss_bytes(shape) - baseline
        predicted = estimate(shape)
        assert abs(measured - predicted) <= 0.2 * predicted, (shape, measured / predicted)


def test_the_estimate_adds_its_parts():
    cfg = config.load(TINY_TOML)
    items = memory.training_estimate(cfg)
    names = [i.name for i in items]
    assert names[:5] == ["parameters", "gradients", "optimizer state", "activations kept for backward",
                         "largest temporary"]
    p = items[0].nbytes
    assert items[1].nbytes == p and items[2].nbytes == 2 * p
    bigger = config.load(TINY_TOML, ["train.batch_size=128"])
    acts = {i.name: i.nbytes for i in memory.training_estimate(bigger)}
    assert acts["activations kept for backward"] == 2 * items[3].nbytes  # linear in the batch
    assert memory.total(items) == sum(i.nbytes for i in items)


def test_a_run_that_cannot_fit_is_refused_in_one_line_before_allocating(tmp_path):
    """A GPT-3-sized model: the estimate is far above any test machine's memory; the refusal
    comes before a single parameter is allocated (the run would otherwise die of MemoryError)."""
    out = tmp_path / "run"
    big = {"model": {"n_layer": 96, "n_embd": 12288, "n_head": 96, "block_size": 2048}}
    r = run_cli("train.py", TINY_TOML, "--no-progress",
                *set_args(merge(merge(TINY, big), {"train": {"out_dir": str(out)}})))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tiny: this run needs about")
    assert "GiB" in lines[0] and "available (/proc/meminfo MemAvailable)" in lines[0]
    assert "parameters" in lines[0] and "activations kept for backward" in lines[0]
    assert not out.exists()


def test_preflight_compares_with_the_given_available_memory():
    cfg = config.load(TINY_TOML)
    need = memory.preflight(cfg, available=1 << 40)
    assert need == memory.total(memory.training_estimate(cfg))
    with pytest.raises(ResourceError, match=r"needs about .* but .* is available \(given\)"):
        memory.preflight(cfg, available=need - 1)


def test_available_memory_is_known_here():
    avail, where = memory.available_bytes()
    assert avail is not None and avail > 0 and where


def test_costs_memory_prints_the_table():
    r = run_cli("-m", "minigpt", "costs", "--config", TINY_TOML, "--memory")
    assert r.returncode == 0, r.stderr
    for word in ("parameters", "gradients", "optimizer state", "activations kept for backward",
                 "largest temporary", "total", "available on this machine"):
        assert word in r.stdout
    r = run_cli("-m", "minigpt", "costs", "--config", TINY_TOML, "--memory", "--format", "json",
                "--batch", "8")
    assert r.returncode == 0 and '"total"' in r.stdout and "batch 8 x 64" in r.stdout


def test_memory_error_is_one_line(capsys):
    def greedy(argv):
        raise MemoryError

    assert cli.run(greedy, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory") and len(err.splitlines()) == 1
