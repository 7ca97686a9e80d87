"""The closed-form cost model: every record the meter would write, predicted from shapes alone.

predict_training_step(cfg, batch, seq)   forward + backward + optimizer of one optimizer step
predict_forward(cfg, batch, seq, phase)  one forward pass ("forward", "eval" or "prefill")
predict_decode(cfg, batch, position)     one KV-cached decode step for the token at `position`
allreduce_bytes(nbytes, ranks)           bytes each rank sends (and receives) in a ring allreduce

Each returns {(scope, op, kind, phase, dtype): Record}, the meter's own format, so a test can
compare prediction and measurement key by key. The formulas follow minigpt.meter's conventions:
a matmul (..., M, K) @ (..., K, N) is 2*batch*M*N*K FLOPs and moves A, B and C once; an
elementwise op is FLOPS_PER_ELEMENT per element and moves its inputs and outputs once.
"""

from dataclasses import dataclass

from minigpt.meter import FLOPS_PER_ELEMENT as FPE
from minigpt.meter import Record

INDEX_BYTES = 8  # token ids are int64


@dataclass
class _Sheet:
    """Accumulates predicted records for one phase."""

    phase: str
    itemsize: int = 4
    dtype: str = "float32"

    def __post_init__(self):
        self.records: dict[tuple, Record] = {}

    def _add(self, scope, op, kind, flops, read, written, useful=None, dtype=None):
        key = (scope, op, kind, self.phase, dtype or self.dtype)
        r = self.records.setdefault(key, Record())
        r.calls += 1
        r.flops += flops
        r.useful_flops += flops if useful is None else useful
        r.bytes_read += read
        r.bytes_written += written

    def product(self, scope, op, batch, m, k, n, a_elems, b_elems, useful=None, dtype=None):
        """(batch, m, k) @ (k, n) products; A and B hold a_elems and b_elems elements.

        dtype "int8": A and B at one byte, C at four (int32 sums); "w8a32": B at one byte."""
        s = self.itemsize
        a_size, b_size, c_size = {"int8": (1, 1, 4), "w8a32": (s, 1, s)}.get(dtype, (s, s, s))
        self._add(scope, op, "matmul", 2 * batch * m * n * k, a_elems * a_size + b_elems * b_size,
                  batch * m * n * c_size, useful, dtype)

    def elementwise(self, scope, kind, op, n, read_elems, written_elems, extra_read_bytes=0,
                    factor=1, dtype=None, extra_written_bytes=0):
        s = self.itemsize
        self._add(scope, op, kind, factor * FPE[kind, op] * n, read_elems * s + extra_read_bytes,
                  written_elems * s + extra_written_bytes, dtype=dtype)

    def quantize(self, scope, rows, cols):
        """Per-row int8 quantization of a (rows, cols) float array: int8 values and row scales."""
        self.elementwise(scope, "quant", "quantize", rows * cols, rows * cols, 0,
                         extra_written_bytes=rows * cols + rows * 4, dtype="int8")

    def rescale(self, scope, n_out, factor_elems, n_factors=1):
        """n_out accumulators (read at 4 bytes) times n_factors float32 scales (factor_elems)."""
        self._add(scope, "rescale", "quant", n_factors * FPE["quant", "rescale"] * n_out,
                  4 * n_out + 4 * factor_elems, n_out * self.itemsize)


def _causal_useful(B, H, T, Tk, pos0, head_size):
    visible = sum(min(pos0 + i + 1, Tk) for i in range(T))
    return 2 * B * H * visible * head_size


def _int8_product(sh, scope, op, N, C, OC, mode):
    """x (N, C) @ an int8 weight (C, OC) with per-column scales, by mode (nn/quant.py)."""
    if mode == "w8a32":
        sh.product(scope, op, 1, N, C, OC, N * C, C * OC, dtype="w8a32")
        sh.rescale(scope, N * OC, OC)
    else:
        sh.quantize(scope, N, C)
        sh.product(scope, op, 1, N, C, OC, N * C, C * OC, dtype="int8")
        sh.rescale(scope, N * OC, N + OC, n_factors=2)


def _linear_forward(sh, scope, N, C, OC, mode=None):
    if mode is None:
        sh.product(scope, "x@w", 1, N, C, OC, N * C, C * OC)
    else:
        _int8_product(sh, scope, "x@w", N, C, OC, mode)
    sh.elementwise(scope, "bias", "add", N * OC, N * OC + OC, N * OC)


def _linear_backward(sh, scope, N, C, OC):
    sh.product(scope, "grad_w", 1, C, N, OC, N * C, N * OC)
    sh.elementwise(scope, "bias", "grad", N * OC, N * OC + OC, OC)
    sh.product(scope, "grad_x", 1, N, OC, C, N * OC, C * OC)


def _layernorm_forward(sh, scope, N, C):
    sh.elementwise(scope, "layernorm", "normalize", N * C, N * C + 2 * C, 2 * N * C + N)


