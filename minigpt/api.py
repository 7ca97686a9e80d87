"""A small Python API, for notebooks and for checking us against other implementations.

    import minigpt
    m = minigpt.load("out/tiny")          # a run folder or a checkpoint file
    m.config, m.params                    # params: {Hugging Face GPT-2 name: array}
    m.logits(tokens)                      # (B, T) ints -> (B, T, V) float32
    m.loss_and_grads(tokens, targets)     # -> (loss, {name: grad})
    m.generate(prompt_tokens, max_new_tokens=100, temperature=0.8, top_k=50, seed=1)
    m.generation(prompt_tokens, 100)      # the same ids (.tokens) and the generation's counts
"""

import numpy as np

from minigpt import backend, sampling
from minigpt import config as config_mod
from minigpt.errors import CheckpointError, ConfigError
from minigpt.nn import lowbit, quant
from minigpt.nn.model import GPT
from minigpt.nn.params import FlatBuffer, init, layout
from minigpt.tokenizers import ByteTokenizer
from minigpt.tokenizers import from_dict as tokenizer_from_dict
from minigpt.train import checkpoint


class Model:
    def __init__(self, config, gpt: GPT, tokenizer):
        self.config = config  # the run's Config (model, data, train, eval)
        self.gpt = gpt
        self.tokenizer = tokenizer

    @classmethod
    def from_config(cls, cfg=None, seed: int = 0, dtype: str = "float32") -> "Model":
        """A freshly initialised model (cfg: a Config; None for the defaults)."""
        cfg = cfg or config_mod.Config()
        params = init(cfg.model, np.random.default_rng(seed), dtype)
        return cls(cfg, GPT(cfg.model, params), ByteTokenizer())

    @property
    def params(self) -> dict:
        """{Hugging Face GPT-2 name: array view into the flat buffer}."""
        return dict(self.gpt.params.views)

    def logits(self, tokens):
        """(B, T) token ids -> (B, T, V) next-token logits, on the host."""
        return backend.to_host(self.gpt.logits(backend.asarray(np.asarray(tokens))))

    def loss_and_grads(self, tokens, targets):
        """Mean cross-entropy and its gradient for every parameter ({name: array copy})."""
        g = self.gpt.grads = FlatBuffer(self.gpt.cfg, self.gpt.params.data.dtype)
        loss, cache = self.gpt.loss(backend.asarray(np.asarray(tokens)), backend.asarray(np.asarray(targets)))
        self.gpt.backward(cache)
        return loss, {name: backend.to_host(v).copy() for name, v in g.views.items()}

    def generate(self, prompt_tokens, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
                 seed=None, on_token=None) -> np.ndarray:
        """New token ids after prompt_tokens (its last block_size tokens are kept)."""
        return self.generation(prompt_tokens, max_new_tokens, temperature, top_k, top_p, seed,
                               on_token).tokens

    def generation(self, prompt_tokens, max_new_tokens=100, temperature=1.0, top_k=None,
                   top_p=None, seed=None, on_token=None) -> sampling.Generation:
        """generate's ids with the generation's own counts: prefill tokens, decode steps, cache
        rebuilds (a sampling.Generation)."""
        prompt = np.asarray(prompt_tokens).reshape(-1)[-self.gpt.cfg.block_size:]
        kv_int8 = self.gpt.quant is not None and self.gpt.quant.qcfg.kv_int8
        return sampling.generate(self.gpt, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                 on_token, kv_int8=kv_int8, n_tokens=self.tokenizer.vocab_size)

    def generate_batch(self, prompts, max_new_tokens=100, temperature=1.0, top_k=None, top_p=None,
                       seed=None, on_token=None) -> list:
        """sampling.generate_batch: several prompts (repeat one for several samples of it) decoded
        together, one KV cache each; each prompt's last block_size tokens are kept. Returns one
        sampling.Generation per prompt; sequence i samples with seed + i."""
        block = self.gpt.cfg.block_size
        seqs = [np.asarray(p).reshape(-1)[-block:] for p in prompts]
        kv_int8 = self.gpt.quant is not None and self.gpt.quant.qcfg.kv_int8
        return sampling.generate_batch(self.gpt, seqs, max_new_tokens, temperature, top_k, top_p, seed,
                                       on_token, kv_int8=kv_int8, n_tokens=self.tokenizer.vocab_size)

    def quantize(self, mode: str = quant.DEFAULT_MODE, quantize_embedding: bool = False,
                 kv_int8: bool = False, outlier_threshold: float | None = None,
                 bits: int | None = None, group_size: int = 32, storage16: str = "fp16") -> "Model":
        """Switch to quantized inference; returns self. bits None: the int8 `mode` (see
        minigpt.nn.quant); bits 16, 8 or 4: packed weight-only weights (see minigpt.nn.lowbit),
        group_size inputs a scale at 4 bits, storage16 "fp16" or "bf16" at 16."""
        qcfg = quant.QuantConfig(mode, quantize_embedding, kv_int8, outlier_threshold, bits,
                                 group_size, storage16)
        self.gpt.quant = quant.quantize_model(self.gpt.params, self.gpt.cfg, qcfg)
        return self

    def save_int8(self, path) -> None:
        """Write an int8 checkpoint (quantize first)."""
        if self.gpt.quant is None:
            raise ValueError("quantize the model before saving an int8 checkpoint")
        q = self.gpt.quant
        if q.qcfg.bits is not None:  # packed: each matrix's logical arrays (see nn/lowbit.py)
            tables = {n: (w.q, w.scale) for n, w in q.weights.items()}
        else:
            tables = {n: (backend.to_host(a), backend.to_host(s)) for n, (a, s) in q.tables.items()}
        floats = {n: backend.to_host(v) for n, v in self.gpt.params.views.items() if n not in tables}
        meta = {"config": self.config.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                "layout": self.gpt.params.layout, "quant": q.qcfg.__dict__}
        checkpoint.save_int8(path, meta, tables, floats)


