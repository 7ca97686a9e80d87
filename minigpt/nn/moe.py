"""Mixture-of-experts MLP: a linear router sends each token to experts_per_token of n_experts MLPs.

For tokens x (N, C) and router weights Wr (C, E), no bias:

    p = softmax(x Wr)                        (N, E) router probabilities
    top = the k largest p of each token      (N, k) expert ids, best first
    g = p[top] / sum(p[top])                 (N, k) gates, renormalised over the k picks
    out[n] = sum over picks j of g[n, j] * expert_top[n,j](x[n])

Each expert is GPT-2's MLP (c_fc, GELU, c_proj) run on just the tokens routed to it, gathered into a
contiguous block ("dispatch") and added back scaled by their gates ("combine"). Dispatch is dropless
by default; with capacity_factor > 0 an expert computes at most ceil(capacity_factor * N * k / E)
tokens, first come in token order, and the rest of its assignments are dropped (they add nothing).

The Switch Transformer load-balancing loss, aux = coef * E * sum_e f_e * P_e (f_e: the share of
the N * k assignments routed to expert e, before drops; P_e: the mean of p[:, e]), is returned in
the cache; the model adds it to the objective. f is a count, so its gradient flows through P only.

Counting: the router's product and its elementwise passes are under the scope "router", each
expert's products under "expert<e>" (e.g. h0.mlp.expert3.c_fc), with the tokens it computed; the
gather and scatter are the "dispatch" and "combine" kinds (minigpt.counting.meter.FLOPS_PER_ELEMENT). An
expert no token reaches runs nothing and records nothing.
"""

from dataclasses import dataclass
from typing import NamedTuple

from minigpt import backend
from minigpt.config import expert_capacity
from minigpt.counting import scopes
from minigpt.counting.meter import METER, matmul
from minigpt.nn import layers as nn

MLP_NAMES = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


def expert_views(p: dict, e: int) -> dict:
    """Expert e's weights under the dense MLP's names (mlp.c_fc.weight, ...), for nn.mlp_*."""
    return {f"mlp.{n}": p[f"mlp.experts.{e}.{n}"] for n in MLP_NAMES}


@dataclass
class Routing:
    """What a MoE forward decided, for its backward and for the trainer's load statistics."""

    assigned: list  # assignments routed to each expert (before capacity drops)
    computed: list  # tokens each expert computed
    dropped: int  # assignments dropped by the capacity limit
    aux_loss: float  # coef * E * sum f_e P_e (already times coef)


class ExpertCache(NamedTuple):
    """One expert's share of a MoE forward, for the backward."""

    ids: object  # (n_e,) its assignments (token * k + pick), in token order
    tok: object  # (n_e,) the token of each assignment
    gate: object  # (n_e,) the gate of each assignment
    out: object  # (n_e, C) the expert's MLP output, before the gates
    mlp: tuple  # nn.mlp_forward's cache


def moe_forward(x, p: dict, cfg):
    """x (..., C); p: the block's views (mlp.router.weight (C, E), mlp.experts.<e>.*); cfg: a
    ModelConfig (n_experts, experts_per_token, capacity_factor, aux_loss_coef).

    Returns (out, cache); cache.routing (a Routing) says what was routed where."""
    xp = backend.xp
    C, E, k = x.shape[-1], cfg.n_experts, cfg.experts_per_token
    x2 = x.reshape(-1, C)  # (N, C)
    N, s = x2.shape[0], x2.itemsize
    with METER.scope(scopes.ROUTER):
        logits = matmul(x2, p["mlp.router.weight"], op="x@w")  # (N, E)
        with METER.op(kind="router", op="softmax") as c:
            probs = logits - logits.max(axis=1, keepdims=True)
            xp.exp(probs, out=probs)
            probs /= probs.sum(axis=1, keepdims=True)  # (N, E)
            c.count(elements=N * E, bytes_read=logits.nbytes, bytes_written=probs.nbytes,
                    dtype=x2.dtype)
        with METER.op(kind="router", op="top_k") as c:
            top = xp.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k) expert ids
            c.count(elements=N * E, bytes_read=probs.nbytes, bytes_written=top.nbytes,
                    dtype=x2.dtype)
        with METER.op(kind="router", op="renormalize") as c:
            picked = xp.take_along_axis(probs, top, axis=1)  # (N, k)
            total = picked.sum(axis=1, keepdims=True)  # (N, 1)
            gates = picked / total  # (N, k)
            c.count(elements=N * k, bytes_read=picked.nbytes + top.nbytes,
                    bytes_written=gates.nbytes + total.nbytes, dtype=x2.dtype)
        with METER.op(kind="router", op="aux_loss") as c:
            assigned = xp.bincount(top.reshape(-1), minlength=E)  # (E,) assignments per expert
            share = (assigned / (N * k)).astype(x2.dtype)  # f_e
            mean_prob = probs.mean(axis=0)  # P_e
            aux = cfg.aux_loss_coef * E * float((share * mean_prob).sum())
            c.count(elements=N * E, bytes_read=probs.nbytes + top.nbytes, bytes_written=2 * E * s,
                    dtype=x2.dtype)

    # Assignments (token n, pick j) are numbered n * k + j; grouped by expert, token order within.
    order = xp.argsort(top.reshape(-1), kind="stable")  # (N * k,)
    assigned_host = [int(a) for a in backend.to_host(assigned)]
    cap = expert_capacity(cfg, N)
    flat_gates = gates.reshape(-1)  # (N * k,)
    out = xp.zeros_like(x2)  # (N, C)
    experts, start = [], 0
    for e in range(E):
        ids = order[start : start + assigned_host[e]]  # this expert's assignments
        start += assigned_host[e]
        if cap is not None:
            ids = ids[:cap]
        if ids.shape[0] == 0:
            experts.append(None)
            continue
        tok = ids // k  # (n_e,) token of each assignment
        g = flat_gates[ids]  # (n_e,)
        with METER.scope(scopes.expert(e)):
            with METER.op(kind="dispatch", op="gather") as c:
                xe = x2[tok]  # (n_e, C)
                c.count(elements=xe.size, bytes_read=xe.nbytes + tok.nbytes,
                        bytes_written=xe.nbytes, dtype=xe.dtype)
            ye, mlp = nn.mlp_forward(xe, expert_views(p, e))  # (n_e, C)
            with METER.op(kind="combine", op="scatter") as c:
                out[tok] += g[:, None] * ye  # a token meets each expert at most once
                c.count(elements=ye.size, bytes_read=2 * ye.nbytes + g.nbytes + tok.nbytes,
                        bytes_written=ye.nbytes, dtype=ye.dtype)
        experts.append(ExpertCache(ids, tok, g, ye, mlp))
    computed = [0 if ex is None else int(ex.ids.shape[0]) for ex in experts]
    routing = Routing(assigned_host, computed, N * k - sum(computed), aux)
    cache = MoECache(x2, probs, top, gates, total, share, experts, routing,
                      (E, k, cfg.aux_loss_coef), x.shape)
    return out.reshape(x.shape), cache


