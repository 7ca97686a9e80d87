"""The closed-form cost model: every record the meter would write, predicted from shapes alone.

predict_training_step(cfg, batch, seq)   forward + backward + optimizer of one optimizer step
predict_forward(cfg, batch, seq, phase)  one forward pass ("forward", "eval" or "prefill")
predict_decode(cfg, batch, position)     one KV-cached decode step for the token at `position`
predict_decode_batch(cfg, positions)     one batched decode step, sequences at their own positions
allreduce_bytes(nbytes, ranks)           bytes each rank sends (and receives) in a ring allreduce
op_calls(cfg, mode, batch, seq)          the same work call by call, each product with its shape
                                         (what a time model needs: minigpt.hardware.timing)

Each returns {RecordKey(scope, op, kind, phase, dtype): Record}, the meter's own format, so a test can
compare prediction and measurement key by key. Mixture-of-experts blocks take a `routing` (tokens
each expert computed, per block: what GPT.routing records) and predict exactly that forward; with
none they assume balanced routing, the expectation the projections (scale/work.py) use. The
formulas follow minigpt.counting.meter's conventions: a matmul (..., M, K) @ (..., K, N) is 2*batch*M*N*K
FLOPs and moves A, B and C once; an elementwise op is FLOPS_PER_ELEMENT per element and moves its
inputs and outputs once.
"""

from dataclasses import dataclass
from typing import NamedTuple

from minigpt.config import expert_capacity, is_moe_block
from minigpt.counting.meter import FLOPS_PER_ELEMENT as FPE
from minigpt.counting.meter import INT8, W8A32, Record, RecordKey, packed_dtype
from minigpt.counting.scopes import (
    ADAMW,
    ATTN,
    ATTN_DROPOUT,
    C_ATTN,
    C_FC,
    C_PROJ,
    CLIP,
    DIST,
    DROPOUT,
    EMBEDDING,
    GELU,
    LM_HEAD,
    LN_1,
    LN_2,
    LN_F,
    LOSS,
    MIX,
    MLP,
    RESID_DROPOUT,
    RESIDUAL_1,
    RESIDUAL_2,
    ROUTER,
    SCORES,
    SOFTMAX,
    ZERO_GRAD,
    block,
    expert,
    join,
)

INDEX_BYTES = 8  # token ids are int64


class OpCall(NamedTuple):
    """One call the meter would record: its record's key, its counts, and for a product its shape
    (batch, m, k, n) of (batch, m, k) @ (k, n); elementwise calls have shape None."""

    key: RecordKey
    flops: int
    bytes_read: int
    bytes_written: int
    shape: tuple[int, int, int, int] | None


@dataclass
class _Sheet:
    """Accumulates predicted records for one phase."""

    phase: str
    itemsize: int = 4
    dtype: str = "float32"
    fused: bool = False  # the fused kernels' schedule (minigpt/kernels/fused.py), else NumPy's

    def __post_init__(self):
        self.records: dict[RecordKey, Record] = {}
        self.calls: list[OpCall] = []

    def _add(self, scope, op, kind, flops, read, written, useful=None, dtype=None, shape=None):
        key = RecordKey(scope, op, kind, self.phase, dtype or self.dtype)
        self.calls.append(OpCall(key, flops, read, written, shape))
        r = self.records.setdefault(key, Record())
        r.calls += 1
        r.flops += flops
        r.useful_flops += flops if useful is None else useful
        r.bytes_read += read
        r.bytes_written += written

    def product(self, scope, op, batch, m, k, n, a_elems, b_elems, useful=None, dtype=None):
        """(batch, m, k) @ (k, n) products; A and B hold a_elems and b_elems elements.

        dtype INT8: A and B at one byte, C at four (int32 sums); W8A32: B at one byte."""
        s = self.itemsize
        a_size, b_size, c_size = {INT8: (1, 1, 4), W8A32: (s, 1, s)}.get(dtype, (s, s, s))
        self._add(scope, op, "matmul", 2 * batch * m * n * k, a_elems * a_size + b_elems * b_size,
                  batch * m * n * c_size, useful, dtype, shape=(batch, m, k, n))

    def elementwise(self, scope, kind, op, n, read_elems, written_elems, extra_read_bytes=0,
                    factor=1, dtype=None, extra_written_bytes=0):
        s = self.itemsize
        self._add(scope, op, kind, factor * FPE[kind, op] * n, read_elems * s + extra_read_bytes,
                  written_elems * s + extra_written_bytes, dtype=dtype)

    def quantize(self, scope, rows, cols):
        """Per-row int8 quantization of a (rows, cols) float array: int8 values and row scales."""
        self.elementwise(scope, "quant", "quantize", rows * cols, rows * cols, 0,
                         extra_written_bytes=rows * cols + rows * 4, dtype=INT8)

    def rescale(self, scope, n_out, factor_elems, n_factors=1):
        """n_out accumulators (read at 4 bytes) times n_factors float32 scales (factor_elems)."""
        self._add(scope, "rescale", "quant", n_factors * FPE["quant", "rescale"] * n_out,
                  4 * n_out + 4 * factor_elems, n_out * self.itemsize)


