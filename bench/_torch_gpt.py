"""The PyTorch twin of minigpt's GPT-2, for bench/compare_torch.py (which see).

Written from the GPT-2 definition, as nanoGPT writes it, not from our layers: pre-LN blocks, a
fused c_attn, causal softmax attention, tanh GELU, final LayerNorm (eps 1e-5), an LM head tied to
wte and mean cross-entropy. The parameters are a {Hugging Face GPT-2 name: leaf tensor} dict with
our names and layouts (`c_attn.weight` is (C, 3C), used as x @ W + b), so weights copy across one
to one. Linear layers run as `F.linear(x, W.t(), b)`, the kernel nn.Linear uses (one addmm with
the bias fused; W.t() is a view, nothing is copied).

Two attention paths:
- "eager": matmul, masked_fill, softmax, matmul (nanoGPT's manual path, and the fair reference
  for ours, which does the same work);
- "sdpa": F.scaled_dot_product_attention, PyTorch's fused fast path.

Generation keeps its own KV cache, a preallocated (L, B, H, block_size, hs) pair of tensors like
ours, and follows minigpt.sampling.generate step for step (greedy): prefill the prompt, decode one
token at a time, and when the cache is full rebuild it from the last block_size // 2 tokens.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION = ("eager", "sdpa")


def params_from(flat) -> dict:
    """Leaf tensors (float32, requires_grad) holding copies of a minigpt FlatBuffer's views."""
    return {
        name: torch.tensor(np.array(flat[name]), dtype=torch.float32, requires_grad=True)
        for name, _ in flat.layout
    }


def _block(P: dict, i: int) -> dict:
    prefix = f"transformer.h.{i}."
    return {k[len(prefix) :]: v for k, v in P.items() if k.startswith(prefix)}


def _linear(x, w, b):
    """x (..., C) @ w (C, OC) + b, as one addmm (nn.Linear's kernel on the transposed view)."""
    return F.linear(x, w.t(), b)


def _causal_keep(T: int, Tk: int, pos0: int) -> torch.Tensor:
    """(T, Tk) bool: query pos0 + i may see key j when j <= pos0 + i."""
    i = torch.arange(T)[:, None] + pos0
    return torch.arange(Tk)[None, :] <= i


class KVCache:
    """Keys and values of every earlier position, per layer: (L, B, H, block_size, hs) each."""

    def __init__(self, cfg, batch: int):
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.n_head, cfg.block_size, hs)
        self.k, self.v = torch.zeros(shape), torch.zeros(shape)
        self.length = 0  # positions filled, the same in every layer
        self.capacity = cfg.block_size

    def append(self, i: int, k, v):
        """Store k, v (B, H, T, hs) in layer i after the filled positions; return all so far."""
        t0, t1 = self.length, self.length + k.shape[2]
        self.k[i, :, :, t0:t1] = k
        self.v[i, :, :, t0:t1] = v
        return self.k[i, :, :, :t1], self.v[i, :, :, :t1]  # (B, H, t1, hs)


def attention(q, k, v, pos0: int, path: str):
    """Causal attention of queries at positions pos0.. over keys 0..Tk-1. q (B, H, T, hs)."""
    T, Tk = q.shape[2], k.shape[2]
    if path == "sdpa":
        if T == 1:  # one new token sees every cached key
            return F.scaled_dot_product_attention(q, k, v)
        if pos0 == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_keep(T, Tk, pos0))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, Tk)
    if T > 1:
        att = att.masked_fill(~_causal_keep(T, Tk, pos0), float("-inf"))
    att = F.softmax(att, dim=-1)
    return att @ v  # (B, H, T, hs)


def hidden(P: dict, cfg, idx, path: str = "eager", kv: KVCache | None = None):
    """The final LayerNorm's output (B, T, C) for tokens idx (B, T), optionally KV-cached."""
    B, T = idx.shape
    C, nh = cfg.n_embd, cfg.n_head
    pos0 = kv.length if kv is not None else 0
    x = F.embedding(idx, P["transformer.wte.weight"]) + P["transformer.wpe.weight"][pos0 : pos0 + T]
    for i in range(cfg.n_layer):
        p = _block(P, i)
        h = F.layer_norm(x, (C,), p["ln_1.weight"], p["ln_1.bias"], eps=1e-5)
        q, k, v = _linear(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"]).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv is not None:
            k, v = kv.append(i, k, v)  # (B, nh, pos0 + T, hs)
        y = attention(q, k, v, pos0, path).transpose(1, 2).contiguous().view(B, T, C)
        x = x + _linear(y, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
        h = F.layer_norm(x, (C,), p["ln_2.weight"], p["ln_2.bias"], eps=1e-5)
        h = F.gelu(_linear(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"]), approximate="tanh")
        x = x + _linear(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    if kv is not None:
        kv.length += T
    return F.layer_norm(x, (C,), P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], eps=1e-5)


def loss(P: dict, cfg, idx, targets, path: str = "eager"):
    """Mean cross-entropy of targets (B, T) after tokens idx (B, T); LM head tied to wte."""
    logits = F.linear(hidden(P, cfg, idx, path), P["transformer.wte.weight"])  # (B, T, V)
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def adamw(P: dict, lr: float, betas, eps: float, weight_decay: float):
    """torch.optim.AdamW with weight decay on the matrices (ndim >= 2) only."""
    decay = [p for p in P.values() if p.ndim >= 2]
    rest = [p for p in P.values() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def _last_logits(P: dict, cfg, ids, path: str, kv: KVCache):
    x = hidden(P, cfg, torch.tensor([ids]), path, kv)[:, -1]  # (1, C)
    return F.linear(x, P["transformer.wte.weight"])  # (1, V)


@torch.inference_mode()
def generate(P: dict, cfg, prompt, max_new_tokens: int, path: str = "eager") -> list:
    """Greedy new token ids after prompt (ids, at most block_size), batch 1, KV-cached."""
    ids = [int(t) for t in prompt]
    kv = KVCache(cfg, 1)
    logits = _last_logits(P, cfg, ids, path, kv)
    new = []
    for i in range(max_new_tokens):
        token = int(logits[0].argmax())
        new.append(token)
        ids.append(token)
        if i == max_new_tokens - 1:
            break
        if kv.length == kv.capacity:  # full: rebuild from the last half context, as ours does
            kv = KVCache(cfg, 1)
            logits = _last_logits(P, cfg, ids[-(cfg.block_size // 2) :], path, kv)
        else:
            logits = _last_logits(P, cfg, [token], path, kv)
    return new
