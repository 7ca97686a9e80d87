"""GPT-2 checkpoints in and out: a Hugging Face GPT-2 folder (config.json + model.safetensors) to a
minigpt run folder (`minigpt import`), a run folder back to one (`minigpt export --format hf`), and
a run folder of freshly initialised weights from a config (`minigpt init`).

Our parameter names and layouts are Hugging Face's (Conv1D weights stored (in, out), the LM head
tied to the token table), so a checkpoint moves over name by name with no transposes. Weights are
read through the safetensors package, never through pickle; fp16 and bf16 are widened to fp32.
"""

import json
import math
import zipfile
from pathlib import Path

import numpy as np

from minigpt import config as config_mod
from minigpt import safeio
from minigpt.errors import CheckpointError, ConfigError
from minigpt.nn.layers import LAYERNORM_EPS
from minigpt.nn.params import FlatBuffer, layout
from minigpt.tokenizers import MissingTokenizer
from minigpt.train import checkpoint

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}  # bf16: widened by hand
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older checkpoints carry
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation we compute
GPT2_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "dropout")


# ----------------------------------------------------------------------------- reading


def _read_header(path: Path) -> dict:
    """The safetensors header (JSON after an 8-byte little-endian length), checked for sense."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100 << 20:
            raise CheckpointError(f"{path}: corrupt safetensors header (claims {n:,} bytes; the file "
                                  f"has {size - 8:,} after the length)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        try:
            dtype, shape, (lo, hi) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if not 0 <= lo <= hi <= size - 8 - n:
            raise CheckpointError(f"{path}: {name!r} lies outside the file (truncated?)")
        if dtype in DTYPES and hi - lo != math.prod(shape) * (4 if dtype == "F32" else 2):
            raise CheckpointError(f"{path}: {name!r}: {hi - lo} bytes for shape {shape} in {dtype}")
        entry["start"] = 8 + n + lo
    return header


def read_safetensors(path, header: dict | None = None):
    """(name, float32 array) for each tensor of a .safetensors file (F32, F16 or BF16), one at a
    time (a 1558M model is 6.2 GB in fp32: never two copies at once)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    header = header if header is not None else _read_header(path)
    for name, entry in header.items():
        if entry["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: {name!r} has dtype {entry['dtype']}; GPT-2 weights must be "
                                  "F32, F16 or BF16")
    try:
        with safe_open(str(path), framework="np") as f:
            for name, entry in header.items():
                if name.endswith(BUFFERS):
                    continue
                if entry["dtype"] == "BF16":  # NumPy has no bfloat16: its bits are fp32's top half
                    raw = np.fromfile(path, dtype="<u2", count=math.prod(entry["shape"]), offset=entry["start"])
                    yield name, (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])
                else:
                    yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def check_hf_config(d, where: str) -> dict:
    """Our [model] fields from a GPT-2 config.json, every field we cannot honour named."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: must be a JSON object")
    if d.get("model_type", "gpt2") != "gpt2":
        raise ConfigError(f"{where}: model_type {d['model_type']!r} is not GPT-2")
    fields = {}
    for key in ("n_layer", "n_head", "n_embd", "vocab_size"):
        v = d.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
        fields[key] = v
    ctx = d.get("n_positions", d.get("n_ctx"))
    if not isinstance(ctx, int) or ctx < 1:
        raise ConfigError(f"{where}: n_positions must be a positive integer, got {ctx!r}")
    if "n_ctx" in d and d["n_ctx"] != ctx:
        raise ConfigError(f"{where}: n_ctx = {d['n_ctx']} differs from n_positions = {ctx}")
    fields["block_size"] = ctx
    if fields["n_embd"] % fields["n_head"]:
        raise ConfigError(f"{where}: n_embd = {fields['n_embd']} is not divisible by n_head = {fields['n_head']}")
    act = d.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ConfigError(f"{where}: activation_function {act!r}: minigpt computes GPT-2's tanh GELU (gelu_new)")
    eps = d.get("layer_norm_epsilon", LAYERNORM_EPS)
    if not isinstance(eps, (int, float)) or abs(eps - LAYERNORM_EPS) > 1e-12:
        raise ConfigError(f"{where}: layer_norm_epsilon = {eps!r}; minigpt's LayerNorm uses {LAYERNORM_EPS}")
    if d.get("tie_word_embeddings", True) is not True:
        raise ConfigError(f"{where}: tie_word_embeddings is false; minigpt's LM head is the token table")
    if d.get("n_inner") not in (None, 4 * fields["n_embd"]):
        raise ConfigError(f"{where}: n_inner = {d['n_inner']}; minigpt's MLP is 4 x n_embd wide")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if d.get(key, want) != want:
            raise ConfigError(f"{where}: {key} = {d[key]!r}; minigpt supports only {want!r}")
    return fields


def _our_name(name: str) -> str:
    """GPT-2's files name tensors with or without the "transformer." prefix."""
    return name if name.startswith("transformer.") or name == "lm_head.weight" else "transformer." + name