def load(path, device: str = "cpu") -> Model:
    """A trained model from a run folder or a checkpoint file."""
    meta, arrays = checkpoint.load(path)
    where = str(checkpoint.resolve(path))
    try:
        cfg = config_mod.validate(config_mod.from_dict(meta["config"], where), where)
    except (ConfigError, KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{where}: checkpoint config is invalid: {e}") from None
    expected = [[name, list(shape)] for name, shape in layout(cfg.model)]
    if [[n, list(s)] for n, s in meta["layout"]] != expected:
        raise CheckpointError(f"{where}: parameter layout does not match its own [model] config")
    try:
        tokenizer = tokenizer_from_dict(meta.get("tokenizer", {}))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens, the model "
                              f"only {cfg.model.vocab_size} rows ([model] vocab_size)")
    backend.use(device)
    backend.keep_freed_memory()
    if meta["format"] == checkpoint.INT8_FORMAT:
        try:
            return _load_int8(meta, arrays, cfg, tokenizer)
        except (KeyError, TypeError, ValueError) as e:  # a header that passed the shape checks
            raise CheckpointError(f"{where}: int8 checkpoint header is invalid: {e}") from None
    params = FlatBuffer(cfg.model, arrays["params"].dtype, backend.asarray(arrays["params"]))
    return Model(cfg, GPT(cfg.model, params), tokenizer)


def _load_packed(meta, arrays, cfg, tokenizer) -> Model:
    """A --bits checkpoint: packed weights for inference, their dequantized values in params."""
    qcfg = quant.QuantConfig(**meta["quant"])
    params = FlatBuffer(cfg.model, "float32")
    weights = {}
    for name, view in params.views.items():
        if name in meta["int8_names"]:
            head = name == "transformer.wte.weight"
            K, M = (view.shape[1], view.shape[0]) if head else view.shape
            w = lowbit.from_stored(qcfg.bits, K, M, arrays[f"int8/{name}"], arrays.get(f"scale/{name}"),
                                   qcfg.group_size, qcfg.storage16 == "bf16")
            view[...] = backend.asarray(w.dequantize().T if head else w.dequantize())
            weights[name] = w
        else:
            view[...] = backend.asarray(arrays[f"float/{name}"])
    gpt = GPT(cfg.model, params)
    gpt.quant = lowbit.PackedWeights(cfg.model, qcfg, weights)
    return Model(cfg, gpt, tokenizer)


def _load_int8(meta, arrays, cfg, tokenizer) -> Model:
    """An int8 checkpoint: int8 weights for inference, and their dequantized values in params."""
    if meta["quant"].get("bits") is not None:
        return _load_packed(meta, arrays, cfg, tokenizer)
    params = FlatBuffer(cfg.model, "float32")
    tables = {}
    for name, view in params.views.items():
        if name in meta["int8_names"]:
            q, scale = arrays[f"int8/{name}"], arrays[f"scale/{name}"]
            per_row = name == "transformer.wte.weight"
            view[...] = backend.asarray(q * (scale[:, None] if per_row else scale))
            tables[name] = (backend.asarray(q), backend.asarray(scale))
        else:
            view[...] = backend.asarray(arrays[f"float/{name}"])
    gpt = GPT(cfg.model, params)
    gpt.quant = quant.QuantizedWeights(cfg.model, quant.QuantConfig(**meta["quant"]), tables)
    return Model(cfg, gpt, tokenizer)