@dataclass
class MoECache:
    x2: object
    probs: object
    top: object
    gates: object
    total: object
    share: object
    experts: list  # an ExpertCache per expert, None for an expert no token reached
    routing: Routing
    sizes: tuple
    shape: tuple


def moe_backward(dout, cache: MoECache, p: dict, g: dict, daux: float = 1.0):
    """Adds into g's router and expert views; returns dx. daux: the aux loss's weight in the
    objective whose gradient dout is (1 for loss + aux; the trainer passes its dloss)."""
    xp = backend.xp
    E, k, coef = cache.sizes
    x2, probs, top, gates = cache.x2, cache.probs, cache.top, cache.gates
    N, C = x2.shape
    s = x2.itemsize
    d2 = dout.reshape(N, C)
    dgates = xp.zeros(N * k, dtype=x2.dtype)  # per assignment; dropped ones stay 0
    dys = []
    for e, ex in enumerate(cache.experts):
        if ex is None:
            dys.append(None)
            continue
        ids, tok, gate, ye = ex.ids, ex.tok, ex.gate, ex.out
        with METER.scope(scopes.expert(e)), METER.op(kind="combine", op="grad") as c:
            rows = d2[tok]  # (n_e, C)
            dgates[ids] = (rows * ye).sum(axis=1)  # d out / d gate = the expert's output
            rows *= gate[:, None]  # the expert's dout
            c.count(elements=ye.size, bytes_read=2 * ye.nbytes + gate.nbytes + tok.nbytes,
                    bytes_written=rows.nbytes + gate.nbytes, dtype=ye.dtype)
        dys.append(rows)
    with METER.scope(scopes.ROUTER):
        with METER.op(kind="router", op="renormalize_grad") as c:
            dg = dgates.reshape(N, k)
            # gates = picked / total: d picked_j = (dg_j - sum_i dg_i gates_i) / total
            dpicked = (dg - (dg * gates).sum(axis=1, keepdims=True)) / cache.total  # (N, k)
            dprobs = xp.zeros_like(probs)  # (N, E)
            dprobs[xp.arange(N)[:, None], top] = dpicked
            c.count(elements=N * k,
                    bytes_read=dg.nbytes + gates.nbytes + cache.total.nbytes + top.nbytes,
                    bytes_written=dprobs.nbytes, dtype=x2.dtype)
        with METER.op(kind="router", op="softmax_grad") as c:
            dprobs += (daux * coef * E / N) * cache.share  # d aux / d p[n, e] = coef E f_e / N
            dprobs -= (dprobs * probs).sum(axis=1, keepdims=True)
            dprobs *= probs  # d logits
            c.count(elements=N * E, bytes_read=dprobs.nbytes + probs.nbytes + E * s,
                    bytes_written=dprobs.nbytes, dtype=x2.dtype)
        w = p["mlp.router.weight"]
        g["mlp.router.weight"] += matmul(x2.T, dprobs, op="grad_w")  # (C, E)
        dx2 = matmul(dprobs, w.T, op="grad_x")  # (N, C)
    for e, ex in enumerate(cache.experts):
        if ex is None:
            continue
        tok = ex.tok
        with METER.scope(scopes.expert(e)):
            dxe = nn.mlp_backward(dys[e], ex.mlp, expert_views(p, e), expert_views(g, e))  # (n_e, C)
            with METER.op(kind="dispatch", op="grad") as c:
                dx2[tok] += dxe
                c.count(elements=dxe.size, bytes_read=2 * dxe.nbytes + tok.nbytes,
                        bytes_written=dxe.nbytes, dtype=dxe.dtype)
    return dx2.reshape(cache.shape)
