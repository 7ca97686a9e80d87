"""Parameters as one flat buffer with named views (Hugging Face GPT-2 names and layouts).

One allocation means AdamW, gradient clipping and checkpoints are a few whole-array operations.
Matrices (ndim >= 2: the ones weight decay applies to) come first, so decay is one slice.
"""

import math

from minigpt import backend
from minigpt.config import is_moe_block


def layout(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter, in buffer order: all matrices, then all vectors.

    The LM head is tied to transformer.wte.weight and has no entry of its own. A mixture-of-experts
    block (cfg.n_experts > 1, see config.is_moe_block) has mlp.router.weight (C, n_experts) and
    mlp.experts.<e>.c_fc / c_proj in place of mlp.c_fc / c_proj.
    """
    C, L = cfg.n_embd, cfg.n_layer
    mats = [("transformer.wte.weight", (cfg.vocab_size, C)), ("transformer.wpe.weight", (cfg.block_size, C))]
    vecs = []
    for i in range(L):
        h = f"transformer.h.{i}."
        mats += [(h + "attn.c_attn.weight", (C, 3 * C)), (h + "attn.c_proj.weight", (C, C))]
        vecs += [
            (h + "ln_1.weight", (C,)),
            (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)),
            (h + "ln_2.bias", (C,)),
        ]
        if is_moe_block(cfg, i):  # a router (no bias) and n_experts MLPs, each GPT-2's own shape
            E = cfg.n_experts
            mats.append((h + "mlp.router.weight", (C, E)))
            for e in range(E):
                x = f"{h}mlp.experts.{e}."
                mats += [(x + "c_fc.weight", (C, 4 * C)), (x + "c_proj.weight", (4 * C, C))]
                vecs += [(x + "c_fc.bias", (4 * C,)), (x + "c_proj.bias", (C,))]
        else:
            mats += [(h + "mlp.c_fc.weight", (C, 4 * C)), (h + "mlp.c_proj.weight", (4 * C, C))]
            vecs += [(h + "mlp.c_fc.bias", (4 * C,)), (h + "mlp.c_proj.bias", (C,))]
    vecs += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    return mats + vecs


def count(cfg) -> int:
    return sum(math.prod(shape) for _, shape in layout(cfg))


class FlatBuffer:
    """One 1-D array and a {name: view} dict over it."""

    def __init__(self, cfg, dtype="float32", data=None):
        self.layout = layout(cfg)
        self.size = sum(math.prod(s) for _, s in self.layout)
        self.n_decay = sum(math.prod(s) for _, s in self.layout if len(s) >= 2)
        xp = backend.xp
        self.data = xp.zeros(self.size, dtype=dtype) if data is None else data
        assert self.data.shape == (self.size,), (self.data.shape, self.size)
        self.views = {}
        self._blocks: dict[int, dict] = {}
        offset = 0
        for name, shape in self.layout:
            n = math.prod(shape)
            self.views[name] = self.data[offset : offset + n].reshape(shape)
            offset += n

    def __getitem__(self, name):
        return self.views[name]

    def block(self, i: int) -> dict:
        """Views of block i, by their short names ("attn.c_attn.weight", "ln_1.bias", ...)."""
        if i not in self._blocks:
            prefix = f"transformer.h.{i}."
            self._blocks[i] = {k[len(prefix):]: v for k, v in self.views.items() if k.startswith(prefix)}
        return self._blocks[i]


def init(cfg, rng, dtype="float32") -> FlatBuffer:
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layer),
    zero biases, LayerNorm weights 1. rng: a numpy Generator (weights are drawn on the host, so a
    seed gives the same model on every backend)."""
    import numpy as np

    host = np.zeros(count(cfg), dtype=dtype)
    offset = 0
    for name, shape in layout(cfg):
        n = math.prod(shape)
        if len(shape) >= 2:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std /= math.sqrt(2 * cfg.n_layer)
            host[offset : offset + n] = rng.normal(0.0, std, size=n)
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            host[offset : offset + n] = 1.0
        offset += n
    return FlatBuffer(cfg, dtype, backend.asarray(host))
