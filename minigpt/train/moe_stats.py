"""Mixture-of-experts bookkeeping for a training run: the load-balancing loss and the expert load.

After every step the trainer hands this module what each micro-batch's forward routed
(GPT.routing: a moe.Routing per MoE block); it adds the assignments per expert, the dropped ones
and the auxiliary loss into the run state (so they survive a checkpoint and a resume), and the log
line and the end-of-run report read them back.
"""

from functools import partial

from minigpt import units
from minigpt.counting import closed_form as cost_model


def add_step(state, routings: list) -> None:
    """routings: one {block index: Routing} per micro-batch of the step just taken."""
    if not routings or not routings[0]:
        return
    state.aux_sum += sum(sum(r.aux_loss for r in m.values()) for m in routings) / len(routings)
    for m in routings:
        for i, r in m.items():
            for load in (state.expert_load, state.load_since_log):
                row = load.setdefault(f"h{i}", [0] * len(r.assigned))
                for e, n in enumerate(r.assigned):
                    row[e] += n
            state.dropped += r.dropped
            state.dropped_since_log += r.dropped


def log_fields(state) -> dict:
    """The log line's MoE fields (empty for a dense model); resets the since-last-log counts."""
    if not state.load_since_log:
        return {}
    steps = max(state.loss_count, 1)
    out = {"aux_loss": state.aux_sum / steps, "expert_load": state.load_since_log,
           "imbalance": {h: imbalance(row) for h, row in state.load_since_log.items()},
           "dropped": state.dropped_since_log}
    state.aux_sum, state.load_since_log, state.dropped_since_log = 0.0, {}, 0
    return out


def imbalance(row: list) -> float:
    """max / mean of the assignments per expert: 1 is perfectly balanced, E is all on one."""
    mean = sum(row) / len(row)
    return max(row) / mean if mean else float("nan")


def summary_lines(cfg, state, records: dict, tokens: int) -> list[str]:
    """The end-of-run report's MoE paragraph: parameters, FLOPs per token, expert load."""
    m, t = cfg.model, cfg.train
    if m.n_experts <= 1:
        return []
    n_moe = cost_model.moe_blocks(m)
    cap = "dropless" if m.capacity_factor <= 0 else f"capacity factor {m.capacity_factor:g}"
    B, T, A = t.batch_size, m.block_size, t.grad_accum
    step = cost_model.total_flops(cost_model.predict_training_step(m, B, T, A)) / (A * B * T)
    fwd = cost_model.total_flops(cost_model.predict_forward(m, B, T, targets=True)) / (B * T)
    measured = sum(r.flops for k, r in records.items() if k.phase in ("forward", "backward", "optimizer"))
    flops_text = partial(units.si, sep="", down_to=1e3)  # 12.3M: prefixes from k up
    lines = [
        (f"mixture of experts: {m.n_experts} experts, top-{m.experts_per_token}, in {n_moe} of "
         f"{m.n_layer} blocks, {cap}, aux loss coefficient {m.aux_loss_coef:g}"),
        (f"  parameters: {cost_model.n_params(m):,} total, {cost_model.n_active_params(m):,} active "
         f"per token"),
        (f"  FLOPs per token (closed form, balanced routing): forward {flops_text(fwd)}, training "
         f"step {flops_text(step)}; measured training step "
         f"{flops_text(measured / tokens) if tokens else 'n/a'}"),
        "  expert load over training (assignments per expert; imbalance = max / mean):",
    ]
    for h, row in state.expert_load.items():
        lines.append(f"    {h}: {' '.join(f'{n:,}' for n in row)}  imbalance {imbalance(row):.3f}")
    total = sum(sum(row) for row in state.expert_load.values())
    if m.capacity_factor > 0:
        share = state.dropped / total if total else 0.0
        lines.append(f"  dropped by the capacity limit: {state.dropped:,} of {total:,} assignments "
                     f"({100 * share:.2f}%)")
    return lines
