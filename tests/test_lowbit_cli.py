"""--bits from the command line: `minigpt quantize --bits` checkpoints (what they store, that they
load to the same model as quantizing on load, that damage is refused), `generate.py --bits`,
--num-samples and several prompts, and `minigpt eval --bits --format json`."""

import json

import numpy as np
import pytest
from conftest import run_cli

import minigpt
from minigpt.errors import ConfigError
from minigpt.nn import lowbit
from minigpt.train import checkpoint


@pytest.mark.parametrize("bits, extra", [(16, ["--storage16", "bf16"]), (8, []), (4, ["--group-size", "16"])])
def test_quantize_bits_writes_a_checkpoint_that_loads_as_quantizing_on_load(trained_run, tmp_path, bits, extra):
    out = tmp_path / f"q{bits}"
    r = run_cli("-m", "minigpt", "quantize", trained_run, "-o", out, "--bits", str(bits), *extra)
    assert r.returncode == 0, r.stderr
    assert lowbit.dtype_name(bits) in r.stdout  # w16a32, w8a32, w4a8
    meta, arrays = checkpoint.load(out)
    assert meta["quant"]["bits"] == bits
    q = arrays["int8/transformer.h.0.mlp.c_fc.weight"]
    C = minigpt.load(trained_run).config.model.n_embd
    assert q.dtype == {16: np.uint16, 8: np.int8, 4: np.uint8}[bits]
    assert q.shape == ((C // 2, 4 * C) if bits == 4 else (C, 4 * C))
    loaded = minigpt.load(out)
    fresh = minigpt.load(trained_run)
    fresh.quantize(bits=bits, group_size=16, storage16="bf16" if extra[:1] == ["--storage16"] else "fp16")
    assert isinstance(loaded.gpt.quant, lowbit.PackedWeights)
    ids = np.arange(12)[None] % 60
    assert np.array_equal(loaded.gpt.logits(ids), fresh.gpt.logits(ids))
    g = run_cli("generate.py", out, "--prompt", "The fox", "--max-new-tokens", "12", "--temperature", "0")
    g2 = run_cli("generate.py", trained_run, "--bits", str(bits), *extra, "--prompt", "The fox",
                 "--max-new-tokens", "12", "--temperature", "0")
    assert g.returncode == g2.returncode == 0, g.stderr + g2.stderr
    assert g.stdout == g2.stdout and g.stdout.startswith("The fox")


def test_a_damaged_bits_checkpoint_is_refused_in_one_line(trained_run, tmp_path):
    out = tmp_path / "q4"
    assert run_cli("-m", "minigpt", "quantize", trained_run, "-o", out, "--bits", "4", "--group-size", "8").returncode == 0
    meta, arrays = checkpoint.load(out)
    name = "scale/transformer.h.0.attn.c_proj.weight"
    arrays[name] = arrays[name][:-1]
    checkpoint.save(out / "ckpt.npz", meta, arrays, fmt=checkpoint.INT8_FORMAT)
    r = run_cli("generate.py", out, "--prompt", "a", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert name in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_4_bit_scales_saved_as_float32_load_rounded_to_fp16_and_inf_is_refused(trained_run, tmp_path):
    """A checkpoint whose 4-bit scales are not fp16 values (an older minigpt's float32 ones)
    loads with them rounded as quantize rounds them; a scale fp16 cannot hold is one line."""
    out = tmp_path / "q4"
    assert run_cli("-m", "minigpt", "quantize", trained_run, "-o", out, "--bits", "4",
                   "--group-size", "16").returncode == 0
    meta, arrays = checkpoint.load(out)
    name = "scale/transformer.h.0.mlp.c_fc.weight"
    saved = arrays[name].copy()
    assert np.array_equal(saved.astype(np.float16).astype(np.float32), saved)  # fp16 values
    arrays[name] = saved * np.float32(1 + 2.0 ** -14)  # float32 values between two fp16s
    checkpoint.save(out / "ckpt.npz", meta, arrays, fmt=checkpoint.INT8_FORMAT)
    w = minigpt.load(out).gpt.quant.weights["transformer.h.0.mlp.c_fc.weight"]
    assert np.array_equal(w.scale, saved)
    arrays[name] = saved.copy()
    arrays[name][0, 0] = np.inf
    checkpoint.save(out / "ckpt.npz", meta, arrays, fmt=checkpoint.INT8_FORMAT)
    r = run_cli("generate.py", out, "--prompt", "a", "--max-new-tokens", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "4-bit scales" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_4_bit_scale_beyond_fp16_is_one_clear_line():
    w = np.ones((32, 8), np.float32)
    w[3, 5] = 1e6  # absmax / 7 above 65504
    with pytest.raises(ConfigError, match="fp16"):
        lowbit.quantize(w, 4, 32)


def test_generate_decodes_several_prompts_and_samples_together(trained_run):
    args = ["--prompt", "The fox", "--prompt", "A", "--num-samples", "2", "--max-new-tokens", "15",
            "--temperature", "0.9", "--seed", "4"]
    r = run_cli("generate.py", trained_run, *args)
    assert r.returncode == 0, r.stderr
    parts = r.stdout.split("--- prompt ")[1:]
    assert [p.split(" ---")[0] for p in parts] == ["1, sample 1", "1, sample 2", "2, sample 1", "2, sample 2"]
    texts = [p.split("---\n", 1)[1] for p in parts]
    assert texts[0].startswith("The fox") and texts[2].startswith("A")
    assert texts[0] != texts[1]  # two samples, two seeds
    # sample 1 of prompt 1 is what a single generation with the same seed gives
    one = run_cli("generate.py", trained_run, "--prompt", "The fox", "--max-new-tokens", "15",
                  "--temperature", "0.9", "--seed", "4")
    assert one.stdout == texts[0]
    bad = run_cli("generate.py", trained_run, "--num-samples", "0")
    assert bad.returncode == 2 and "--num-samples" in bad.stderr


def test_eval_bits_reports_quality_against_fp32(trained_run):
    r = run_cli("-m", "minigpt", "eval", trained_run, "--bits", "4", "--group-size", "16", "--max-tokens", "2048",
                "--format", "json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["mode"], out["bits"]) == ("w4a8", 4)
    for key in ("val_loss", "fp32_val_loss", "delta_loss", "kl_divergence", "top1_agreement"):
        assert key in out
    assert out["delta_loss"] == pytest.approx((out["val_loss"] - out["fp32_val_loss"]) / out["fp32_val_loss"])
    assert 0 < out["kl_divergence"] and 0 < out["top1_agreement"] <= 1
    fp32 = minigpt.load(trained_run).gpt.params.data.nbytes
    assert out["weight_bytes"] < fp32 / 3
