"""The memory estimate (counting/memory.py) against the measured peak resident set, the pre-flight
refusal, `minigpt costs --memory`, and MemoryError as one line.

The measurement (memory.measured_peak): a fresh interpreter builds the model, gradients and AdamW
(its moments written once, as a first step would), runs a training step, and reports its peak
resident set (Linux: VmHWM, since getrusage's ru_maxrss inherits the parent's peak across fork and
exec, which made a child of this test runner report the runner's size; elsewhere ru_maxrss); the
same at a tiny shape gives the baseline (interpreter, numpy, BLAS start-up), subtracted.
bench/memory.py prints the same comparison as a table.
"""

import pytest
from conftest import TINY, TINY_TOML, merge, run_cli, set_args

from minigpt import cli, config
from minigpt.counting import memory
from minigpt.errors import ResourceError

try:
    import resource
except ImportError:  # Windows
    resource = None

# (n_layer, n_embd, n_head, block_size, batch, vocab, dropout[, n_experts, experts_per_token]):
# each needs 75-130 MiB, well above the baseline's noise, in under a second of CPU: narrow models
# with many tokens; the last, mixtures of experts (top-2 of 4 in every block, dropless).
SHAPES = [(1, 64, 2, 64, 128, 256, 0.0), (3, 48, 2, 256, 16, 256, 0.0),
          (2, 32, 2, 128, 64, 256, 0.1), (1, 32, 2, 64, 256, 512, 0.0),
          (2, 64, 2, 64, 128, 256, 0.0, 4, 2)]


@pytest.mark.skipif(resource is None, reason="needs resource.getrusage (POSIX)")
def test_the_estimate_is_within_20_percent_of_the_measured_peak():
    baseline = memory.measured_peak(*memory.BASELINE_SHAPE)
    for shape in SHAPES:
        measured = memory.measured_peak(*shape) - baseline
        predicted = memory.step_estimate(*shape)
        assert abs(measured - predicted) <= 0.2 * predicted, (shape, measured / predicted)


def test_the_estimate_adds_its_parts():
    cfg = config.load(TINY_TOML)
    items = memory.training_estimate(cfg)
    names = [i.name for i in items]
    assert names[:5] == ["parameters", "gradients", "optimizer state", "activations kept for backward",
                         "largest temporary"]
    p = items[0].nbytes
    assert items[1].nbytes == p and items[2].nbytes == 2 * p
    assert names[5] == "lm_head product buffer"  # the tied table's gradient product, kept
    assert items[5].nbytes == cfg.model.vocab_size * cfg.model.n_embd * 4
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


def test_preflight_counts_every_rank_on_the_machine():
    cfg = config.load(TINY_TOML)
    one = memory.preflight(cfg, available=1 << 40, batch=cfg.train.batch_size // 2)
    assert memory.preflight(cfg, available=1 << 40, batch=cfg.train.batch_size // 2, processes=2) == 2 * one
    with pytest.raises(ResourceError, match="2 processes of"):
        memory.preflight(cfg, available=one + 1, batch=cfg.train.batch_size // 2, processes=2)


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