def _check_names(header: dict, mcfg, where: str) -> None:
    """Every tensor the config needs is present with its shape, and nothing else is."""
    shapes = {_our_name(n): tuple(e["shape"]) for n, e in header.items() if not n.endswith(BUFFERS)}
    want = dict(layout(mcfg))
    if "lm_head.weight" in shapes and shapes.pop("lm_head.weight") != want["transformer.wte.weight"]:
        raise CheckpointError(f"{where}: lm_head.weight's shape differs from wte.weight's; minigpt ties them")
    for name, shape in want.items():
        if name not in shapes:
            raise CheckpointError(f"{where}: missing tensor {name!r} (expected shape {shape})")
        if shapes[name] != shape:
            raise CheckpointError(f"{where}: {name!r} has shape {shapes[name]}; the config needs {shape}")
    extra = sorted(set(shapes) - set(want))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} in all); not GPT-2?")


def import_hf(hf_dir, run_dir) -> dict:
    """Write run_dir/ckpt.npz (and the tokenizer) from a Hugging Face GPT-2 folder; a summary."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"{hf_dir}: no such folder")
    refuse_existing_run(run_dir)
    st = hf_dir / "model.safetensors"
    if not st.is_file():
        if (hf_dir / "pytorch_model.bin").exists():
            raise CheckpointError(f"{hf_dir}/pytorch_model.bin: a pickled PyTorch file, which can run code "
                                  "when loaded; minigpt reads only model.safetensors")
        raise CheckpointError(f"{st}: no such file (minigpt imports config.json + model.safetensors)")
    cpath = hf_dir / "config.json"
    try:
        raw_cfg = json.loads(cpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{cpath}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{cpath}: not readable JSON: {e}") from None
    fields = check_hf_config(raw_cfg, str(cpath))
    cfg = config_mod.Config(name=run_dir.name)
    for k, v in fields.items():
        setattr(cfg.model, k, v)
    cfg.data.tokenizer = "bpe"
    cfg.train.out_dir = str(run_dir)
    header = _read_header(st)
    dtypes = sorted({e["dtype"] for n, e in header.items() if not n.endswith(BUFFERS)})
    _check_names(header, cfg.model, str(st))
    params = FlatBuffer(cfg.model, "float32")
    head = None
    for name, arr in read_safetensors(st, header):
        if name == "lm_head.weight":
            head = arr
        else:
            params.views[_our_name(name)][...] = arr
    if head is not None and not np.array_equal(head, params.views["transformer.wte.weight"]):
        raise CheckpointError(f"{st}: lm_head.weight differs from wte.weight; minigpt ties them")
    tokenizer = _hf_tokenizer(hf_dir, cfg.model.vocab_size)
    write_run(run_dir, cfg, params.data, tokenizer, {"imported_from": str(hf_dir), "dtypes": dtypes})
    return {"params": params.size, "dtypes": dtypes, "tokenizer": tokenizer.kind, "config": fields}


def _hf_tokenizer(hf_dir: Path, vocab_size: int):
    if not ((hf_dir / "vocab.json").is_file() and (hf_dir / "merges.txt").is_file()):
        return MissingTokenizer(vocab_size)
    from minigpt.tokenizers.bpe import BPETokenizer

    tok = BPETokenizer.load(hf_dir)
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens, the model {vocab_size} rows")
    return tok


def write_run(run_dir, cfg, flat: np.ndarray, tokenizer, extra: dict) -> Path:
    """A run folder holding parameters only (no optimizer state): ckpt.npz, written through
    checkpoint.save, and a BPE tokenizer's vocab.json + merges.txt beside it."""
    run_dir = Path(run_dir)
    refuse_existing_run(run_dir)
    meta = {"config": cfg.to_dict(), "tokenizer": tokenizer.to_dict(),
            "layout": [[n, list(s)] for n, s in layout(cfg.model)], **extra}
    path = run_dir / checkpoint.FILENAME
    checkpoint.save(path, meta, {"params": flat})
    if tokenizer.kind == "bpe":
        tokenizer.save(run_dir)
    return path