def _causal_useful(B, H, T, Tk, pos0, head_size):
    """Products a causal mask keeps: query pos0 + i sees min(pos0 + i + 1, Tk) keys."""
    if Tk >= pos0 + T:  # every query sees all keys up to its own position (the model's case)
        visible = T * pos0 + T * (T + 1) // 2
    else:
        visible = sum(min(pos0 + i + 1, Tk) for i in range(T))
    return 2 * B * H * visible * head_size


def _int8_product(sh, scope, op, N, C, OC, mode):
    """x (N, C) @ an int8 weight (C, OC) with per-column scales, by mode (nn/quant.py's MODES:
    the weight-only mode is named as its products' dtype, W8A32; the other is w8a8)."""
    if mode == W8A32:
        sh.product(scope, op, 1, N, C, OC, N * C, C * OC, dtype=W8A32)
        sh.rescale(scope, N * OC, OC)
    else:
        sh.quantize(scope, N, C)
        sh.product(scope, op, 1, N, C, OC, N * C, C * OC, dtype=INT8)
        sh.rescale(scope, N * OC, N + OC, n_factors=2)


class Packed(NamedTuple):
    """Packed weight-only weights (nn/lowbit.py): bits 16, 8 or 4; group_size inputs a scale at 4."""

    bits: int
    group_size: int


PACK_TILE = 32  # output channels a tile of the packed layout (minigpt/kernels/tiles.py's WIDTH)


