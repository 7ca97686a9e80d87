"""Scaling, the work: what a model at full size does, in FLOPs and bytes (no hardware, no energy).

The costs package runs one way down: a scenario (minigpt.scale.scenario) -> the work (this module:
FLOPs and bytes of training and serving; minigpt.scale.training: chip-hours) -> hardware and power
(minigpt.scale.chips) -> energy, carbon and water (minigpt.scale.footprint, on minigpt.energy.accounting's
Settings); minigpt.scale.estimate puts them together. No module imports one above it.

Training FLOPs are our closed form: every FLOP the meter would count in a training step of one
sequence of block_size tokens (forward, backward, clip + AdamW), times tokens / block_size. The
functions below (forward_flops, backward_flops, training_step_flops, arch_params) are thin wrappers
over minigpt.counting.closed_form, the one closed form, whose records the meter's own counts equal; beside
it, the 6·N·D convention.

Mixture of experts (n_experts, experts_per_token, moe_every; minigpt/nn/moe.py trains them): each
MoE block's MLP becomes n_experts MLPs plus a linear router (n_embd × n_experts, no bias). Total
params count all experts, active params only experts_per_token of them; training FLOPs are the
closed form's under balanced routing (every expert computes N·k/E tokens), so they use the active
experts (the optimizer still updates every parameter). Routing's elementwise work (router softmax,
top-k, gate renormalisation, the load-balancing loss, and the dispatch/combine passes that move each
token to its experts and back) is counted too, exactly as the meter counts it in the NumPy model.

Serving's work: a decode step streams the weights it uses (all experts that any of the batch's
tokens picks, under uniform routing) plus the KV cache, and does a forward's FLOPs
(minigpt.scale.serving turns them into seconds and energy).
"""

from dataclasses import dataclass

from minigpt.counting import closed_form as cost_model
from minigpt.scale.scenario import Scenario
from minigpt.scale.scenario import load as load_scenario  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Arch:
    """A GPT-2 architecture, optionally with mixture-of-experts MLPs: the fields
    minigpt.counting.closed_form reads from a ModelConfig, so the one closed form serves both."""

    n_layer: int
    n_embd: int
    n_head: int
    block_size: int
    vocab_size: int
    n_experts: int = 1
    experts_per_token: int = 1
    moe_every: int = 1
    capacity_factor: float = 0.0  # 0: dropless (balanced routing drops nothing then anyway)
    dropout: float = 0.0


def arch_of(scn: Scenario) -> Arch | None:
    m = scn.values.get("model", {})
    if "n_layer" not in m:
        return None
    return Arch(m["n_layer"], m["n_embd"], m["n_head"], m["block_size"], m["vocab_size"],
                m.get("n_experts", 1), m.get("experts_per_token", 1), m.get("moe_every", 1))


def mlp_params(C: int) -> int:
    return cost_model.mlp_params(C)


def arch_params(a: Arch) -> tuple[int, int]:
    """(total, active) parameters: minigpt.counting.closed_form.n_params and n_active_params."""
    return cost_model.n_params(a), cost_model.n_active_params(a)


def forward_flops(a: Arch, B: int, T: int, pos0: int = 0, last_only: bool = False,
                  targets: bool = False) -> int:
    """FLOPs of a forward of B sequences of T new tokens after pos0 (all kinds, dropout 0;
    MoE blocks under balanced routing)."""
    return cost_model.total_flops(cost_model.forward_records(a, B, T, pos0, last_only, targets))


def backward_flops(a: Arch, B: int, T: int) -> int:
    """FLOPs of the backward of a B x T training forward (all kinds, dropout 0)."""
    return cost_model.total_flops(cost_model.backward_records(a, B, T))


def training_step_flops(a: Arch, B: int, T: int) -> int:
    """One optimizer step on B x T tokens: forward with loss, backward, clip (3) + AdamW (14)."""
    return cost_model.total_flops(cost_model.predict_training_step(a, B, T))


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
    experts = cost_model.moe_blocks(a) * mlp_params(a.n_embd)  # one expert in every MoE block
    return params - (a.n_experts - experts_touched(a, tokens)) * experts


def model_size(scn: Scenario) -> tuple[float | None, float | None, tuple[int, int] | None]:
    """(params, active params, the closed form's (total, active) or None); None: not given."""
    m = scn.values.get("model", {})
    a = arch_of(scn)
    computed = arch_params(a) if a else None
    params = m.get("params", computed[0] if computed else None)
    active = m.get("active_params", params if "params" in m else computed[1] if computed else None)
    return params, active, computed


@dataclass(frozen=True)
class TrainingFlops:
    """The training work: each way of counting it, and the one the costs use."""

    tokens: float | None  # [training] tokens
    closed_form: float | None  # ours: training_step_flops × tokens / block_size
    six_nd: float | None  # 6 × active params × tokens
    published: float | None  # [training] flops
    used: float | None  # published, else ours, else 6ND
    used_is: str  # "published", "closed form", "6ND" or "not given"

    def to_json(self) -> dict:
        return {"train_tokens": self.tokens, "train_flops": self.closed_form,
                "train_flops_6nd": self.six_nd, "train_flops_published": self.published,
                "train_flops_used": self.used, "train_flops_used_is": self.used_is}


def training_flops(scn: Scenario, a: Arch | None, active: float | None) -> TrainingFlops:
    """The training work in whatever terms the scenario gives: published FLOPs, our closed form of
    tokens on an architecture, or 6 × active params × tokens; "not given" when none can be had."""
    D = scn.get("training", "tokens")
    six = 6 * active * D if active and D else None
    ours = training_step_flops(a, 1, a.block_size) * D / a.block_size if a and D else None
    published = scn.get("training", "flops")
    used = published or ours or six
    return TrainingFlops(D, ours, six, published, used,
                         "published" if published else "closed form" if ours else
                         "6ND" if six else "not given")
