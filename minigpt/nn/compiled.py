"""The decode step in one compiled call (kernels/step.py), with every op's meter record.

nn/decode.py's step calls some 170 kernels a step of GPT-2 124M from Python, and the Python,
dispatch and meter between them cost 0.9-1.1 ms a step on our 2-core machine: hidden behind a
float32 step of 10-14 ms, but a third of a 4-bit step (bench/step_floor.py). Where it can, the
step runs its blocks and the LM head in one call of kernels/step.py's `decode_step` instead: the
same kernels on the same arrays in the same order, so the logits are the same bit for bit. It
can when the Python step would run exactly those kernels: the compiled schedule (layers.fused()),
one new token per sequence, float KV caches, a dense model, and weights the decode kernels take:
packed 16-, 8- or 4-bit ones (lowbit.PackedWeights) or float32 ones prepared for decoding
(GPT.prepare_decode's tiles). And the meter's clock must be the one the compiled step reads
(time.perf_counter on Linux: CLOCK_MONOTONIC). Anything else takes the Python step, as does
everything with ENABLED set False (benchmarks compare the two that way).

Records: the Python step's, key for key and count for count. The compiled step times each op
into an array; this module adds one record per op, under the scopes the Python step enters,
with the FLOPs and bytes the Python step's own helpers count from the arrays the kernels got
(layers.fused_norm_sizes, lowbit.product_counts, tiled.product_counts, ...). So the closed form
predicts them as it predicts the Python step's (tests/test_step.py compares both steps' records).
"""

import threading
import time

import numpy as np

from minigpt.config import is_moe_block
from minigpt.counting import scopes
from minigpt.counting.meter import FLOPS_PER_ELEMENT, METER, packed_dtype
from minigpt.kernels import quant as packed_kernels
from minigpt.nn import layers as nn
from minigpt.nn import lowbit, tiled
from minigpt.nn.layers import LAYERNORM_EPS
from minigpt.nn.lowbit import LINEAR_WEIGHTS

ENABLED = True  # False: every decode step takes nn/decode.py's Python path
# The compiled step reads CLOCK_MONOTONIC: the records' seconds agree with the meter's only
# where time.perf_counter reads the same clock.
_SAME_CLOCK = time.get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"


def usable(model, caches, counts) -> bool:
    """Whether a step of one new token per sequence (counts all 1) over `caches` runs compiled
    (the module's docstring says when)."""
    if not (ENABLED and _SAME_CLOCK and nn.fused() and METER.clock is time.perf_counter):
        return False
    if any(n != 1 for n in counts) or any(kv.int8 or kv.k.dtype != np.float32 for kv in caches):
        return False
    cfg = model.cfg
    if any(is_moe_block(cfg, i) for i in range(cfg.n_layer)) or model.params.data.dtype != np.float32:
        return False
    return isinstance(model.quant, lowbit.PackedWeights) or (
        model.quant is None and isinstance(model._head, tiled.TiledWeight))