def packed_columns(M: int) -> int:
    """M output channels padded to whole tiles, as kernels/quant.py lays a packed weight out."""
    return -(-M // PACK_TILE) * PACK_TILE


def packed_weight_bytes(K: int, M: int, packed: Packed) -> int:
    """Bytes of a packed (K, M) weight with its scales: what one product reads of it."""
    Mp = packed_columns(M)
    if packed.bits == 16:
        return 2 * K * Mp
    if packed.bits == 8:
        return K * Mp + 4 * Mp  # int8, one float32 scale per channel
    return K // 2 * Mp + 2 * (K // packed.group_size) * Mp  # two a byte, an fp16 scale a group


def _packed_product(sh, scope, op, N, K, M, packed: Packed, bias: bool = False):
    """x (N, K) @ a packed weight: the kernel computes the padded channels too; x and the output
    at the activations' width. bias: the kernel adds the layer's bias (op "x@w+b": N M adds, M
    floats read; lowbit.product)."""
    Mp, s = packed_columns(M), sh.itemsize
    adds, bias_bytes, op = (N * M, M * s, op + "+b") if bias else (0, 0, op)
    sh._add(scope, op, "matmul", 2 * N * K * Mp + adds, s * N * K + packed_weight_bytes(K, M, packed) + bias_bytes,
            s * N * M, useful=2 * N * K * M + adds, dtype=packed_dtype(packed.bits), shape=(1, N, K, Mp))


def _visible(T, Tk, pos0):
    """Scores a causal mask keeps in one (T, Tk) block (nn/layers.py's visible_scores)."""
    if Tk >= pos0 + T:
        return T * pos0 + T * (T + 1) // 2
    return sum(min(pos0 + i + 1, Tk) for i in range(T))


def _linear_forward(sh, scope, N, C, OC, mode=None):
    if mode is None:
        sh.product(scope, "x@w", 1, N, C, OC, N * C, C * OC)
    elif isinstance(mode, Packed):  # the kernel adds the bias
        _packed_product(sh, scope, "x@w", N, C, OC, mode, bias=True)
        return
    else:
        _int8_product(sh, scope, "x@w", N, C, OC, mode)
    sh.elementwise(scope, "bias", "add", N * OC, N * OC + OC, N * OC)


def _linear_backward(sh, scope, N, C, OC):
    sh.product(scope, "grad_w", 1, C, N, OC, N * C, N * OC)
    sh.elementwise(scope, "bias", "grad", N * OC, N * OC + OC, OC)
    sh.product(scope, "grad_x", 1, N, OC, C, N * OC, C * OC)


def _layernorm_forward(sh, scope, N, C, residual=False):
    """The NumPy schedule keeps xhat (N, C) and rstd (N); the fused one keeps mean and rstd, and
    with residual=True adds the residual branch into the stream in the same pass."""
    if not sh.fused:
        sh.elementwise(scope, "layernorm", "normalize", N * C, N * C + 2 * C, 2 * N * C + N)
    elif residual:
        sh.elementwise(scope, "layernorm", "residual_normalize", N * C, 2 * N * C + 2 * C,
                       2 * N * C + 2 * N)
    else:
        sh.elementwise(scope, "layernorm", "normalize_fused", N * C, N * C + 2 * C, N * C + 2 * N)


def _layernorm_backward(sh, scope, N, C, residual=False):
    """residual=True (fused schedule): dx added into the stream's gradient in the same pass."""
    if not sh.fused:
        sh.elementwise(scope, "layernorm", "grad", N * C, 2 * N * C + N + 3 * C, N * C + 2 * C)
    elif residual:
        sh.elementwise(scope, "layernorm", "grad_residual", N * C, 3 * N * C + 2 * N + 3 * C,
                       N * C + 2 * C)
    else:
        sh.elementwise(scope, "layernorm", "grad_fused", N * C, 2 * N * C + 2 * N + 3 * C,
                       N * C + 2 * C)


def _residual_layernorm_forward(sh, h, N, C):
    """residual_1 then ln_2: two passes in NumPy's schedule, one in the fused one."""
    if not sh.fused:
        sh.elementwise(join(h, RESIDUAL_1), "residual", "add", N * C, 2 * N * C, N * C)
    _layernorm_forward(sh, join(h, LN_2), N, C, residual=True)


def _layernorm_residual_backward(sh, scope, residual_scope, N, C):
    """A block's LayerNorm backward, then its dx added into the stream's gradient."""
    _layernorm_backward(sh, scope, N, C, residual=True)
    if not sh.fused:
        sh.elementwise(residual_scope, "residual", "grad", N * C, 2 * N * C, N * C)


def _softmax_forward(sh, scope, B, H, T, Tk, pos0):
    n_att = B * H * T * Tk
    if sh.fused:
        vis = B * H * _visible(T, Tk, pos0)
        sh.elementwise(scope, "softmax", "causal_fused", vis, vis, n_att)
    else:
        sh.elementwise(scope, "softmax", "causal", n_att, n_att, n_att)


def _softmax_backward(sh, scope, B, H, T):
    n_att = B * H * T * T
    if sh.fused:
        vis = B * H * _visible(T, T, 0)
        sh.elementwise(scope, "softmax", "grad_fused", vis, 2 * vis, n_att)
    else:
        sh.elementwise(scope, "softmax", "grad", n_att, 2 * n_att, n_att)


def _dropout_forward(sh, scope, n):
    sh.elementwise(scope, "dropout", "mask", n, n, 2 * n)


def _dropout_backward(sh, scope, n):
    sh.elementwise(scope, "dropout", "grad", n, 2 * n, n)


def _mlp_forward(sh, scope, N, C, mode=None):
    """The fused schedule (float or packed weights) adds c_fc's bias inside the GELU's pass and
    keeps the product before it, where NumPy's keeps the tanh."""
    if sh.fused and (mode is None or isinstance(mode, Packed)):
        if mode is None:
            sh.product(join(scope, C_FC), "x@w", 1, N, C, 4 * C, N * C, C * 4 * C)
        else:
            _packed_product(sh, join(scope, C_FC), "x@w", N, C, 4 * C, mode)
        sh.elementwise(join(scope, GELU), "gelu", "bias_tanh", 4 * N * C, 4 * N * C + 4 * C, 4 * N * C)
    else:
        _linear_forward(sh, join(scope, C_FC), N, C, 4 * C, mode)
        sh.elementwise(join(scope, GELU), "gelu", "tanh", 4 * N * C, 4 * N * C, 8 * N * C)
    _linear_forward(sh, join(scope, C_PROJ), N, 4 * C, C, mode)


def _mlp_backward(sh, scope, N, C):
    _linear_backward(sh, join(scope, C_PROJ), N, 4 * C, C)
    if sh.fused:  # c_fc's bias gradient summed inside the GELU's backward pass
        sh.elementwise(join(scope, GELU), "gelu", "grad_bias", 4 * N * C, 8 * N * C + 8 * C,
                       4 * N * C + 4 * C)
        sh.product(join(scope, C_FC), "grad_w", 1, C, N, 4 * C, N * C, N * 4 * C)
        sh.product(join(scope, C_FC), "grad_x", 1, N, 4 * C, C, N * 4 * C, C * 4 * C)
    else:
        sh.elementwise(join(scope, GELU), "gelu", "grad", 4 * N * C, 12 * N * C, 4 * N * C)
        _linear_backward(sh, join(scope, C_FC), N, C, 4 * C)


# ----------------------------------------------------------------------------- mixture of experts


def balanced_routing(cfg, n_tokens: int) -> list[int]:
    """Tokens each expert computes when the n_tokens * k assignments are spread evenly (the first
    n_tokens * k % E experts take one more), capped at the capacity. Products are linear in these
    counts, so their FLOPs are the expectation under uniform routing exactly."""
    E, k = cfg.n_experts, cfg.experts_per_token
    base, extra = divmod(n_tokens * k, E)
    cap = expert_capacity(cfg, n_tokens)
    tokens = [base + (e < extra) for e in range(E)]
    return tokens if cap is None else [min(t, cap) for t in tokens]


def _tokens(cfg, routing, i, N):
    return balanced_routing(cfg, N) if routing is None else routing[i]


def _moe_forward(sh, scope, cfg, N, tokens):
    """nn/moe.py's forward: router, then each expert that computed n > 0 tokens."""
    C, E, k = cfg.n_embd, cfg.n_experts, cfg.experts_per_token
    r = join(scope, ROUTER)
    sh.product(r, "x@w", 1, N, C, E, N * C, C * E)
    sh.elementwise(r, "router", "softmax", N * E, N * E, N * E)
    sh.elementwise(r, "router", "top_k", N * E, N * E, 0, extra_written_bytes=N * k * INDEX_BYTES)
    sh.elementwise(r, "router", "renormalize", N * k, N * k, N * k + N, extra_read_bytes=N * k * INDEX_BYTES)
    sh.elementwise(r, "router", "aux_loss", N * E, N * E, 2 * E, extra_read_bytes=N * k * INDEX_BYTES)
    for e, n in enumerate(tokens):
        if n == 0:
            continue
        x = join(scope, expert(e))
        sh.elementwise(x, "dispatch", "gather", n * C, n * C, n * C, extra_read_bytes=n * INDEX_BYTES)
        _mlp_forward(sh, x, n, C)
        sh.elementwise(x, "combine", "scatter", n * C, 2 * n * C + n, n * C,
                       extra_read_bytes=n * INDEX_BYTES)


def _moe_backward(sh, scope, cfg, N, tokens):
    C, E, k = cfg.n_embd, cfg.n_experts, cfg.experts_per_token
    r = join(scope, ROUTER)
    for e, n in enumerate(tokens):
        if n:
            sh.elementwise(join(scope, expert(e)), "combine", "grad", n * C, 2 * n * C + n, n * C + n,
                           extra_read_bytes=n * INDEX_BYTES)
    sh.elementwise(r, "router", "renormalize_grad", N * k, 2 * N * k + N, N * E,
                   extra_read_bytes=N * k * INDEX_BYTES)
    sh.elementwise(r, "router", "softmax_grad", N * E, 2 * N * E + E, N * E)
    sh.product(r, "grad_w", 1, C, N, E, N * C, N * E)
    sh.product(r, "grad_x", 1, N, E, C, N * E, C * E)
    for e, n in enumerate(tokens):
        if n:
            x = join(scope, expert(e))
            _mlp_backward(sh, x, n, C)
            sh.elementwise(x, "dispatch", "grad", n * C, 2 * n * C, n * C, extra_read_bytes=n * INDEX_BYTES)


# ----------------------------------------------------------------------------- the model


def _attention(sh, attn, B, H, T, pos0, hs, kv_int8, dropout):
    """Scores, softmax and mix of B sequences of T new tokens after pos0 cached ones."""
    Tk = pos0 + T
    useful = _causal_useful(B, H, T, Tk, pos0, hs)
    n_att = B * H * T * Tk
    if kv_int8:  # new keys and values quantized into the cache, read back at one byte
        sh.quantize(attn, B * H * T, hs)
        sh.quantize(attn, B * H * T, hs)
        sh.product(join(attn, SCORES), "q@kT", B * H, T, hs, Tk, B * H * T * hs, B * H * Tk * hs,
                   useful, dtype=W8A32)
        sh.rescale(join(attn, SCORES), n_att, B * H * Tk)
    else:
        sh.product(join(attn, SCORES), "q@kT", B * H, T, hs, Tk, B * H * T * hs, B * H * Tk * hs, useful)
    _softmax_forward(sh, join(attn, SOFTMAX), B, H, T, Tk, pos0)
    if dropout:
        _dropout_forward(sh, join(attn, ATTN_DROPOUT), n_att)
    if kv_int8:
        sh.rescale(join(attn, MIX), n_att, B * H * Tk)
        sh.product(join(attn, MIX), "att@v", B * H, T, Tk, hs, n_att, B * H * Tk * hs, useful,
                   dtype=W8A32)
    else:
        sh.product(join(attn, MIX), "att@v", B * H, T, Tk, hs, n_att, B * H * Tk * hs, useful)


def _decode_attention(sh, attn, H, hs, B, lengths):
    """Attention of B sequences' one new token each against their own float caches of lengths[b]
    positions (the new one included), in one call per operation (kernels/attend.py): the
    per-sequence records summed. Shapes for the time model: the H heads' one query against all
    the sequences' keys laid end to end (the FLOPs exactly)."""
    s, n = sh.itemsize, sum(lengths)
    flops = 2 * H * hs * n
    sh._add(join(attn, SCORES), "q@kT", "matmul", flops, B * H * hs * s + H * n * hs * s, H * n * s,
            shape=(H, 1, hs, n))
    sh.elementwise(join(attn, SOFTMAX), "softmax", "causal_fused", H * n, H * n, H * n)
    sh._add(join(attn, MIX), "att@v", "matmul", flops, H * n * s + H * n * hs * s, B * H * hs * s,
            shape=(H, 1, n, hs))


def _forward(sh, cfg, B, T, pos0=0, last_only=False, targets=False, dropout=False, q=None,
             routing=None, positions=None, spans=None):
    """Records of GPT.hidden + lm head (+ loss) for B sequences of T new tokens after pos0.

    q: a quant.QuantConfig for quantized inference (outlier_threshold is data-dependent: not
    predicted). routing: {MoE block index: tokens each expert computed}, or None for balanced
    routing. positions: a batched decode step (GPT.decode_step): one new token for each sequence,
    sequence b's at positions[b] (B = len(positions), T = 1); attention then runs per sequence,
    or (the fused schedule, a float cache, one new token each) for all of them in one call per
    operation (_decode_attention).
    spans: an extend step (nn/decode.py's extend_step), [(pos0, n)] for each sequence, n new tokens
    after pos0 cached ones (B = len(spans); T is not used); positions are spans of one token.
    A KV-cached step of one token (model.block_decode) has block_forward's records."""
    C, H, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    if positions:
        spans = [(p, 1) for p in positions]
    hs, N = C // H, (sum(n for _, n in spans) if spans else B * T)
    s = sh.itemsize
    mode = None
    if q is not None:
        mode = Packed(q.bits, q.group_size) if getattr(q, "bits", None) else q.mode
    if q is not None and q.quantize_embedding:
        sh.elementwise(EMBEDDING, "embedding", "lookup_int8", N * C, 0, N * C,
                       extra_read_bytes=N * INDEX_BYTES + N * (C + 4) + (N if spans else T) * C * s)
    else:
        sh.elementwise(EMBEDDING, "embedding", "lookup", N * C, 0, N * C,
                       extra_read_bytes=N * INDEX_BYTES + (N + (N if spans else T)) * C * s)
    if dropout:
        _dropout_forward(sh, join(EMBEDDING, DROPOUT), N * C)
    kv_int8 = q is not None and q.kv_int8
    for i in range(cfg.n_layer):
        h = block(i)
        attn, mlp = join(h, ATTN), join(h, MLP)
        _layernorm_forward(sh, join(h, LN_1), N, C)
        _linear_forward(sh, join(attn, C_ATTN), N, C, 3 * C, mode)
        if spans and sh.fused and not kv_int8 and N == B:
            _decode_attention(sh, attn, H, hs, B, [p + 1 for p, _ in spans])
        elif spans:
            for p, n in spans:
                _attention(sh, attn, 1, H, n, p, hs, kv_int8, False)
        else:
            _attention(sh, attn, B, H, T, pos0, hs, kv_int8, dropout)
        _linear_forward(sh, join(attn, C_PROJ), N, C, C, mode)
        if dropout:
            _dropout_forward(sh, join(attn, RESID_DROPOUT), N * C)
        _residual_layernorm_forward(sh, h, N, C)
        if is_moe_block(cfg, i):
            _moe_forward(sh, mlp, cfg, N, _tokens(cfg, routing, i, N))
        else:
            _mlp_forward(sh, mlp, N, C, mode)
        if dropout:
            _dropout_forward(sh, join(mlp, RESID_DROPOUT), N * C)
        sh.elementwise(join(h, RESIDUAL_2), "residual", "add", N * C, 2 * N * C, N * C)
    if spans and N > B:  # extend_step takes each sequence's last row before the LayerNorm
        sh.elementwise(LN_F, "gather", "last_rows", B * C, B * C, B * C, extra_read_bytes=B * INDEX_BYTES)
        N = B
    _layernorm_forward(sh, LN_F, N, C)
    M = B if last_only else N
    if mode is None:
        sh.product(LM_HEAD, "x@wte.T", 1, M, C, V, M * C, V * C)
    elif isinstance(mode, Packed):
        _packed_product(sh, LM_HEAD, "x@wte.T", M, C, V, mode)
    else:
        _int8_product(sh, LM_HEAD, "x@wte.T", M, C, V, mode)
    if targets:
        sh.elementwise(LOSS, "cross_entropy", "loss", N * V, N * V, N * V,
                       extra_read_bytes=N * INDEX_BYTES)


def _backward(sh, cfg, B, T, dropout=False, routing=None):
    C, H, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    hs, N = C // H, B * T
    useful = _causal_useful(B, H, T, T, 0, hs)
    n_att = B * H * T * T
    sh.elementwise(LOSS, "cross_entropy", "grad", N * V, N * V, N * V, extra_read_bytes=N * INDEX_BYTES)
    sh.product(LM_HEAD, "grad_w", 1, V, N, C, N * V, N * C)
    sh.product(LM_HEAD, "grad_x", 1, N, V, C, N * V, V * C)
    _layernorm_backward(sh, LN_F, N, C)
    for i in reversed(range(cfg.n_layer)):
        h = block(i)
        attn, mlp = join(h, ATTN), join(h, MLP)
        if dropout:
            _dropout_backward(sh, join(mlp, RESID_DROPOUT), N * C)
        if is_moe_block(cfg, i):
            _moe_backward(sh, mlp, cfg, N, _tokens(cfg, routing, i, N))
        else:
            _mlp_backward(sh, mlp, N, C)
        _layernorm_residual_backward(sh, join(h, LN_2), join(h, RESIDUAL_2), N, C)
        if dropout:
            _dropout_backward(sh, join(attn, RESID_DROPOUT), N * C)
        _linear_backward(sh, join(attn, C_PROJ), N, C, C)
        sh.product(join(attn, MIX), "grad_att", B * H, T, hs, T, B * H * T * hs, B * H * T * hs, useful)
        sh.product(join(attn, MIX), "grad_v", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        if dropout:
            _dropout_backward(sh, join(attn, ATTN_DROPOUT), n_att)
        _softmax_backward(sh, join(attn, SOFTMAX), B, H, T)
        sh.product(join(attn, SCORES), "grad_q", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        sh.product(join(attn, SCORES), "grad_k", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        _linear_backward(sh, join(attn, C_ATTN), N, C, 3 * C)
        _layernorm_residual_backward(sh, join(h, LN_1), join(h, RESIDUAL_1), N, C)
    if dropout:
        _dropout_backward(sh, join(EMBEDDING, DROPOUT), N * C)
    sh.elementwise(EMBEDDING, "embedding", "grad_table", N * C, 2 * N * C, N * C,
                   extra_read_bytes=N * INDEX_BYTES)
    sh.elementwise(EMBEDDING, "embedding", "grad_position", N * C, N * C + 2 * T * C, T * C)


def mlp_params(C: int) -> int:
    """One GPT-2 MLP (or one expert): c_fc (C, 4C) + bias 4C, c_proj (4C, C) + bias C."""
    return 8 * C * C + 5 * C


def moe_blocks(cfg) -> int:
    """How many blocks are mixture-of-experts blocks (config.is_moe_block)."""
    return sum(is_moe_block(cfg, i) for i in range(cfg.n_layer))


def n_params(cfg) -> int:
    """Every parameter (all experts, routers), as nn/params.py's layout holds them."""
    C, L, E = cfg.n_embd, cfg.n_layer, cfg.n_experts
    dense = cfg.vocab_size * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C
    return dense + moe_blocks(cfg) * ((E - 1) * mlp_params(C) + C * E)


def n_active_params(cfg) -> int:
    """The parameters one token's forward uses: experts_per_token experts of each MoE block."""
    unused = cfg.n_experts - cfg.experts_per_token
    return n_params(cfg) - moe_blocks(cfg) * unused * mlp_params(cfg.n_embd)


def _optimizer(sh, cfg):
    P = n_params(cfg)
    sh.elementwise(CLIP, "clip", "norm", P, P, 0)
    sh.elementwise(CLIP, "clip", "scale", P, P, P)
    sh.elementwise(ADAMW, "adamw", "update", P, 4 * P, 3 * P)


def allreduce_bytes(nbytes: float, ranks: int) -> float:
    """Bytes each of `ranks` ranks sends, and as many it receives, in a ring allreduce of an nbytes
    buffer: a reduce-scatter then an all-gather, each passing N - 1 chunks of nbytes / N round the
    ring, so 2 (N - 1) / N x nbytes. Whole numbers stay whole (floor), as the meter records them;
    `minigpt scale` passes floats (a model's gradient bytes) and gets the exact ratio."""
    if isinstance(nbytes, int):
        return 2 * (ranks - 1) * nbytes // ranks
    return 2 * (ranks - 1) / ranks * nbytes


def allreduce_flops(elements: int, ranks: int) -> int:
    """Additions each rank does in a ring allreduce: (N - 1) / N x the elements (reduce-scatter)."""
    return (ranks - 1) * elements // ranks


def _allreduce(sh, op, elements, itemsize, ranks, dtype):
    sent = allreduce_bytes(elements * itemsize, ranks)
    sh._add(DIST, op, "allreduce", allreduce_flops(elements, ranks), sent, sent, dtype=dtype)


def _communication(sh, cfg, ranks, dtype):
    """One data-parallel step's allreduces (minigpt.train.dist): the flat gradient buffer, then the
    loss and the stop flag as two float64 numbers."""
    _allreduce(sh, "grad_sum", n_params(cfg), sh.itemsize, ranks, dtype)
    _allreduce(sh, "loss_sum", 2, 8, ranks, "float64")


def _merge(*sheets) -> dict:
    out = {}
    for sh in sheets:
        out.update(sh.records)
    return out


def _sheet(phase, dtype, fused=False):
    return _Sheet(phase, itemsize=4 if dtype == "float32" else 8, dtype=dtype, fused=fused)


def predict_training_step(cfg, batch: int, seq: int | None = None, grad_accum: int = 1,
                          clip: bool = True, dtype: str = "float32", ranks: int = 1,
                          routing=None, fused: bool = False) -> dict:
    """One optimizer step: grad_accum micro-batches of (batch, seq) tokens, then clip + AdamW.
    ranks > 1: one rank's step of data-parallel training (batch is then its share, batch_size /
    ranks), with the allreduces of phase "communication".

    routing: for a MoE model, one {block index: tokens each expert computed} per micro-batch (as
    GPT.routing holds after each forward: Routing.computed), or None for balanced routing.
    fused: the fused kernels' schedule (nn.layers.fused(): Numba chosen, on the CPU), whose
    records differ from NumPy's passes; the other functions here take it too."""
    return _merge(*_training_sheets(cfg, batch, seq, grad_accum, clip, dtype, ranks, routing, fused))


def _training_sheets(cfg, batch, seq, grad_accum=1, clip=True, dtype="float32", ranks=1,
                     routing=None, fused=False) -> tuple:
    T = seq or cfg.block_size
    drop = cfg.dropout > 0
    fwd, bwd = _sheet("forward", dtype, fused), _sheet("backward", dtype, fused)
    opt = _sheet("optimizer", dtype)  # AdamW's records are the same in both schedules
    P = n_params(cfg)
    opt.elementwise(ZERO_GRAD, "zero_grad", "fill", P, 0, P)
    for micro in range(grad_accum):
        r = None if routing is None else routing[micro]
        _forward(fwd, cfg, batch, T, targets=True, dropout=drop, routing=r)
        _backward(bwd, cfg, batch, T, dropout=drop, routing=r)
    if clip:
        _optimizer(opt, cfg)
    else:
        opt.elementwise(ADAMW, "adamw", "update", P, 4 * P, 3 * P)
    comm = _sheet("communication", dtype)
    if ranks > 1:
        _communication(comm, cfg, ranks, dtype)
    return fwd, bwd, opt, comm


def predict_forward(cfg, batch: int, seq: int, phase: str = "forward", targets: bool = False,
                    dtype: str = "float32", quant=None, routing=None, fused: bool = False) -> dict:
    """A forward pass of (batch, seq) tokens; phase "prefill" keeps only the last position's logits.
    quant: a QuantConfig (int8 inference), or None for float; routing: as predict_training_step's
    (one micro-batch's dict)."""
    return _forward_sheet(cfg, batch, seq, phase, targets, dtype, quant, routing, fused=fused).records


def _forward_sheet(cfg, batch, seq, phase="forward", targets=False, dtype="float32", quant=None,
                   routing=None, pos0=0, fused=False) -> _Sheet:
    sh = _sheet(phase, dtype, fused)
    _forward(sh, cfg, batch, seq, pos0=pos0, last_only=phase == "prefill", targets=targets, q=quant,
             routing=routing)
    return sh


def predict_decode(cfg, batch: int, position: int, dtype: str = "float32", quant=None,
                   routing=None, fused: bool = False) -> dict:
    """One decode step: the token at `position` attends to the position + 1 cached keys."""
    return _forward_sheet(cfg, batch, 1, "decode", dtype=dtype, quant=quant, routing=routing,
                          pos0=position, fused=fused).records


def predict_decode_batch(cfg, positions, dtype: str = "float32", quant=None,
                         fused: bool = False) -> dict:
    """One GPT.decode_step over len(positions) sequences, sequence b's new token at positions[b]
    (ragged): the weight products once over all rows, attention per sequence (one call for all
    of them on the fused schedule with a float cache: _decode_attention)."""
    sh = _sheet("decode", dtype, fused)
    positions = [int(p) for p in positions]
    _forward(sh, cfg, len(positions), 1, q=quant, positions=positions)
    return sh.records


def predict_extend(cfg, spans, dtype: str = "float32", quant=None, fused: bool = False,
                   phase: str = "decode") -> dict:
    """One extend_step (nn/decode.py): sequence b appends n_b new tokens after pos0_b cached ones,
    spans = [(pos0_b, n_b)]; the products once over all the new rows, attention per sequence,
    the LM head on each sequence's last row. phase: the meter's phase it ran under."""
    sh = _sheet(phase, dtype, fused)
    spans = [(int(p), int(n)) for p, n in spans]
    _forward(sh, cfg, len(spans), None, q=quant, spans=spans)
    return sh.records


def forward_records(cfg, batch: int, seq: int, pos0: int = 0, last_only: bool = False,
                    targets: bool = False, routing=None, fused: bool = False) -> dict:
    """A forward of `seq` new tokens after `pos0` cached ones (the general case of the above; a
    KV-cached decode step if seq is 1 and pos0 > 0)."""
    sh = _sheet("forward", "float32", fused)
    _forward(sh, cfg, batch, seq, pos0=pos0, last_only=last_only, targets=targets, routing=routing)
    return sh.records


def backward_records(cfg, batch: int, seq: int, routing=None, fused: bool = False) -> dict:
    """The backward of a (batch, seq) training forward, dropout as the config says."""
    sh = _sheet("backward", "float32", fused)
    _backward(sh, cfg, batch, seq, dropout=cfg.dropout > 0, routing=routing)
    return sh.records


def total_flops(records: dict) -> int:
    return sum(r.flops for r in records.values())


MODES = ("train", "eval", "prefill", "decode")


def op_calls(cfg, mode: str, batch: int, seq: int, grad_accum: int = 1, dtype: str = "float32",
             quant=None, fused: bool = False) -> list[OpCall]:
    """Every call of one step, in order, as the predict_* functions count them: mode "train" (one
    optimizer step of grad_accum micro-batches of (batch, seq)), "eval" (a validation forward with
    its loss), "prefill" (a prompt of seq tokens) or "decode" (one token at position seq); fused: the
    fused kernels' schedule."""
    if mode == "train":
        sheets = _training_sheets(cfg, batch, seq, grad_accum, dtype=dtype, fused=fused)
    elif mode == "eval":
        sheets = (_forward_sheet(cfg, batch, seq, "eval", targets=True, dtype=dtype, fused=fused),)
    elif mode == "prefill":
        sheets = (_forward_sheet(cfg, batch, seq, "prefill", dtype=dtype, quant=quant, fused=fused),)
    elif mode == "decode":
        sheets = (_forward_sheet(cfg, batch, 1, "decode", dtype=dtype, quant=quant, pos0=seq,
                                 fused=fused),)
    else:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return [c for sh in sheets for c in sh.calls]