def _layernorm_backward(sh, scope, N, C):
    sh.elementwise(scope, "layernorm", "grad", N * C, 2 * N * C + N + 3 * C, N * C + 2 * C)


def _dropout_forward(sh, scope, n):
    sh.elementwise(scope, "dropout", "mask", n, n, 2 * n)


def _dropout_backward(sh, scope, n):
    sh.elementwise(scope, "dropout", "grad", n, 2 * n, n)


def _forward(sh, cfg, B, T, pos0=0, last_only=False, targets=False, dropout=False, q=None):
    """Records of GPT.hidden + lm head (+ loss) for B sequences of T new tokens after pos0.

    q: a quant.QuantConfig for int8 inference (outlier_threshold is data-dependent: not predicted)."""
    C, H, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    hs, N, Tk = C // H, B * T, pos0 + T
    s = sh.itemsize
    mode = q.mode if q is not None else None
    useful = _causal_useful(B, H, T, Tk, pos0, hs)
    if q is not None and q.quantize_embedding:
        sh.elementwise("embedding", "embedding", "lookup_int8", N * C, 0, N * C,
                       extra_read_bytes=N * INDEX_BYTES + N * (C + 4) + T * C * s)
    else:
        sh.elementwise("embedding", "embedding", "lookup", N * C, 0, N * C,
                       extra_read_bytes=N * INDEX_BYTES + (N + T) * C * s)
    if dropout:
        _dropout_forward(sh, "embedding.dropout", N * C)
    kv_int8 = q is not None and q.kv_int8
    n_att = B * H * T * Tk
    for i in range(cfg.n_layer):
        h = f"h{i}"
        _layernorm_forward(sh, f"{h}.ln_1", N, C)
        _linear_forward(sh, f"{h}.attn.c_attn", N, C, 3 * C, mode)
        if kv_int8:  # new keys and values quantized into the cache, read back at one byte
            sh.quantize(f"{h}.attn", B * H * T, hs)
            sh.quantize(f"{h}.attn", B * H * T, hs)
            sh.product(f"{h}.attn.scores", "q@kT", B * H, T, hs, Tk, B * H * T * hs, B * H * Tk * hs,
                       useful, dtype="w8a32")
            sh.rescale(f"{h}.attn.scores", n_att, B * H * Tk)
        else:
            sh.product(f"{h}.attn.scores", "q@kT", B * H, T, hs, Tk, B * H * T * hs, B * H * Tk * hs, useful)
        sh.elementwise(f"{h}.attn.softmax", "softmax", "causal", n_att, n_att, n_att)
        if dropout:
            _dropout_forward(sh, f"{h}.attn.attn_dropout", n_att)
        if kv_int8:
            sh.rescale(f"{h}.attn.mix", n_att, B * H * Tk)
            sh.product(f"{h}.attn.mix", "att@v", B * H, T, Tk, hs, n_att, B * H * Tk * hs, useful,
                       dtype="w8a32")
        else:
            sh.product(f"{h}.attn.mix", "att@v", B * H, T, Tk, hs, n_att, B * H * Tk * hs, useful)
        _linear_forward(sh, f"{h}.attn.c_proj", N, C, C, mode)
        if dropout:
            _dropout_forward(sh, f"{h}.attn.resid_dropout", N * C)
        sh.elementwise(f"{h}.residual_1", "residual", "add", N * C, 2 * N * C, N * C)
        _layernorm_forward(sh, f"{h}.ln_2", N, C)
        _linear_forward(sh, f"{h}.mlp.c_fc", N, C, 4 * C, mode)
        sh.elementwise(f"{h}.mlp.gelu", "gelu", "tanh", 4 * N * C, 4 * N * C, 8 * N * C)
        _linear_forward(sh, f"{h}.mlp.c_proj", N, 4 * C, C, mode)
        if dropout:
            _dropout_forward(sh, f"{h}.mlp.resid_dropout", N * C)
        sh.elementwise(f"{h}.residual_2", "residual", "add", N * C, 2 * N * C, N * C)
    _layernorm_forward(sh, "ln_f", N, C)
    M = B if last_only else N
    if mode is None:
        sh.product("lm_head", "x@wte.T", 1, M, C, V, M * C, V * C)
    else:
        _int8_product(sh, "lm_head", "x@wte.T", M, C, V, mode)
    if targets:
        sh.elementwise("loss", "cross_entropy", "loss", N * V, N * V, N * V,
                       extra_read_bytes=N * INDEX_BYTES)


