"""Run configuration: TOML sections -> validated dataclasses, with --set overrides.

Every field has a default; configs/tiny.toml documents each one. Anything wrong (an unknown key,
a wrong type, a value out of range) raises ConfigError naming the file or --set and the field.
"""

import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from minigpt.errors import ConfigError


def _f(default, lo=None, hi=None, choices=None, lo_open=False):
    """A field with its allowed range (lo <= v <= hi, or lo < v with lo_open) or choices."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open})


@dataclass
class ModelConfig:
    n_layer: int = _f(4, lo=1)
    n_head: int = _f(4, lo=1)
    n_embd: int = _f(128, lo=1)
    block_size: int = _f(128, lo=1)
    vocab_size: int = _f(256, lo=1)
    dropout: float = _f(0.0, lo=0.0, hi=0.95)
    # Mixture of experts (minigpt/nn/moe.py). n_experts = 1 is the dense MLP (no router).
    n_experts: int = _f(1, lo=1)
    experts_per_token: int = _f(1, lo=1)  # top-k: experts each token is sent to
    moe_every: int = _f(1, lo=1)  # blocks moe_every-1, 2*moe_every-1, ... are MoE; the rest dense
    capacity_factor: float = _f(0.0, lo=0.0)  # 0 = dropless; else each expert takes at most
    # ceil(capacity_factor * tokens * experts_per_token / n_experts) tokens, the rest are dropped
    aux_loss_coef: float = _f(0.01, lo=0.0)  # Switch Transformer load-balancing loss weight

    def moe_block(self, i: int) -> bool:
        """Is block i a mixture-of-experts block?"""
        return is_moe_block(self, i)


def expert_capacity(cfg, n_tokens: int) -> int | None:
    """Most tokens one expert computes in a forward of n_tokens tokens; None when dropless."""
    if cfg.capacity_factor <= 0:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.experts_per_token / cfg.n_experts)


def is_moe_block(cfg, i: int) -> bool:
    """Block i is MoE when the config has several experts and i is a multiple of moe_every less
    one (every block when moe_every = 1; blocks 1, 3, 5, ... when it is 2). cfg: anything with
    n_experts (and optionally moe_every), such as a ModelConfig or scale.work.Arch."""
    return cfg.n_experts > 1 and (i + 1) % getattr(cfg, "moe_every", 1) == 0


@dataclass
class DataConfig:
    path: str = ""  # "" = the running Python's standard-library sources
    max_bytes: int = _f(4_000_000, lo=1)
    val_fraction: float = _f(0.1, lo=0.0, hi=0.9, lo_open=True)
    tokenizer: str = _f("bytes", choices=("bytes", "bpe"))
    vocab_size: int = _f(0, lo=0)  # bpe: learn this many tokens from the corpus (0 = [model] vocab_size)
    tokenizer_path: str = ""  # bpe: a folder with GPT-2's vocab.json + merges.txt, instead of learning


@dataclass
class TrainConfig:
    out_dir: str = ""  # "" = out/<config name>
    batch_size: int = _f(32, lo=1)
    grad_accum: int = _f(1, lo=1)
    max_steps: int = _f(800, lo=1)
    learning_rate: float = _f(3e-3, lo=0.0, lo_open=True)
    min_lr: float = _f(3e-4, lo=0.0)
    warmup_steps: int = _f(50, lo=0)
    weight_decay: float = _f(0.1, lo=0.0)
    beta1: float = _f(0.9, lo=0.0, hi=0.999999)
    beta2: float = _f(0.99, lo=0.0, hi=0.999999)
    eps: float = _f(1e-8, lo=0.0, lo_open=True)
    grad_clip: float = _f(1.0, lo=0.0)  # 0 turns clipping off
    seed: int = _f(1337, lo=0)
    dtype: str = _f("float32", choices=("float32", "float64"))
    device: str = _f("cpu", choices=("cpu", "cuda"))


@dataclass
class EvalConfig:
    interval: int = _f(100, lo=1)
    batches: int = _f(8, lo=1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "default"  # the config file's stem; names the default out_dir

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir or f"out/{self.name}")

    def to_dict(self) -> dict:
        return {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS} | {"name": self.name}


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _nearest(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_value(where, f, value):
    """Type and range of one field; returns the value (ints widened to float where wanted)."""
    want = f.type
    ok = isinstance(value, want) and not isinstance(value, bool)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{where}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(map(repr, m['choices']))}, not {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if lo is not None and (value <= lo if m.get("lo_open") else value < lo):
        raise ConfigError(f"{where}: must be {'>' if m.get('lo_open') else '>='} {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{where}: must be <= {hi}, got {value!r}")
    return value


def _apply(cfg: Config, section: str, key: str, value, where: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section [{section}]{_nearest(section, SECTIONS)}")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if key not in fields:
        raise ConfigError(f"{where}: unknown key {key!r} in [{section}]{_nearest(key, fields)}")
    value = _check_value(f"{where}: [{section}] {key}", fields[key], value)
    setattr(getattr(cfg, section), key, value)


def _parse_override(text: str, example: str = "train.max_steps"):
    """'train.max_steps=100' -> ('train', 'max_steps', 100). Values are TOML; bare words are strings.
    `example` is the key the error for a key without one dot shows."""
    where = f"--set {text}"
    if "=" not in text:
        raise ConfigError(f"{where}: expected section.key=value")
    dotted, raw = (s.strip() for s in text.split("=", 1))
    if dotted.count(".") != 1:
        raise ConfigError(f"{where}: the key must be section.key, e.g. {example}")
    section, key = dotted.split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:  # "[[[[...": tomllib recurses once per level
        raise ConfigError(f"{where[:80]}: the value is nested too deeply") from None
    return section, key, value, where


def from_dict(d: dict, where: str = "config", name: str = "default") -> Config:
    cfg = Config(name=name)
    for section, table in d.items():
        if section == "name":
            continue
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section!r} must be a [section] table{_nearest(section, SECTIONS)}")
        for key, value in table.items():
            _apply(cfg, section, key, value, where)
    return cfg


def validate(cfg: Config, where: str = "config") -> Config:
    """Checks that involve more than one field."""
    m, t = cfg.model, cfg.train
    if m.n_embd % m.n_head:
        raise ConfigError(f"{where}: [model] n_embd = {m.n_embd} is not divisible by n_head = {m.n_head}")
    if m.experts_per_token > m.n_experts:
        raise ConfigError(f"{where}: [model] experts_per_token = {m.experts_per_token} exceeds "
                          f"n_experts = {m.n_experts}")
    if m.n_experts > 1 and m.moe_every > m.n_layer:
        raise ConfigError(f"{where}: [model] moe_every = {m.moe_every} exceeds n_layer = {m.n_layer}:"
                          f" no block would be a mixture of experts")
    d = cfg.data
    if d.tokenizer == "bytes" and (d.vocab_size or d.tokenizer_path):
        raise ConfigError(f"{where}: [data] vocab_size and tokenizer_path are for tokenizer = \"bpe\"")
    if d.tokenizer == "bpe" and not d.tokenizer_path and (d.vocab_size or m.vocab_size) > m.vocab_size:
        raise ConfigError(f"{where}: [data] vocab_size = {d.vocab_size} exceeds [model] vocab_size = "
                          f"{m.vocab_size}: the model needs a row for every token")
    if t.min_lr > t.learning_rate:
        raise ConfigError(f"{where}: [train] min_lr = {t.min_lr} exceeds learning_rate = {t.learning_rate}")
    return cfg


def load(path=None, overrides=()) -> Config:
    """Read a TOML config (or the defaults, with path None) and apply 'section.key=value' overrides."""
    if path is None:
        cfg = Config()
        where = "defaults"
    else:
        path = Path(path)
        where = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        try:
            d = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
        cfg = from_dict(d, where, name=path.stem)
    for text in overrides:
        section, key, value, w = _parse_override(text)
        _apply(cfg, section, key, value, w)
    return validate(cfg, where)
