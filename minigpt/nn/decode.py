"""Batched decode: one new token for each of B sequences, each with its own KV cache.

A decode step of a real-size model is mostly weight products, and a weight product of B rows reads
each weight once, however many rows it has. So the step stacks the sequences' new tokens into one
(B, C) activation and runs every linear layer, the MLP and the LM head once over all of them; only
attention, whose operands (each sequence's cached keys and values) differ per sequence, runs per
sequence against its own cache: on NumPy's path one sequence at a time, on the compiled kernels
(nn.fused()) all of them in one call per operation (kernels/attend.py; _each_in_one_call). The
caches can hold different lengths (ragged): sequence b's token sits at position caches[b].length,
and each cache advances by one.

`extend_step` is the general case: sequence b appends any number of new tokens (a prompt into a
fresh cache, or one decode token), all of them stacked into the same products, each sequence's
queries attending causally to its own cache; it returns each sequence's last position's logits.
A server prefills the prompts that arrive together in one such step: a prefill of a short prompt
is bound by its arithmetic, so its products gain from more rows as a decode step's do.

Where the step would run only compiled kernels (packed or prepared float32 weights, one new token
per sequence, float caches), everything after the embedding runs in one compiled call instead
(nn/compiled.py, kernels/step.py): the same kernels in the same order, the same logits and records.

Every product and elementwise pass goes through the same counted helpers as the model's other
paths (layers.py, quant.py), so the records are the meter's usual ones; the closed form predicts a
step of B sequences at their lengths (closed_form.predict_decode_batch), and an extend step of
any spans (closed_form.predict_extend).
"""

import functools
import math

import numpy as np

from minigpt import backend
from minigpt.config import is_moe_block
from minigpt.counting import scopes
from minigpt.counting.meter import METER
from minigpt.nn import compiled, moe, quant
from minigpt.nn import layers as nn


def embed(model, tokens, positions):
    """Token plus position embedding of one token per sequence: (B, C), tokens and positions (B,).
    Counted as the prefill's lookup: the ids, one table row and one position row per sequence."""
    p = model.params
    wpe = p["transformer.wpe.weight"]
    C = wpe.shape[1]
    q = model.quant
    if q is not None and q.qcfg.quantize_embedding:
        with METER.op(kind="embedding", op="lookup_int8") as c:
            out = q.wte_q[tokens].astype(wpe.dtype)  # (B, C)
            out *= q.wte_scale[tokens][:, None]
            out += wpe[positions]
            B = len(tokens)
            c.count(elements=out.size,
                    bytes_read=tokens.nbytes + B * (C + q.wte_scale.itemsize) + B * C * wpe.itemsize,
                    bytes_written=out.nbytes, dtype=out.dtype)
        return out
    wte = p["transformer.wte.weight"]
    with METER.op(kind="embedding", op="lookup") as c:
        out = wte[tokens] + wpe[positions]  # (B, C)
        c.count(elements=out.size, bytes_read=tokens.nbytes + 2 * len(tokens) * C * wte.itemsize,
                bytes_written=out.nbytes, dtype=out.dtype)
    return out


def _attend(q, k, v, slot, hs, y):
    """One sequence's attention for its T new tokens: q, k, v (1, H, T, hs) views; slot its
    cache's layer slot (float or int8). Writes the heads' outputs into y (1, T, H, hs). A query
    sees the cached keys and the new ones up to its own."""
    xp = backend.xp
    pos0 = slot.length
    H, T = q.shape[1], q.shape[2]
    if not slot.int8:
        slot.append(k, v)
        nn.cached_attention(q, *slot.arrays(), pos0 + T, y)
        return
    useful = nn.useful_causal_flops(1, H, T, pos0, hs)
    kq, ks, vq, vs = slot.append(k, v)  # int8 (1, H, Tk, hs) and their scales (1, H, Tk, 1)
    with METER.scope(scopes.SCORES):
        att = METER.matmul_w8(q, xp.ascontiguousarray(kq.swapaxes(-1, -2)), op="q@kT", useful_flops=useful)
        att = quant.rescale(att, (ks.swapaxes(-1, -2),), att.dtype)  # one scale per key
    with METER.scope(scopes.SOFTMAX):
        nn.causal_softmax_forward(att, 1.0 / math.sqrt(hs), pos0)
    with METER.scope(scopes.MIX):
        att = quant.rescale(att, (vs.swapaxes(-1, -2),), att.dtype)  # the value scales folded in
        y[...] = METER.matmul_w8(att, xp.ascontiguousarray(vq), op="att@v",
                                 useful_flops=useful).transpose(0, 2, 1, 3)


