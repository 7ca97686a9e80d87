"""GPT-2 checkpoints in and out: a randomly initialised transformers GPT2LMHeadModel (tiny shape,
saved locally, no download) imported and compared logit for logit, both directions; fp16/bf16;
GPT-2's file variants; every kind of bad input refused in one line; `minigpt init`."""

import json

import numpy as np
import pytest
from conftest import ROOT, run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

import minigpt
from minigpt import interop
from minigpt.errors import CheckpointError, ConfigError

SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 300, "n_positions": 64}
TOKENS = np.random.default_rng(0).integers(0, 300, size=(2, 24))


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def rel_err(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**SHAPE, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm parameters, so every tensor matters
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf_model.save_pretrained(folder)
    return folder


def test_import_gives_transformers_logits(hf_model, hf_dir, tmp_path):
    info = interop.import_hf(hf_dir, tmp_path / "run")
    assert info["params"] == sum(p.numel() for p in hf_model.parameters())
    ours = minigpt.load(tmp_path / "run").logits(TOKENS)
    assert rel_err(ours, hf_logits(hf_model, TOKENS)) < 1e-4


def test_export_loads_in_transformers_with_our_logits(trained_run, tmp_path):
    ours = minigpt.load(trained_run)
    interop.export_hf(ours, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = TOKENS[:, :16] % 256
    assert rel_err(hf_logits(theirs, tokens), ours.logits(tokens)) < 1e-4
    tok = transformers.GPT2Tokenizer(str(tmp_path / "hf" / "vocab.json"), str(tmp_path / "hf" / "merges.txt"))
    text = "def f(x):\n    return 'naïve' 🙂"
    assert tok.encode(text) == list(ours.tokenizer.encode(text))


def test_import_export_import_round_trip(hf_dir, tmp_path):
    interop.import_hf(hf_dir, tmp_path / "a")
    interop.export_hf(minigpt.load(tmp_path / "a"), tmp_path / "hf")
    interop.import_hf(tmp_path / "hf", tmp_path / "b")
    a, b = minigpt.load(tmp_path / "a"), minigpt.load(tmp_path / "b")
    assert np.array_equal(a.gpt.params.data, b.gpt.params.data)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_are_widened(hf_model, tmp_path, dtype):
    half = transformers.GPT2LMHeadModel(hf_model.config)
    half.load_state_dict(hf_model.state_dict())
    half.to(dtype).save_pretrained(tmp_path / "hf")
    info = interop.import_hf(tmp_path / "hf", tmp_path / "run")
    assert info["dtypes"] == ["F16" if dtype == torch.float16 else "BF16"]
    widened = half.float().eval()  # the same rounded weights, in fp32
    assert rel_err(minigpt.load(tmp_path / "run").logits(TOKENS), hf_logits(widened, TOKENS)) < 1e-4


def test_names_without_prefix_and_mask_buffers_are_accepted(hf_model, hf_dir, tmp_path):
    tensors = {k.removeprefix("transformer."): v.numpy() for k, v in hf_model.state_dict().items()}
    for i in range(SHAPE["n_layer"]):  # the causal-mask buffers of older GPT-2 files
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    folder = tmp_path / "hf"
    folder.mkdir()
    safetensors_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                str(folder / "model.safetensors"))
    (folder / "config.json").write_text((hf_dir / "config.json").read_text())
    interop.import_hf(folder, tmp_path / "run")
    assert rel_err(minigpt.load(tmp_path / "run").logits(TOKENS), hf_logits(hf_model, TOKENS)) < 1e-4


def test_tokenizer_files_travel_with_the_import(hf_dir, tmp_path):
    from minigpt.tokenizers.bpe import BPETokenizer

    folder = tmp_path / "hf"
    folder.mkdir()
    for f in hf_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    BPETokenizer.train((ROOT / "corpora" / "fables.txt").read_bytes()[:30000], 300).save(folder)
    interop.import_hf(folder, tmp_path / "run")
    m = minigpt.load(tmp_path / "run")
    assert m.tokenizer.kind == "bpe" and (tmp_path / "run" / "merges.txt").is_file()
    r = run_cli("generate.py", tmp_path / "run", "--prompt", "The fox", "--max-new-tokens", "5", "--seed", "0")
    assert r.returncode == 0 and r.stdout.startswith("The fox"), r.stderr


# --------------------------------------------------------------------------- bad input


def _copy(hf_dir, dest):
    dest.mkdir()
    for f in hf_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def _edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def _import_fails(folder, tmp_path, pattern):
    r = run_cli("-m", "minigpt", "import", folder, tmp_path / "run")
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert pattern in r.stderr, r.stderr
    assert not (tmp_path / "run" / "ckpt.npz").exists()


def test_pickled_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(SHAPE))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    _import_fails(folder, tmp_path, "pickled")