def decode_step(model, x, caches):
    """The blocks, the final LayerNorm and the head for x (B, C), the step's embedded tokens
    (one a sequence, after nn/decode.py's embed), each caches[b] receiving sequence b's key and
    value at its length (the caller advances the lengths). Returns the logits (B, V)."""
    B = len(caches)
    plan = _plan(model, B)
    keys, values = plan.lists(caches)
    lengths = np.array([kv.length + 1 for kv in caches], dtype=np.int64)  # the new token's included
    n = int(lengths.sum())
    threads = packed_kernels.product_threads()
    # The attention on every core too, whatever its size: inside the call the workers still spin
    # from the product before it (GOMP_SPINCOUNT), so the Python step's PARALLEL_KEY_BYTES does
    # not apply (GPT-2, 64-token prompts, fp32: 4 sequences 9.75 -> 8.97 ms a step, 8 sequences
    # 12.99 -> 11.49). Fewer sequences than threads split their heads (layers.attention_threads).
    attention_threads, parts = threads, max(1, threads // B)
    logits = np.empty((B, plan.V), np.float32)
    seconds = np.zeros((model.cfg.n_layer + 1, len(plan.step.SLOTS)), np.int64)
    s = plan.scratch
    with plan.lock:  # the scratch is the plan's: one step at a time (the call lets go of the GIL)
        plan.step.decode_step(np.ascontiguousarray(x, np.float32), plan.weights, plan.scales, plan.biases,
                              plan.norms, plan.bf16, plan.bias_apart, LAYERNORM_EPS, model.cfg.n_head,
                              keys, values, lengths, plan.head, plan.head_scale, threads, attention_threads,
                              parts, s["h"], s["qkv"], s["q"], s["att"], s["y"], s["a"], s["f"], s["g"],
                              s["m"], s["mean"], s["rstd"], logits, seconds)
    if METER.enabled:
        plan.record(seconds, n)
    return logits


def _plan(model, B: int) -> "_Plan":
    """The model's plan for steps of B sequences, made once and kept on the model until its
    weights change layout (quantized, prepared, or a backward pass drops the tiles)."""
    plans = model.__dict__.setdefault("_compiled_plans", {})
    plan = plans.get(B)
    if plan is None or plan.quant is not model.quant or plan.head_weight is not model._head:
        plan = plans[B] = _Plan(model, B)
    return plan


class _Plan:
    """What the compiled step of B sequences takes (the kernels' arrays, scratch) and the records
    of its ops, counted once from those arrays (all but the attention's, counted every step from
    the caches' lengths)."""

    def __init__(self, model, B: int):
        from numba.typed import List

        from minigpt.kernels import step

        self.step = step
        cfg, p = model.cfg, model.params
        C, H, L = cfg.n_embd, cfg.n_head, cfg.n_layer
        hs = C // H
        self.quant, self.head_weight = model.quant, model._head
        self.V = cfg.vocab_size
        packed = isinstance(model.quant, lowbit.PackedWeights)
        none = np.zeros((1, 1, 1), np.uint16)  # 16-bit weights have no scales
        self.weights, self.scales, self.biases, self.norms = List(), List(), List(), List()
        linear = []  # each block's four weights as the Python step sees them (for the counts)
        for i in range(L):
            blk = model.decode_params(i)
            for name in LINEAR_WEIGHTS:
                w = blk[name]
                linear.append(w)
                if packed:
                    self.weights.append(w.data)
                    self.scales.append(none if w.tile_scale is None else w.tile_scale)
                else:
                    self.weights.append(w.tiles)
                    self.scales.append(w.rest)
                self.biases.append(np.ascontiguousarray(blk[name.replace("weight", "bias")], np.float32))
            for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
                self.norms.append(blk[name])
        self.norms.append(p["transformer.ln_f.weight"])
        self.norms.append(p["transformer.ln_f.bias"])
        head = model.quant.lm_head if packed else model._head
        self.head, self.head_scale = ((head.data, none if head.tile_scale is None else head.tile_scale)
                                      if packed else (head.tiles, head.rest))
        self.bf16 = packed and bool(head.bf16)
        self.bias_apart = not packed  # the tiled kernel adds no bias: the step adds it apart
        f32 = np.float32
        self.scratch = s = {
            "h": np.empty((B, C), f32), "a": np.empty((B, C), f32), "m": np.empty((B, C), f32),
            "qkv": np.empty((B, 3 * C), f32), "q": np.empty((B, H, hs), f32), "y": np.empty((B, H, hs), f32),
            "att": np.empty((B, H, cfg.block_size), f32), "f": np.empty((B, 4 * C), f32),
            "g": np.empty((B, 4 * C), f32), "mean": np.empty(B, f32), "rstd": np.empty(B, f32)}
        self.lock = threading.Lock()
        self._cached_lists = (None, None, None)
        # The records: (row, slot, scope, op, kind, dtype, FLOPs, useful FLOPs, read, written).
        x, logits = np.empty((B, C), f32), np.empty((B, self.V), f32)  # the stream's and the head's shapes
        static = []

        def elementwise(i, slot, scope, kind, op, sizes):
            elements, read, written = sizes
            flops = FLOPS_PER_ELEMENT[kind, op] * elements
            static.append((i, slot, scope, op, kind, "float32", flops, flops, read, written))

        def product(i, slot, scope, xin, w, out, bias, op):
            if packed:
                op, flops, useful, read, written = lowbit.product_counts(xin, w, out, bias, op)
                static.append((i, slot, scope, op, "matmul", packed_dtype(w.bits), flops, useful, read, written))
                return
            flops, read, written = tiled.product_counts(xin, out)
            static.append((i, slot, scope, op, "matmul", "float32", flops, flops, read, written))
            if bias is not None:  # added apart, in the product's scope, as linear_forward adds it
                elementwise(i, slot + 1, scope, "bias", "add", nn.bias_add_sizes(out, bias))

        k = step
        mean, rstd = s["mean"], s["rstd"]
        self.attention = []  # (row, slot, scope, op, kind): counted every step
        for i in range(L):
            blk, b = scopes.block(i), self.biases
            w_ln = [self.norms[4 * i + j] for j in range(4)]
            elementwise(i, k.LN_1, scopes.join(blk, scopes.LN_1), "layernorm", "normalize_fused",
                        nn.fused_norm_sizes(x, False, w_ln[0], w_ln[1], s["h"], mean, rstd))
            product(i, k.C_ATTN, scopes.join(blk, scopes.ATTN, scopes.C_ATTN), s["h"], linear[4 * i],
                    s["qkv"], b[4 * i], "x@w")
            for slot, name, op, kind in ((k.SCORES, scopes.SCORES, "q@kT", "matmul"),
                                         (k.SOFTMAX, scopes.SOFTMAX, "causal_fused", "softmax"),
                                         (k.MIX, scopes.MIX, "att@v", "matmul")):
                self.attention.append((i, slot, scopes.join(blk, scopes.ATTN, name), op, kind))
            product(i, k.ATTN_C_PROJ, scopes.join(blk, scopes.ATTN, scopes.C_PROJ), s["y"].reshape(B, C),
                    linear[4 * i + 1], s["a"], b[4 * i + 1], "x@w")
            elementwise(i, k.LN_2, scopes.join(blk, scopes.LN_2), "layernorm", "residual_normalize",
                        nn.fused_norm_sizes(x, True, w_ln[2], w_ln[3], s["h"], mean, rstd))
            product(i, k.C_FC, scopes.join(blk, scopes.MLP, scopes.C_FC), s["h"], linear[4 * i + 2],
                    s["f"], None, "x@w")
            elementwise(i, k.GELU, scopes.join(blk, scopes.MLP, scopes.GELU), "gelu", "bias_tanh",
                        nn.bias_gelu_sizes(s["f"], b[4 * i + 2], s["g"]))
            product(i, k.MLP_C_PROJ, scopes.join(blk, scopes.MLP, scopes.C_PROJ), s["g"], linear[4 * i + 3],
                    s["m"], b[4 * i + 3], "x@w")
            elementwise(i, k.RESIDUAL_2, scopes.join(blk, scopes.RESIDUAL_2), "residual", "add",
                        nn.residual_sizes(x, s["m"]))
        elementwise(L, 0, scopes.LN_F, "layernorm", "normalize_fused",
                    nn.fused_norm_sizes(x, False, self.norms[-2], self.norms[-1], s["h"], mean, rstd))
        product(L, 1, scopes.LM_HEAD, s["h"], head, logits, None, "x@wte.T")
        slots = len(k.SLOTS)
        # seconds' entries of the static ops, then the attention's, in the records' order
        self._at = np.array([i * slots + slot for i, slot, *_ in static + self.attention])
        self.static_counts = [tuple(r[6:]) for r in static]
        self._keys = [r[2:6] for r in static] + [(*r[2:5], "float32") for r in self.attention]
        self._records = (None, None)
        # the counts held back (record, flush): steps, each op's nanoseconds, the attention's
        # (FLOPs or elements, bytes read, bytes written) of scores, softmax and mix
        self._steps, self._context = 0, None
        self._seconds = np.zeros(len(self._at), np.int64)
        self._attention = np.zeros((3, 3), np.int64)

    def lists(self, caches):
        """The caches' key and value arrays as the typed lists the attention kernels take, made
        again only when the caches change."""
        from numba.typed import List

        arrays = [kv.k for kv in caches]
        held, keys, values = self._cached_lists
        if held is None or len(held) != len(arrays) or any(a is not b for a, b in zip(held, arrays)):
            keys, values = List(arrays), List([kv.v for kv in caches])
            self._cached_lists = (arrays, keys, values)
        return keys, values

    def _meter_records(self, context):
        """The meter's Record objects of the step's ops in `context` (METER.context(): table,
        phase, scope), static ops' then the attention's; made in the order the ops run (as the
        Python step makes them), once while the meter keeps the same context."""
        held, recs = self._records
        if not _same(held, context):
            outer = context[2]
            keys = self._keys
            recs = [None] * len(keys)
            for i in np.argsort(self._at, kind="stable").tolist():
                scope, op, kind, dtype = keys[i]
                recs[i] = METER.record(f"{outer}.{scope}" if outer else scope, op, kind, dtype)
            self._records = (context, recs)
        return recs

    def record(self, seconds, n: int) -> None:
        """Count the step: its ops' times (seconds, nanoseconds from the compiled step) and
        counts, the attention's from n, the cached positions over all sequences. Held back
        (METER.hold) and added by flush: one NumPy addition a step, where adding some 170
        records' six counts each took 30-90 us after a step had streamed the caches cold."""
        context = METER.context()
        if self._steps and not _same(self._context, context):
            self.flush()  # the meter moved on (another table, phase or scope): close the old counts
        if not self._steps:
            self._context = context
            self._meter_records(context)  # made now, in the table and order the Python step makes them
            METER.hold(self)
        self._steps += 1
        self._seconds += seconds.reshape(-1)[self._at]
        s = self.scratch
        self._attention += nn.many_caches_attention_sizes(s["q"], n, s["y"])

    def flush(self) -> None:
        """Add the counts held since the last flush to the meter's records (METER.flush)."""
        steps = self._steps
        if not steps:
            return
        recs = self._meter_records(self._context)
        static_recs, attention_recs = recs[:len(self.static_counts)], recs[len(self.static_counts):]
        seconds = (self._seconds * 1e-9).tolist()
        for r, (flops, useful, read, written), t in zip(static_recs, self.static_counts, seconds):
            r.calls += steps
            r.flops += steps * flops
            r.useful_flops += steps * useful
            r.bytes_read += steps * read
            r.bytes_written += steps * written
            r.seconds += t
        (scores, softmax, mix) = self._attention.tolist()  # summed over the steps
        softmax = [FLOPS_PER_ELEMENT["softmax", "causal_fused"] * softmax[0], softmax[1], softmax[2]]
        for j, (r, t) in enumerate(zip(attention_recs, seconds[len(static_recs):])):
            flops, read, written = (scores, softmax, mix)[j % 3]
            r.calls += steps
            r.flops += flops
            r.useful_flops += flops
            r.bytes_read += read
            r.bytes_written += written
            r.seconds += t
        self._steps = 0
        self._seconds[:] = 0
        self._attention[:] = 0
        self._context = None


def _same(context, other) -> bool:
    """Whether two METER.context() values name the same table (the same object), phase and scope."""
    return context is not None and context[0] is other[0] and context[1:] == other[1:]