def refuse_existing_run(run_dir: Path) -> None:
    """A folder that already holds a checkpoint is a run (trained, imported or initialised): writing
    over it would lose its weights and leave its log and costs describing other weights."""
    if (Path(run_dir) / checkpoint.FILENAME).exists():
        raise ConfigError(f"{run_dir}: already holds a run ({checkpoint.FILENAME}); give a new folder "
                          "or remove that one first")


def run_config(run) -> config_mod.Config:
    """A run's Config from its checkpoint's header alone (no weights read)."""
    path = checkpoint.resolve(run)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
        return config_mod.from_dict(meta["config"], str(path))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable minigpt checkpoint: {e}") from None


# ----------------------------------------------------------------------------- writing


def hf_config(cfg, tokenizer) -> dict:
    m = cfg.model
    special = getattr(tokenizer, "special_id", None)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "n_positions": m.block_size,
        "n_ctx": m.block_size, "vocab_size": m.vocab_size, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LAYERNORM_EPS,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": special, "eos_token_id": special, "torch_dtype": "float32",
    }


def _write_safetensors(path: Path, tensors: dict) -> None:
    """safetensors' own writer through safeio (temporary file, sync, rename); the tensors are views
    of the flat buffer, so a large model is not copied in memory."""
    from safetensors.numpy import save_file

    safeio.atomic_write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))


def export_hf(model, out_dir) -> list[Path]:
    """config.json, model.safetensors and the tokenizer's vocab.json + merges.txt for a loaded
    minigpt.Model, in GPT-2's format; the written paths."""
    from minigpt import backend

    if model.gpt.quant is not None:
        raise ConfigError("export: an int8 checkpoint has no GPT-2 equivalent; export the float run")
    defaults = config_mod.ModelConfig()
    for f in config_mod.dataclasses.fields(config_mod.ModelConfig):
        if f.name not in GPT2_FIELDS and getattr(model.config.model, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"export: [model] {f.name} = {getattr(model.config.model, f.name)!r} "
                              "(a mixture-of-experts model) has no GPT-2 equivalent")
    out = safeio.make_dir(out_dir)
    tensors = {n: np.ascontiguousarray(backend.to_host(v), dtype=np.float32)
               for n, v in model.gpt.params.views.items()}
    _write_safetensors(out / "model.safetensors", tensors)
    safeio.write_text(out / "config.json", json.dumps(hf_config(model.config, model.tokenizer), indent=1))
    written = [out / "config.json", out / "model.safetensors"]
    tok = model.tokenizer
    if tok.kind == "byte":  # a byte tokenizer is a BPE with no merges whose ids are the bytes
        from minigpt.tokenizers.bpe import BPETokenizer, bytes_to_unicode

        tok = BPETokenizer({c: b for b, c in bytes_to_unicode().items()}, [])
    if tok.kind == "bpe":
        tok.save(out)
        written += [out / "vocab.json", out / "merges.txt"]
    return written