@pytest.mark.parametrize("change, pattern", [
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"activation_function": "relu"}, "activation_function"),
    ({"n_head": 3}, "not divisible"),
    ({"n_ctx": 128}, "n_ctx = 128 differs"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"n_embd": 64}, "has shape"),
    ({"n_layer": 3}, "missing tensor 'transformer.h.2"),
    ({"n_layer": 1}, "unexpected tensor 'transformer.h.1"),
    ({"model_type": "llama"}, "not GPT-2"),
])
def test_bad_config_fields(hf_dir, tmp_path, change, pattern):
    folder = _copy(hf_dir, tmp_path / "hf")
    _edit_config(folder, **change)
    _import_fails(folder, tmp_path, pattern)


def test_missing_and_corrupt_files(hf_dir, tmp_path):
    folder = _copy(hf_dir, tmp_path / "hf")
    (folder / "config.json").unlink()
    _import_fails(folder, tmp_path, "config.json: no such file")
    _import_fails(tmp_path / "nowhere", tmp_path, "no such folder")
    folder = _copy(hf_dir, tmp_path / "hf2")
    blob = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(blob[:8] + b"{not json" + blob[17:])
    _import_fails(folder, tmp_path, "corrupt safetensors header")
    (folder / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + blob[8:])
    _import_fails(folder, tmp_path, "corrupt safetensors header (claims")
    (folder / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    _import_fails(folder, tmp_path, "truncated")


def test_unsupported_dtype(hf_model, hf_dir, tmp_path):
    folder = _copy(hf_dir, tmp_path / "hf")
    tensors = {k: v.numpy().astype(np.float64) for k, v in hf_model.state_dict().items()}
    safetensors_numpy.save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="dtype F64"):
        interop.import_hf(folder, tmp_path / "run")


def test_export_refuses_an_int8_run(trained_run, tmp_path):
    m = minigpt.load(trained_run).quantize("w8a32")
    with pytest.raises(ConfigError, match="int8"):
        interop.export_hf(m, tmp_path / "out")


# --------------------------------------------------------------------------- minigpt init


def test_init_writes_a_run_that_generates_and_costs(tmp_path):
    run = tmp_path / "run"
    shrink = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
              "--set", "model.block_size=32"]
    r = run_cli("-m", "minigpt", "init", ROOT / "configs" / "gpt2-124m.toml", run, *shrink)
    assert r.returncode == 0, r.stderr
    assert "no tokenizer" in r.stderr
    m = minigpt.load(run)
    assert m.config.model.vocab_size == 50257 and m.tokenizer.kind == "none"
    w = m.params["transformer.h.0.attn.c_proj.weight"]
    assert abs(float(w.std()) - 0.02 / np.sqrt(2)) < 0.003  # GPT-2's scaled residual init
    g = run_cli("generate.py", run, "--prompt-ids", "464,2068", "--max-new-tokens", "4", "--seed", "0")
    assert g.returncode == 0 and g.stdout.startswith("<464><2068><"), g.stderr
    bad = run_cli("generate.py", run, "--prompt", "hello")
    assert bad.returncode == 2 and "no tokenizer" in bad.stderr
    bad = run_cli("-m", "minigpt", "eval", run)
    assert bad.returncode == 2 and "no tokenizer" in bad.stderr and "eval cannot encode" in bad.stderr
    assert "Traceback" not in bad.stderr
    c = run_cli("-m", "minigpt", "costs", run, "--mode", "decode", "--seq", "8", "--batch", "1")
    assert c.returncode == 0 and "predicted" in c.stdout and "lm_head" in c.stdout, c.stderr
