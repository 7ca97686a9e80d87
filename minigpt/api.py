"""A trained model from Python: minigpt.load and Model, for notebooks and for checking us against
other implementations.

    import minigpt
    m = minigpt.load("out/tiny")          # a run folder or a checkpoint file
    m.generate("def ", max_new_tokens=100, temperature=0.8, top_k=50, seed=1)   # str -> str
    m.generate(["def ", "class "], max_new_tokens=20, seed=1)                   # -> [str, str]
    m.generate(ids, max_new_tokens=20)    # token ids -> ids
    for piece in m.stream("def "): ...    # text pieces as they are sampled
    m.config, m.params                    # params: {Hugging Face GPT-2 name: array}
    m.logits(tokens)                      # (B, T) ints -> (B, T, V) float32
    m.loss_and_grads(tokens, targets)     # -> (loss, {name: grad})
    m.generation(ids, 100)                # ids (.tokens) and the generation's counts

A list of prompts decodes together (one batched decode step for all), prompt i with seed + i.
"""

import math
import numbers
import queue
import threading
from collections.abc import Callable, Generator, Iterator

import numpy as np

from minigpt import backend, kernels, sampling, tracking
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

    def generate(self, prompt, max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 on_token=None):
        """The continuation of prompt: a str gives a str (the run's tokenizer both ways), bytes
        give bytes, token ids give ids (an int64 array). A list of prompts gives a list, decoded
        together (sampling.generate_batch: one decode step for all of them, prompt i sampled
        with seed + i). A prompt longer than the context keeps its last block_size tokens.
        on_token(id) is called as each token is chosen (on_token(i, id) for a list). Wrong input
        raises ConfigError (a bad argument) or DataError (text the tokenizer cannot encode)."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        if is_batch(prompt):
            encoded = [self._encode(p) for p in prompt]
            block = self.gpt.cfg.block_size
            gens = sampling.generate_batch(
                self.gpt, [ids[-block:] for ids, _ in encoded], max_new_tokens, temperature, top_k,
                top_p, seed, on_token, kv_int8=self._kv_int8, n_tokens=self.tokenizer.vocab_size)
            tracking.note_tokens(sum(len(g.tokens) for g in gens))
            return [self._decode(g.tokens, kind) for g, (_, kind) in zip(gens, encoded)]
        ids, kind = self._encode(prompt)
        gen = self.generation(ids, max_new_tokens, temperature, top_k, top_p, seed, on_token)
        tracking.note_tokens(len(gen.tokens))
        return self._decode(gen.tokens, kind)

    def stream(self, prompt, max_new_tokens: int = 100, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None) -> Iterator:
        """generate's continuation piece by piece as it is sampled: text pieces for a str prompt
        (a multi-byte character once it is whole), bytes for bytes, one id at a time for ids.
        The same tokens as generate with the same arguments."""
        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        if is_batch(prompt):
            raise ConfigError("stream takes one prompt; generate takes a list of them")
        ids, kind = self._encode(prompt)  # checked now, not at the first piece

        def run(on_token):
            return self.generation(ids, max_new_tokens, temperature, top_k, top_p, seed, on_token)

        return self._pieces(stream_tokens(run), kind)

    def _pieces(self, tokens: Generator, kind: str) -> Iterator:
        decode = self.tokenizer.stream_decoder()
        n = 0
        try:
            for token in tokens:
                n += 1
                if kind == "ids":
                    yield token
                elif kind == "bytes":
                    yield self.tokenizer.decode_bytes([token])
                else:
                    piece = decode([token])
                    if piece:
                        yield piece
            if kind == "text":
                tail = decode([], final=True)
                if tail:
                    yield tail
        finally:
            tokens.close()  # a reader that stops early stops the generation too
            tracking.note_tokens(n)

    def _encode(self, prompt) -> tuple[np.ndarray, str]:
        """A prompt -> (its ids, the kind of answer it wants: "text", "bytes" or "ids")."""
        if isinstance(prompt, str | bytes):
            if len(prompt) == 0:
                raise ConfigError("the prompt is empty: give some text or token ids")
            ids = np.asarray(self.tokenizer.encode(prompt), dtype=np.int64)
            kind = "text" if isinstance(prompt, str) else "bytes"
        else:
            ids, kind = token_ids(prompt, self.config.model.vocab_size), "ids"
        if ids.size == 0:
            raise ConfigError("the prompt encodes to no tokens")
        return ids, kind

    def _decode(self, tokens: np.ndarray, kind: str):
        if kind == "text":
            return self.tokenizer.decode(tokens)
        if kind == "bytes":
            return self.tokenizer.decode_bytes(tokens)
        return tokens

    def generation(self, prompt_tokens, max_new_tokens=100, temperature=1.0, top_k=None,
                   top_p=None, seed=None, on_token=None) -> sampling.Generation:
        """New token ids after prompt_tokens (ids; the last block_size are kept) with the
        generation's own counts: prefill tokens, decode steps, cache rebuilds."""
        prompt = np.asarray(prompt_tokens).reshape(-1)[-self.gpt.cfg.block_size:]
        return sampling.generate(self.gpt, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                 on_token, kv_int8=self._kv_int8,
                                 n_tokens=self.tokenizer.vocab_size)

    @property
    def _kv_int8(self) -> bool:
        return self.gpt.quant is not None and self.gpt.quant.qcfg.kv_int8

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


