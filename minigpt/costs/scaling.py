"""Scaling, the work: what a model at full size does, in FLOPs and bytes (no hardware, no energy).

The costs package runs one way down: a scenario (minigpt.costs.scenario) -> the work (this module:
FLOPs and bytes of training and serving; minigpt.costs.training: chip-hours) -> hardware and power
(minigpt.costs.chips) -> energy, carbon and water (minigpt.costs.footprint, on minigpt.costs.energy's
Settings); minigpt.costs.scale_report puts them together. No module imports one above it.

Training FLOPs are our closed form: every FLOP the meter would count in a training step of one
sequence of block_size tokens (forward, backward, clip + AdamW), times tokens / block_size. It is
written out below term by term and tested equal to minigpt.costs.model.predict_training_step, which
the meter's own counts equal; beside it, the 6·N·D convention.

Mixture of experts (n_experts, experts_per_token; scaling only: the NumPy model has none): every
block's MLP becomes n_experts MLPs plus a linear router (n_embd × n_experts, no bias). Total params
count all experts, active params only experts_per_token of them; training FLOPs use the active ones
(the optimizer still updates every parameter). Routing's elementwise work is not counted.

Serving's work: a decode step streams the weights it uses (all experts that any of the batch's
tokens picks, under uniform routing) plus the KV cache, and does a forward's FLOPs
(minigpt.costs.serving turns them into seconds and energy).
"""

from dataclasses import dataclass

from minigpt.costs.scenario import Scenario
from minigpt.costs.scenario import load as load_scenario  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Arch:
    """A GPT-2 architecture, optionally with mixture-of-experts MLPs."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    n_experts: int = 1
    experts_per_token: int = 1


def arch_of(scn: Scenario) -> Arch | None:
    m = scn.values.get("model", {})
    if "n_layer" not in m:
        return None
    return Arch(m["n_layer"], m["n_embd"], m["n_head"], m["block_size"], m["vocab_size"],
                m.get("n_experts", 1), m.get("experts_per_token", 1))


def mlp_params(C: int) -> int:
    return 8 * C * C + 5 * C  # c_fc (C, 4C) + bias 4C, c_proj (4C, C) + bias C


def arch_params(a: Arch) -> tuple[int, int]:
    """(total, active) parameters: wte, wpe, blocks, ln_f, as minigpt.costs.model.n_params."""
    C, L, E, k = a.n_embd, a.n_layer, a.n_experts, a.experts_per_token
    dense = a.vocab_size * C + a.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    router = L * C * E if E > 1 else 0
    total = dense + L * (E - 1) * mlp_params(C) + router
    return total, dense + L * (k - 1) * mlp_params(C) + router


def forward_flops(a: Arch, B: int, T: int, pos0: int = 0, last_only: bool = False,
                  targets: bool = False) -> int:
    """FLOPs of a forward of B sequences of T new tokens after pos0 (all kinds, dropout 0)."""
    C, H, V, L, k = a.n_embd, a.n_head, a.vocab_size, a.n_layer, a.experts_per_token
    N, Tk = B * T, pos0 + T  # tokens, keys attended to
    attn = 4 * B * T * Tk * C + 7 * B * H * T * Tk  # q@kT + att@v (over all heads) + softmax
    # ln_1 7, c_attn bias 3, c_proj bias 1, residual 1, ln_2 7, residual 1 (per token x channel)
    block = 8 * N * C * C + 20 * N * C + attn + k * (16 * N * C * C + 37 * N * C)
    block += 2 * N * C * a.n_experts if a.n_experts > 1 else 0  # router
    head = 2 * (B if last_only else N) * C * V + (5 * N * V if targets else 0)  # lm_head, loss
    return N * C + L * block + 7 * N * C + head  # embedding, blocks, ln_f, head


def backward_flops(a: Arch, B: int, T: int) -> int:
    """FLOPs of the backward of a B x T training forward (all kinds, dropout 0)."""
    C, H, V, L, k = a.n_embd, a.n_head, a.vocab_size, a.n_layer, a.experts_per_token
    N = B * T
    attn = 8 * B * T * T * C + 5 * B * H * T * T  # grad_att, grad_v, grad_q, grad_k + softmax
    # ln_2 11, residual 1, c_proj bias 1, c_attn bias 3, ln_1 11, residual 1
    block = 16 * N * C * C + 28 * N * C + attn + k * (32 * N * C * C + 49 * N * C)
    block += 4 * N * C * a.n_experts if a.n_experts > 1 else 0  # router
    return N * V + 4 * N * V * C + 11 * N * C + L * block + 2 * N * C  # loss, head, ln_f, ..., wte


def training_step_flops(a: Arch, B: int, T: int) -> int:
    """One optimizer step on B x T tokens: forward with loss, backward, clip (3) + AdamW (14)."""
    return forward_flops(a, B, T, targets=True) + backward_flops(a, B, T) + 17 * arch_params(a)[0]


def kv_bytes_per_token(a: Arch, kv_bits: int) -> float:
    return 2 * a.n_layer * a.n_embd * kv_bits / 8  # K and V, every layer, bytes


def experts_touched(a: Arch, tokens: int) -> float:
    """Expected distinct experts per layer that `tokens` tokens pick (uniform, independent)."""
    E, k = a.n_experts, a.experts_per_token
    return E * (1 - (1 - k / E) ** tokens) if E > 1 else 1.0


def weights_read(a: Arch | None, params: float, active: float, tokens: int) -> float:
    """Parameters one forward step over `tokens` tokens must read (all, bar unpicked experts).
    Without an expert layout (a stated count), one token reads the active ones, more read all."""
    if a is None or a.n_experts == 1:
        return active if tokens == 1 else params
    experts = a.n_layer * mlp_params(a.n_embd)  # one expert in every layer
    return params - (a.n_experts - experts_touched(a, tokens)) * experts


def model_size(scn: Scenario) -> tuple[float | None, float | None, tuple[int, int] | None]:
    """(params, active params, the closed form's (total, active) or None); None: not given."""
    m = scn.values.get("model", {})
    a = arch_of(scn)
    computed = arch_params(a) if a else None
    params = m.get("params", computed[0] if computed else None)
    active = m.get("active_params", params if "params" in m else computed[1] if computed else None)
    return params, active, computed


def training_flops(scn: Scenario, a: Arch | None, active: float | None) -> dict:
    """The training work in whatever terms the scenario gives: published FLOPs, our closed form of
    tokens on an architecture, or 6 × active params × tokens; "not given" when none can be had."""
    D = scn.get("training", "tokens")
    six = 6 * active * D if active and D else None
    ours = training_step_flops(a, 1, a.block_size) * D / a.block_size if a and D else None
    published = scn.get("training", "flops")
    used = published or ours or six
    return {"train_tokens": D, "train_flops": ours, "train_flops_6nd": six,
            "train_flops_published": published, "train_flops_used": used,
            "train_flops_used_is": ("published" if published else "closed form" if ours else
                                    "6ND" if six else "not given")}