def block_step(x, p, cfg, attend, moe_block: bool):
    """One block for the step's new tokens, one row each: x (R, C). attend(q, k, v, y) runs the
    attention of the new tokens against the caches: q, k, v (R, H, 1, hs) views, y (R, 1, H, hs)
    to fill. decode_step's and extend_step's attend each sequence's rows to its own cache;
    model.block_decode's attends B rows of one cache together. The LayerNorms, the residual add
    before ln_2, c_fc's bias with the GELU and attention's softmax follow the schedule of
    block_forward (nn.fused(): one compiled pass each, about a microsecond for a row where
    NumPy's passes take ten). Returns x (R, C)."""
    xp = backend.xp
    B, C = x.shape  # B: the rows
    H = cfg.n_head
    hs = C // H
    with METER.scope(scopes.LN_1):
        h, _ = nn.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    with METER.scope(scopes.ATTN):
        with METER.scope(scopes.C_ATTN):
            qkv, _ = nn.linear_forward(h, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # (B, 3C)
        q, k, v = qkv.reshape(B, 1, 3, H, hs).transpose(2, 0, 3, 1, 4)  # each (B, H, 1, hs)
        y = xp.empty((B, 1, H, hs), dtype=x.dtype)
        attend(q, k, v, y)
        with METER.scope(scopes.C_PROJ):
            a, _ = nn.linear_forward(y.reshape(B, C), p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    x, h, _ = nn.block_residual_norm(x, a, p["ln_2.weight"], p["ln_2.bias"])
    with METER.scope(scopes.MLP):
        if moe_block:
            m, _ = moe.moe_forward(h.reshape(B, 1, C), p, cfg)
            m = m.reshape(B, C)
        elif nn.fuses_mlp(p):
            with METER.scope(scopes.C_FC):
                f = nn.weight_product(h, p["mlp.c_fc.weight"])  # (B, 4C), its bias added by the GELU
            with METER.scope(scopes.GELU):
                g, _ = nn.bias_gelu_forward(f, p["mlp.c_fc.bias"])
            with METER.scope(scopes.C_PROJ):
                m, _ = nn.linear_forward(g, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
        else:
            with METER.scope(scopes.C_FC):
                f, _ = nn.linear_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # (B, 4C)
            with METER.scope(scopes.GELU):
                g, _ = nn.gelu_tanh(f)
            with METER.scope(scopes.C_PROJ):
                m, _ = nn.linear_forward(g, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    with METER.scope(scopes.RESIDUAL_2):
        return nn.residual_forward(x, m)


def _each_to_its_cache(slots, spans, hs):
    """The step's attend: sequence b's rows spans[b] = (r0, r1) against its own cache's slot."""
    def attend(q, k, v, y):  # q, k, v (R, H, 1, hs), y (R, 1, H, hs): one row a new token
        for slot, (r0, r1) in zip(slots, spans):
            n = r1 - r0
            _attend(*(a[r0:r1].transpose(2, 1, 0, 3) for a in (q, k, v)), slot, hs,
                    y[r0:r1].reshape(1, n, *y.shape[2:]))
    return attend


def _all_in_one_call(caches, counts) -> bool:
    """Whether the step's attention runs for every sequence in one call per operation
    (_each_in_one_call): the compiled kernels are on (nn.fused(): Numba, host memory), every
    sequence adds one token, and every cache holds floats. Otherwise each sequence runs its own."""
    return nn.fused() and all(n == 1 for n in counts) and not any(kv.int8 for kv in caches)


def _each_in_one_call(caches, hs):
    """The step's attend for layer i, attend(i, q, k, v, y), with every sequence's one new token
    against its own float cache in three compiled calls (kernels/attend.py: the scores, which also
    store the new key and value, the softmax, the mix). Records: the per-sequence path's
    (nn.cached_attention's, summed over the sequences), one call each."""
    from numba.typed import List

    from minigpt.kernels import attend as kernel
    from minigpt.kernels import quant as quant_kernels
    from minigpt.kernels.fused import fast

    keys, values = List(), List()
    for kv in caches:
        keys.append(kv.k)
        values.append(kv.v)
    lengths = np.array([kv.length + 1 for kv in caches], dtype=np.int64)  # the new token's included
    longest, n = int(lengths.max()), int(lengths.sum())
    # The kernels run sequences (or parts of their heads) in parallel, on every core where that
    # gains (layers.attention_threads; the timings: docs/benchmarks.md).
    every = quant_kernels.product_threads()
    threads, parts = nn.attention_threads(len(caches), n * caches[0].k[0, 0, 0].nbytes, every,
                                          quant_kernels.own_threads())
    run = quant_kernels.on_threads if threads == every else (lambda f, *args: f(*args))

    def attend(i, q, k, v, y):  # q, k, v (B, H, 1, hs) views, y (B, 1, H, hs)
        B, H = q.shape[:2]
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (B, H, hs) views into c_attn's output
        q = np.ascontiguousarray(q)  # unit strides known when compiled: the dot products vectorise (3x)
        att = np.empty((B, H, longest), dtype=q.dtype)
        out = y.reshape(B, H, hs)
        scores, softmax, mix = nn.many_caches_attention_sizes(q, n, out)
        with METER.scope(scopes.SCORES):
            t0 = METER.clock()
            run(kernel.scores, q, k, v, keys, values, i, lengths, att, parts)
            METER.add(kind="matmul", op="q@kT", dtype=att.dtype, flops=scores[0], seconds=METER.clock() - t0,
                      bytes_read=scores[1], bytes_written=scores[2])
        with METER.scope(scopes.SOFTMAX), METER.op(kind="softmax", op="causal_fused") as c:
            run(kernel.softmax, att, lengths, 1.0 / math.sqrt(hs), fast(att))
            c.count(*softmax, dtype=att.dtype)
        with METER.scope(scopes.MIX):
            t0 = METER.clock()
            run(kernel.mix, att, values, i, lengths, out, parts)
            METER.add(kind="matmul", op="att@v", dtype=att.dtype, flops=mix[0], seconds=METER.clock() - t0,
                      bytes_read=mix[1], bytes_written=mix[2])
    return attend


def decode_step(model, tokens, caches: list):
    """Next-token logits (B, V) after tokens (B,) ids, one per sequence, each sequence's KV cache
    (batch 1) in caches; each cache advances by one. See the module's docstring."""
    if not isinstance(tokens, np.ndarray):  # a list of ids, or an array of the active module
        tokens = backend.to_host(tokens) if hasattr(tokens, "get") else np.asarray(tokens)
    tokens = tokens.astype(np.int64, copy=False).reshape(-1)
    if tokens.shape[0] != len(caches):
        raise ValueError(f"decode_step: {tokens.shape[0]} tokens for {len(caches)} caches")
    return _step(model, tokens, [1] * len(caches), caches, "decode_step")


def extend_step(model, token_lists: list, caches: list):
    """Logits (B, V) at the last new position of each sequence after appending token_lists[b]
    (one or more ids) to caches[b] (batch 1, any length, room for them); caches advance by their
    token counts. Sequence b's positions continue from caches[b].length."""
    if len(token_lists) != len(caches):
        raise ValueError(f"extend_step: {len(token_lists)} token lists for {len(caches)} caches")
    counts = [int(np.size(t)) for t in token_lists]
    if not all(counts):
        raise ValueError("extend_step: a sequence with no new tokens")
    tokens = np.concatenate([np.asarray(t.get() if hasattr(t, "get") else t, dtype=np.int64).reshape(-1)
                             for t in token_lists]) if counts else np.zeros(0, np.int64)
    return _step(model, tokens, counts, caches, "extend_step")


def _step(model, tokens, counts: list[int], caches: list, name: str):
    """The step itself: tokens (R,) host ids, sequence b's counts[b] of them in order."""
    cfg = model.cfg
    B = len(caches)
    if B == 0:
        raise ValueError(f"{name}: no sequences")
    for b, (kv, n) in enumerate(zip(caches, counts)):
        if kv.k.shape[1] != 1:
            raise ValueError(f"{name}: cache {b} holds a batch of {kv.k.shape[1]}, not 1")
        room = min(cfg.block_size, kv.capacity)
        if kv.length + n > room:
            raise ValueError(f"{name}: cache {b} is full (position {kv.length + n - 1} exceeds "
                             f"{'block_size ' if room == cfg.block_size else 'its room of '}{room})")
    ends = np.cumsum(counts)
    spans = list(zip((ends - counts).tolist(), ends.tolist()))
    positions = np.concatenate([np.arange(kv.length, kv.length + n) for kv, n in zip(caches, counts)])
    tokens, positions = backend.asarray(tokens), backend.asarray(positions)
    with METER.scope(scopes.EMBEDDING):
        x = embed(model, tokens, positions)
    if compiled.usable(model, caches, counts):  # the rest in one compiled call (nn/compiled.py)
        logits = compiled.decode_step(model, x, caches)
        for kv in caches:
            kv.length += 1
        return logits
    hs = cfg.n_embd // cfg.n_head
    one_call = _each_in_one_call(caches, hs) if _all_in_one_call(caches, counts) else None
    for i in range(cfg.n_layer):
        with METER.scope(scopes.block(i)):
            if one_call is not None:
                attend = functools.partial(one_call, i)
            else:
                attend = _each_to_its_cache([kv.layer(i) for kv in caches], spans, hs)
            x = block_step(x, model.decode_params(i), cfg, attend, is_moe_block(cfg, i))
    for kv, n in zip(caches, counts):
        kv.length += n
    p = model.params
    with METER.scope(scopes.LN_F):
        if len(x) > B:  # only each sequence's last row goes on to the head
            last = backend.asarray(ends - 1)
            with METER.op(kind="gather", op="last_rows") as c:
                x = x[last]
                c.count(elements=x.size, bytes_read=x.nbytes + last.nbytes, bytes_written=x.nbytes,
                        dtype=x.dtype)
        x, _ = nn.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    return model._lm_head(x.reshape(B, 1, -1))[0].reshape(B, -1)