# ---- checking what a caller passes ----------------------------------------------------------


def check_sampling(max_new_tokens, temperature, top_k, top_p, seed) -> None:
    """The sampling arguments' types and ranges, each wrong one a ConfigError naming it."""

    def whole(name, value, lo):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < lo:
            raise ConfigError(f"{name} must be a whole number >= {lo}, got {value!r}")

    whole("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating) \
            or not 0 <= temperature < math.inf:
        raise ConfigError(f"temperature must be a number >= 0 and finite, got {temperature!r}")
    if top_k is not None:
        whole("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(
            top_p, int | float | np.floating) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None:
        whole("seed", seed, 0)


def is_batch(prompt) -> bool:
    """A list (or tuple) of prompts, or a 2-D array of ids, rather than one prompt."""
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 2
    if isinstance(prompt, list | tuple):
        if len(prompt) == 0:
            raise ConfigError("the prompt is an empty list: give text, token ids or a list of "
                              "prompts")
        return any(isinstance(p, str | bytes | list | tuple | np.ndarray) for p in prompt)
    return False


def token_ids(prompt, vocab_size: int) -> np.ndarray:
    """A prompt of token ids (a sequence of whole numbers, each below vocab_size) as int64."""
    if not isinstance(prompt, list | tuple | np.ndarray | range):
        raise ConfigError(f"a prompt is text (str), bytes, token ids or a list of prompts, not "
                          f"{type(prompt).__name__}")
    arr = np.asarray(prompt, dtype=object if not isinstance(prompt, np.ndarray) else None)
    if arr.ndim != 1:
        raise ConfigError(f"token ids must be one sequence, got an array of shape {arr.shape}")
    bad = [t for t in arr.tolist() if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
    if bad:
        raise ConfigError(f"token ids must be whole numbers, got {bad[0]!r}")
    ids = np.asarray(arr.tolist(), dtype=np.int64)
    out = ids[(ids < 0) | (ids >= vocab_size)]
    if out.size:
        raise ConfigError(f"{int(out[0])} is not a token id of this model (0..{vocab_size - 1})")
    return ids


# ---- streaming ---------------------------------------------------------------------------------


class _Stop(BaseException):
    """Raised inside a streamed generation when its reader stops early."""


def stream_tokens(run: Callable) -> Generator[int, None, None]:
    """The token ids of run(on_token) one at a time, as they are sampled. The generation runs in a
    worker thread that hands each token over and waits until the reader asks for the next, so the
    model never runs while the reader's code does (the meter is one per process); a reader that
    stops early stops the generation at its next token."""
    handed: queue.Queue = queue.Queue()
    asked: queue.Queue = queue.Queue()

    def on_token(token: int) -> None:
        handed.put(("token", token))
        if asked.get() == "stop":
            raise _Stop

    def work() -> None:
        kernels.fused_threads_here()
        try:
            run(on_token)
            handed.put(("done", None))
        except _Stop:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
            handed.put(("error", e))

    worker = threading.Thread(target=work, name="minigpt-stream", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            what, value = handed.get()
            if what == "token":
                yield value
                asked.put("next")
            else:
                finished = True
                if what == "error":
                    raise value
                return
    finally:
        if not finished:
            asked.put("stop")
        worker.join()