def _backward(sh, cfg, B, T, dropout=False):
    C, H, V = cfg.n_embd, cfg.n_head, cfg.vocab_size
    hs, N = C // H, B * T
    useful = _causal_useful(B, H, T, T, 0, hs)
    n_att = B * H * T * T
    sh.elementwise("loss", "cross_entropy", "grad", N * V, N * V, N * V, extra_read_bytes=N * INDEX_BYTES)
    sh.product("lm_head", "grad_w", 1, V, N, C, N * V, N * C)
    sh.product("lm_head", "grad_x", 1, N, V, C, N * V, V * C)
    _layernorm_backward(sh, "ln_f", N, C)
    for i in reversed(range(cfg.n_layer)):
        h = f"h{i}"
        if dropout:
            _dropout_backward(sh, f"{h}.mlp.resid_dropout", N * C)
        _linear_backward(sh, f"{h}.mlp.c_proj", N, 4 * C, C)
        sh.elementwise(f"{h}.mlp.gelu", "gelu", "grad", 4 * N * C, 12 * N * C, 4 * N * C)
        _linear_backward(sh, f"{h}.mlp.c_fc", N, C, 4 * C)
        _layernorm_backward(sh, f"{h}.ln_2", N, C)
        sh.elementwise(f"{h}.residual_2", "residual", "grad", N * C, 2 * N * C, N * C)
        if dropout:
            _dropout_backward(sh, f"{h}.attn.resid_dropout", N * C)
        _linear_backward(sh, f"{h}.attn.c_proj", N, C, C)
        sh.product(f"{h}.attn.mix", "grad_att", B * H, T, hs, T, B * H * T * hs, B * H * T * hs, useful)
        sh.product(f"{h}.attn.mix", "grad_v", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        if dropout:
            _dropout_backward(sh, f"{h}.attn.attn_dropout", n_att)
        sh.elementwise(f"{h}.attn.softmax", "softmax", "grad", n_att, 2 * n_att, n_att)
        sh.product(f"{h}.attn.scores", "grad_q", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        sh.product(f"{h}.attn.scores", "grad_k", B * H, T, T, hs, n_att, B * H * T * hs, useful)
        _linear_backward(sh, f"{h}.attn.c_attn", N, C, 3 * C)
        _layernorm_backward(sh, f"{h}.ln_1", N, C)
        sh.elementwise(f"{h}.residual_1", "residual", "grad", N * C, 2 * N * C, N * C)
    if dropout:
        _dropout_backward(sh, "embedding.dropout", N * C)
    sh.elementwise("embedding", "embedding", "grad_table", N * C, 2 * N * C, N * C,
                   extra_read_bytes=N * INDEX_BYTES)
    sh.elementwise("embedding", "embedding", "grad_position", N * C, N * C + 2 * T * C, T * C)


def n_params(cfg) -> int:
    C, L = cfg.n_embd, cfg.n_layer
    return cfg.vocab_size * C + cfg.block_size * C + L * (12 * C * C + 13 * C) + 2 * C


def _optimizer(sh, cfg):
    P = n_params(cfg)
    sh.elementwise("clip", "clip", "norm", P, P, 0)
    sh.elementwise("clip", "clip", "scale", P, P, P)
    sh.elementwise("adamw", "adamw", "update", P, 4 * P, 3 * P)


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
    sh._add("dist", op, "allreduce", allreduce_flops(elements, ranks), sent, sent, dtype=dtype)


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


def _sheet(phase, dtype):
    return _Sheet(phase, itemsize=4 if dtype == "float32" else 8, dtype=dtype)


def predict_training_step(cfg, batch: int, seq: int | None = None, grad_accum: int = 1,
                          clip: bool = True, dtype: str = "float32", ranks: int = 1) -> dict:
    """One optimizer step: grad_accum micro-batches of (batch, seq) tokens, then clip + AdamW.
    ranks > 1: one rank's step of data-parallel training (batch is then its share, batch_size /
    ranks), with the allreduces of phase "communication"."""
    T = seq or cfg.block_size
    drop = cfg.dropout > 0
    fwd, bwd, opt = _sheet("forward", dtype), _sheet("backward", dtype), _sheet("optimizer", dtype)
    for _ in range(grad_accum):
        _forward(fwd, cfg, batch, T, targets=True, dropout=drop)
        _backward(bwd, cfg, batch, T, dropout=drop)
    if clip:
        _optimizer(opt, cfg)
    else:
        P = n_params(cfg)
        opt.elementwise("adamw", "adamw", "update", P, 4 * P, 3 * P)
    comm = _sheet("communication", dtype)
    if ranks > 1:
        _communication(comm, cfg, ranks, dtype)
    return _merge(fwd, bwd, opt, comm)


def predict_forward(cfg, batch: int, seq: int, phase: str = "forward", targets: bool = False,
                    dtype: str = "float32", quant=None) -> dict:
    """A forward pass of (batch, seq) tokens; phase "prefill" keeps only the last position's logits.
    quant: a QuantConfig (int8 inference), or None for float."""
    sh = _sheet(phase, dtype)
    _forward(sh, cfg, batch, seq, last_only=phase == "prefill", targets=targets, q=quant)
    return sh.records


def predict_decode(cfg, batch: int, position: int, dtype: str = "float32", quant=None) -> dict:
    """One decode step: the token at `position` attends to the position + 1 cached keys."""
    sh = _sheet("decode", dtype)
    _forward(sh, cfg, batch, 1, pos0=position, q=quant)
    return sh.records
