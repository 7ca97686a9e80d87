"""Layer pairs. Each forward returns (out, cache); each backward takes (dout, cache), returns the
input gradient and *adds* into its parameter gradients (views into one flat buffer), so tied
weights and residual branches need no special case.

Every matrix product goes through minigpt.counting.meter.matmul (the int8 ones through METER.matmul_int8
and METER.matmul_w8) and every elementwise pass is counted with METER.op, under the scope the
caller has set. Arrays come from backend.xp (NumPy or CuPy).

The counted passes a decode step also runs (layernorm_normalize, causal_softmax_forward through
cached_attention, gelu_tanh) are functions of their own, on rows, so the decode steps
(nn/decode.py) call them as the general forwards do and each op's sizes are written once. Each hands rows that fit one block (a decode step's) to its row
kernel directly, as backend.by_rows would, without that call: on one row the call costs as much
as a few of the kernel's own NumPy passes.
"""

import math
from typing import NamedTuple

from minigpt import backend, kernels
from minigpt.counting import scopes
from minigpt.counting.meter import METER, matmul
from minigpt.nn import cuda_kernels, lowbit, quant, tiled

if kernels.AVAILABLE:
    from minigpt.kernels import fused as fk


def fused() -> bool:
    """Whether the training path runs the fused kernels (minigpt/kernels/fused.py): Numba chosen
    (kernels.active()) and the arrays in host memory. Their records differ from NumPy's passes
    (closed_form's `fused` schedule predicts them)."""
    return kernels.numba_on() and backend.device == "cpu"


def _nbytes(*arrays) -> int:
    n = 0
    for a in arrays:  # a loop, not sum() over a generator: called a few hundred times a decode step
        n += a.nbytes
    return n


# ----------------------------------------------------------------------------- embedding


def embedding_forward(idx, wte, wpe, pos0=0):
    """Token plus position embedding. idx (B, T) ints; wte (V, C); wpe (block_size, C)."""
    B, T = idx.shape
    with METER.op(kind="embedding", op="lookup") as c:
        out = wte[idx] + wpe[pos0 : pos0 + T]  # (B, T, C)
        row = wte.itemsize * wte.shape[1]
        c.count(elements=out.size, bytes_read=idx.nbytes + (B * T + T) * row,
                bytes_written=out.nbytes, dtype=out.dtype)
    return out, (idx, pos0)


def embedding_backward(dout, cache, dwte, dwpe):
    idx, pos0 = cache
    T, C = dout.shape[1:]
    with METER.op(kind="embedding", op="grad_table") as c:
        backend.scatter_add(dwte, idx.reshape(-1), dout.reshape(-1, C))
        c.count(elements=dout.size, bytes_read=idx.nbytes + 2 * dout.nbytes,
                bytes_written=dout.nbytes, dtype=dout.dtype)
    with METER.op(kind="embedding", op="grad_position") as c:
        dwpe[pos0 : pos0 + T] += dout.sum(axis=0)
        c.count(elements=dout.size, bytes_read=dout.nbytes + 2 * T * C * dout.itemsize,
                bytes_written=T * C * dout.itemsize, dtype=dout.dtype)


# ----------------------------------------------------------------------------- layernorm


LAYERNORM_EPS = 1e-5  # GPT-2's


def _layernorm_rows(xs, xh, o, s, w, b, eps):
    """LayerNorm of the rows xs: xh the normalised rows, o the output, s the reciprocal std."""
    xp = backend.xp
    xp.subtract(xs, backend.row_mean(xs), out=xh)  # centred
    xp.multiply(xh, xh, out=o)  # squares, in the output block until it is written
    xp.add(backend.row_mean(o), eps, out=s)  # variance + eps
    xp.sqrt(s, out=s)
    xp.divide(1.0, s, out=s)
    xh *= s
    xp.multiply(xh, w, out=o)
    o += b


def layernorm_normalize(x2, w, b, eps=LAYERNORM_EPS):
    """The counted LayerNorm of rows x2 (N, C), in blocks of rows: (out, xhat, rstd), xhat the
    normalised rows (N, C) and rstd the reciprocal stds (N, 1)."""
    xp = backend.xp
    xhat, out = xp.empty(x2.shape, x2.dtype), xp.empty(x2.shape, x2.dtype)
    rstd = xp.empty((x2.shape[0], 1), dtype=x2.dtype)
    with METER.op(kind="layernorm", op="normalize") as c:
        if x2.nbytes <= backend.BLOCK_BYTES:
            _layernorm_rows(x2, xhat, out, rstd, w, b, eps)
        else:
            backend.by_rows(_layernorm_rows, x2.shape[1] * x2.itemsize, (x2, xhat, out, rstd), w, b, eps)
        c.count(elements=x2.size, bytes_read=x2.nbytes + w.nbytes + b.nbytes,
                bytes_written=out.nbytes + xhat.nbytes + rstd.nbytes, dtype=x2.dtype)
    return out, xhat, rstd


class FusedNormCache(NamedTuple):
    """What the fused LayerNorm keeps: its input rows and their statistics (xhat is recomputed)."""

    x: object  # (N, C) the input rows (the residual stream: nothing writes over it)
    w: object  # (C,)
    mean: object  # (N,)
    rstd: object  # (N,)


def layernorm_forward(x, w, b, eps=LAYERNORM_EPS):
    """x (..., C) normalised over C, then scaled by w and shifted by b."""
    x2 = x.reshape(-1, x.shape[-1])  # rows (N, C)
    if fused():
        return _layernorm_fused(x2, None, w, b, eps, x.shape)
    out, xhat, rstd = layernorm_normalize(x2, w, b, eps)
    return out.reshape(x.shape), (xhat, w, rstd)


def _layernorm_fused(x2, a2, w, b, eps, shape):
    """The fused LayerNorm of rows x2, or of x2 + a2 written over a2 (a residual add) if a2 is
    given: (out, FusedNormCache), out shaped as `shape`."""
    xp = backend.xp
    N = x2.shape[0]
    out = xp.empty(x2.shape, x2.dtype)
    mean, rstd = xp.empty(N, x2.dtype), xp.empty(N, x2.dtype)
    op = "normalize_fused" if a2 is None else "residual_normalize"
    with METER.op(kind="layernorm", op=op) as c:
        if a2 is None:
            fk.layernorm_forward(x2, w, b, eps, out, mean, rstd)
        else:
            fk.residual_layernorm_forward(x2, a2, w, b, eps, out, mean, rstd)
            x2 = a2  # the stream after the add: what the backward normalises again
        c.count(*fused_norm_sizes(x2, a2 is not None, w, b, out, mean, rstd), dtype=x2.dtype)
    return out.reshape(shape), FusedNormCache(x2, w, mean, rstd)


def fused_norm_sizes(x2, residual: bool, w, b, out, mean, rstd) -> tuple:
    """(elements, bytes read, bytes written) of the fused LayerNorm of rows x2 into out, with the
    residual add (x2 and the branch read, the stream written back) or without: its record's sizes,
    for this path and the compiled decode step's (nn/compiled.py)."""
    n = 2 if residual else 1
    return x2.size, n * x2.nbytes + w.nbytes + b.nbytes, n * out.nbytes + mean.nbytes + rstd.nbytes


def block_residual_norm(x, branch, w, b):
    """A block's first residual add and its ln_2, in the RESIDUAL_1 and LN_2 scopes: one pass
    in the fused schedule (the add inside the norm's), two in NumPy's. (stream, out, cache)."""
    if fused():
        with METER.scope(scopes.LN_2):
            return residual_layernorm_forward(x, branch, w, b)
    with METER.scope(scopes.RESIDUAL_1):
        x = residual_forward(x, branch)
    with METER.scope(scopes.LN_2):
        out, cache = layernorm_forward(x, w, b)
    return x, out, cache


def residual_layernorm_forward(x, branch, w, b, eps=LAYERNORM_EPS):
    """x + branch (written over branch, as residual_forward) and the LayerNorm of that sum, in one
    pass: (stream, out, cache). Fused schedule only (fused())."""
    C = x.shape[-1]
    a2 = branch.reshape(-1, C)  # (N, C), a view of a contiguous branch (else a copy, summed into)
    out, cache = _layernorm_fused(x.reshape(-1, C), a2, w, b, eps, x.shape)
    return a2.reshape(x.shape), out, cache


def layernorm_backward(dout, cache, dw, db, into=None):
    """dx, written over dout (the model hands each backward a gradient nothing else reads).

    into: with a fused cache, the residual stream's gradient to add dx into (returned), the
    residual_backward that follows a LayerNorm's backward done in the same pass."""
    if isinstance(cache, FusedNormCache):
        return _layernorm_backward_fused(dout, cache, dw, db, into)
    xp = backend.xp
    xhat, w, rstd = cache  # xhat (N, C), rstd (N, 1)
    dx = dout.reshape(xhat.shape)  # (N, C)

    def rows(r):
        g, xh = dx[r], xhat[r]  # g: dout coming in, dx going out
        tmp = xp.multiply(g, xh)
        dw_part, db_part = tmp.sum(axis=0), g.sum(axis=0)
        g *= w  # dL/dxhat
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        xp.multiply(g, xh, out=tmp)
        proj = backend.row_mean(tmp)  # (rows, 1)
        g -= backend.row_mean(g)
        xp.multiply(xh, proj, out=tmp)
        g -= tmp
        g *= rstd[r]
        return dw_part, db_part

    with METER.op(kind="layernorm", op="grad") as c:
        for dw_part, db_part in backend.map_rows(rows, xhat.shape[0], xhat.shape[1] * xhat.itemsize):
            dw += dw_part
            db += db_part
        c.count(elements=xhat.size, bytes_read=_nbytes(dout, xhat, w, rstd, dw, db),
                bytes_written=_nbytes(dx, dw, db), dtype=xhat.dtype)
    return dx.reshape(dout.shape)  # dout itself (a copy's result if dout was not contiguous)


def _layernorm_backward_fused(dout, cache, dw, db, into):
    x2, w, mean, rstd = cache
    d2 = dout.reshape(x2.shape)
    dx = d2 if into is None else into.reshape(x2.shape)
    op = "grad_fused" if into is None else "grad_residual"
    with METER.op(kind="layernorm", op=op) as c:
        fk.layernorm_backward(d2, x2, mean, rstd, w, dx, dw, db, into is not None, fk.parts(x2.shape[0]))
        read = _nbytes(d2, x2, mean, rstd, w, dw, db) + (0 if into is None else dx.nbytes)
        c.count(elements=x2.size, bytes_read=read, bytes_written=_nbytes(dx, dw, db), dtype=x2.dtype)
    return dx.reshape(dout.shape)


# ----------------------------------------------------------------------------- linear


def linear_forward(x, w, b):
    """x (..., C) @ w (C, OC) + b (OC,), under the caller's scope (e.g. h3.attn.c_attn).
    An int8 weight (quant.Int8Weight) runs its quantized layer instead; a packed one
    (lowbit.PackedWeight) its kernel, which adds the bias too (one "x@w+b" record: the bias
    adds were three of a decode step's fourteen calls a layer); a tiled one (tiled.TiledWeight) its own
    product (weight_product), then the bias add as a float weight's (inference only: a packed
    weight keeps no cache, a tiled one the float weight's)."""
    if isinstance(w, quant.Int8Weight):
        return quant.linear_forward(x, w, b)
    C, OC = w.shape
    x2 = x.reshape(-1, C)  # (N, C)
    if isinstance(w, lowbit.PackedWeight):
        return lowbit.product(x2, w, bias=b).reshape(*x.shape[:-1], OC), None
    out = weight_product(x2, w)  # (N, OC)
    if b is not None:
        with METER.op(kind="bias", op="add") as c:
            out += b
            c.count(*bias_add_sizes(out, b), dtype=out.dtype)
    return out.reshape(*x.shape[:-1], OC), (x2, w.w if isinstance(w, tiled.TiledWeight) else w)


def bias_add_sizes(out, b) -> tuple:
    """(elements, bytes read, bytes written) of out += b (a row bias over out's rows)."""
    return out.size, out.nbytes + b.nbytes, out.nbytes


def linear_backward(dout, cache, dw, db):
    x2, w = cache
    C, OC = w.shape
    d2 = dout.reshape(-1, OC)  # (N, OC)
    dw += matmul(x2.T, d2, op="grad_w")  # (C, OC)
    with METER.op(kind="bias", op="grad") as c:
        db += d2.sum(axis=0)
        c.count(elements=d2.size, bytes_read=d2.nbytes + db.nbytes, bytes_written=db.nbytes,
                dtype=d2.dtype)
    dx = matmul(d2, w.T, op="grad_x")  # (N, C)
    return dx.reshape(*dout.shape[:-1], C)


# ----------------------------------------------------------------------------- attention


def _causal_mask(T, Tk, pos0, dtype, device):
    """(T, Tk) additive mask: 0 where query pos0+i may see key j (j <= pos0 + i), else -inf."""
    xp = backend.xp
    i = xp.arange(T)[:, None] + pos0
    j = xp.arange(Tk)[None, :]
    return xp.where(j <= i, 0.0, -xp.inf).astype(dtype)


def _softmax_rows(a, scale, mask):
    """Softmax over the last axis of scale * a (+ mask, unless None), in place."""
    xp = backend.xp
    a *= scale
    if mask is not None:
        a += mask
    a -= backend.row_max(a)
    xp.exp(a, out=a)
    a /= backend.row_sum(a)


def causal_softmax_forward(scores, scale, pos0=0):
    """Softmax over keys of scale * scores, with the causal mask. scores (B, H, T, Tk), in place."""
    if cuda_kernels.active():
        return cuda_kernels.causal_softmax_forward(scores, scale, pos0)
    T, Tk = scores.shape[-2:]
    if fused():
        return _causal_softmax_fused(scores, scale, pos0)
    # A query at or past the last key sees every key (a decode step's one query): no mask to add.
    mask = _causal_mask(T, Tk, pos0, scores.dtype, backend.device) if pos0 + 1 < Tk else None
    softmax_causal(scores.reshape(-1, T, Tk), scale, mask)  # (B*H, T, Tk), a view
    return scores


def softmax_causal(att, scale, mask):
    """The counted causal softmax over the last axis of scale * att (+ mask: an additive
    (T, Tk) mask, or None where every query sees every key), in place, in blocks of att's first
    axis. att (R, ..., Tk)."""
    with METER.op(kind="softmax", op="causal") as c:
        if att.nbytes <= backend.BLOCK_BYTES:
            _softmax_rows(att, scale, mask)
        else:
            backend.by_rows(_softmax_rows, att.nbytes // att.shape[0], (att,), scale, mask)
        c.count(elements=att.size, bytes_read=att.nbytes, bytes_written=att.nbytes, dtype=att.dtype)
    return att


def visible_scores(T: int, Tk: int, pos0: int) -> int:
    """Scores a causal mask keeps in one (T, Tk) block: query i sees min(pos0 + i + 1, Tk) keys."""
    if Tk >= pos0 + T:
        return T * pos0 + T * (T + 1) // 2
    return sum(min(pos0 + i + 1, Tk) for i in range(T))


def _causal_softmax_fused(scores, scale, pos0):
    """scale, mask and softmax in one pass over the visible scores; the hidden ones written 0."""
    T, Tk = scores.shape[-2:]
    a3 = scores.reshape(-1, T, Tk)  # (B*H, T, Tk)
    visible = a3.shape[0] * visible_scores(T, Tk, pos0)
    with METER.op(kind="softmax", op="causal_fused") as c:
        fk.causal_softmax_forward(a3, scale, pos0, fk.fast(a3))
        c.count(elements=visible, bytes_read=visible * a3.itemsize, bytes_written=a3.nbytes,
                dtype=a3.dtype)
    return scores


def causal_softmax_backward(datt, att, scale):
    """dscores = scale * att * (datt - sum(datt * att)), per row of keys, written over datt."""
    if cuda_kernels.active():
        return cuda_kernels.causal_softmax_backward(datt, att, scale)
    T, Tk = att.shape[-2:]
    if fused():
        d3, a3 = datt.reshape(-1, T, Tk), att.reshape(-1, T, Tk)
        visible = a3.shape[0] * visible_scores(T, Tk, Tk - T)
        with METER.op(kind="softmax", op="grad_fused") as c:
            fk.causal_softmax_backward(d3, a3, scale, Tk - T)
            c.count(elements=visible, bytes_read=2 * visible * a3.itemsize, bytes_written=d3.nbytes,
                    dtype=a3.dtype)
        return d3.reshape(att.shape)
    a3, d3 = att.reshape(-1, T, Tk), datt.reshape(-1, T, Tk)  # (B*H, T, Tk)

    def rows(r):
        ds, a = d3[r], a3[r]
        ds *= a
        ds -= a * backend.row_sum(ds)
        ds *= scale

    with METER.op(kind="softmax", op="grad") as c:
        backend.map_rows(rows, a3.shape[0], T * Tk * att.itemsize)
        c.count(elements=att.size, bytes_read=datt.nbytes + att.nbytes, bytes_written=datt.nbytes,
                dtype=att.dtype)
    return d3.reshape(att.shape)


def useful_causal_flops(B, H, T, pos0, head_size):
    """Products a causal mask keeps: query pos0+i sees pos0+i+1 of the pos0 + T keys."""
    visible = T * pos0 + T * (T + 1) // 2  # sum of pos0 + i + 1 over i < T
    return 2 * B * H * visible * head_size


class AttentionCache(NamedTuple):
    """What attention_forward keeps for attention_backward."""

    c_attn: tuple  # linear_forward's cache of the q, k, v projection
    q: object  # (B, H, T, hs) views into c_attn's output
    k: object
    v: object
    probs: object  # (B, H, T, T) the softmax's output
    att: object  # probs after attention dropout (probs itself without dropout)
    drop: object  # the dropout mask, or None
    c_proj: tuple  # linear_forward's cache of the output projection


def attention_forward(x, p, n_head, kv=None, dropout=0.0, rng=None):
    """Causal multi-head self-attention. x (B, T, C); p: this block's parameter views.

    kv: a KVCache layer slot for cached decoding (keys and values of earlier positions), or None.
    """
    xp = backend.xp
    B, T, C = x.shape
    hs = C // n_head
    with METER.scope(scopes.C_ATTN):
        qkv, c_attn = linear_forward(x, p["attn.c_attn.weight"], p["attn.c_attn.bias"])  # (B, T, 3C)
    # Heads as strided views, no copies: BLAS takes a matrix whose rows lie 3C apart, a few
    # percent slower than a contiguous one and far cheaper than making it one.
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # each (B, H, T, hs)
    pos0 = 0
    if kv is not None and kv.int8:
        return _attention_int8_kv(q, k, v, kv, p, B, T, C, n_head), None
    if kv is not None:
        pos0 = kv.length
        k, v = kv.append(k, v)  # (B, H, pos0 + T, hs)
    useful = useful_causal_flops(B, n_head, T, pos0, hs)
    with METER.scope(scopes.SCORES):
        att = matmul(q, k.swapaxes(-1, -2), op="q@kT", useful_flops=useful)  # (B, H, T, Tk)
    with METER.scope(scopes.SOFTMAX):
        att = causal_softmax_forward(att, 1.0 / math.sqrt(hs), pos0)
    probs, drop = att, None
    if dropout > 0.0:
        with METER.scope(scopes.ATTN_DROPOUT):
            att, drop = dropout_forward(probs, dropout, rng)
    y = xp.empty((B, T, n_head, hs), dtype=x.dtype)  # heads side by side again
    with METER.scope(scopes.MIX):
        matmul(att, v, op="att@v", useful_flops=useful, out=y.transpose(0, 2, 1, 3))
    with METER.scope(scopes.C_PROJ):
        out, c_proj = linear_forward(y.reshape(B, T, C), p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    return out, AttentionCache(c_attn, q, k, v, probs, att, drop, c_proj)


def cached_attention(q, keys, values, Tk, y):
    """The counted attention of T new queries against the first Tk positions of a float KV cache
    that already holds their keys and values (query i sees positions up to Tk - T + i): q
    (B, H, T, hs), any strides; keys, values a layer's cache arrays (B, Tmax, H, hs); y
    (B, T, H, hs) receives the heads' outputs. The decode steps' attention (nn/decode.py,
    model.block_decode), with attention_forward's records: its products on the cache as it
    lies (BLAS takes rows H * hs apart) and causal_softmax_forward (the fused schedule's one pass:
    a few microseconds for a decode step's row of scores, where NumPy's passes take seven)."""
    B, H, T, hs = q.shape
    pos0 = Tk - T
    useful = useful_causal_flops(B, H, T, pos0, hs)
    k, v = keys[:, :Tk].swapaxes(1, 2), values[:, :Tk].swapaxes(1, 2)  # (B, H, Tk, hs) views
    with METER.scope(scopes.SCORES):
        att = matmul(q, k.swapaxes(-1, -2), op="q@kT", useful_flops=useful)  # (B, H, T, Tk)
    with METER.scope(scopes.SOFTMAX):
        causal_softmax_forward(att, 1.0 / math.sqrt(hs), pos0)
    with METER.scope(scopes.MIX):
        matmul(att, v, op="att@v", useful_flops=useful, out=y.transpose(0, 2, 1, 3))


# The Python decode step's attention over many caches (kernels/attend.py) runs on every core
# from this many bytes of keys a layer, over all sequences: below it, waking a second thread cost
# more than it gave at 8 GPT-2 sequences (docs/benchmarks.md, "Many sequences' attention"). The
# compiled step (nn/compiled.py) always takes every core: its threads are still awake.
PARALLEL_KEY_BYTES = 2 << 20


def attention_threads(B: int, key_bytes: int, threads: int, own: int) -> tuple:
    """(threads, parts) for the decode attention of B sequences over key_bytes of keys a layer,
    with `threads` for the products and `own` the caller's count: fewer sequences than threads
    split each sequence's heads into threads // B parts on every core (one GPT-2 sequence: 210 ->
    164 us a step's attention on two cores); otherwise one part a sequence, on every core from
    PARALLEL_KEY_BYTES of keys, else on the caller's count."""
    if B < threads:
        return threads, threads // B
    return (threads if key_bytes >= PARALLEL_KEY_BYTES else own), 1


def many_caches_attention_sizes(q, n: int, y) -> tuple:
    """The sizes of the three records of a decode step's attention over many caches in one call
    each (kernels/attend.py, from nn/decode.py and nn/compiled.py): queries q (B, H, hs) against
    n cached positions in all (the new ones included), into y (B, H, hs). The scores' and the
    mix's (FLOPs, bytes read, bytes written), the softmax's (elements, bytes read, bytes
    written): each position's key is read once per head (hs values) and its score written once;
    the mix reads each score and value once and writes y."""
    H, hs = q.shape[1:]
    s = q.itemsize
    flops = 2 * H * hs * n
    return ((flops, q.nbytes + H * n * hs * s, H * n * s), (H * n, H * n * s, H * n * s),
            (flops, H * n * s + H * n * hs * s, y.nbytes))


def _attention_int8_kv(q, k, v, kv, p, B, T, C, n_head):
    """Cached attention with keys and values stored in int8 (one scale per vector): the products
    read the cache at one byte an element and apply the scales to their float side."""
    xp = backend.xp
    hs = C // n_head
    pos0 = kv.length
    kq, ks, vq, vs = kv.append(k, v)  # (B, H, Tk, hs) int8 and (B, H, Tk, 1) scales
    useful = useful_causal_flops(B, n_head, T, pos0, hs)
    with METER.scope(scopes.SCORES):
        att = METER.matmul_w8(q, xp.ascontiguousarray(kq.swapaxes(-1, -2)), op="q@kT", useful_flops=useful)
        att = quant.rescale(att, (ks.swapaxes(-1, -2),), att.dtype)  # one scale per key
    with METER.scope(scopes.SOFTMAX):
        att = causal_softmax_forward(att, 1.0 / math.sqrt(hs), pos0)
    with METER.scope(scopes.MIX):
        att = quant.rescale(att, (vs.swapaxes(-1, -2),), att.dtype)  # fold value scales into att
        y = METER.matmul_w8(att, xp.ascontiguousarray(vq), op="att@v", useful_flops=useful)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
    with METER.scope(scopes.C_PROJ):
        out, _ = linear_forward(y, p["attn.c_proj.weight"], p["attn.c_proj.bias"])
    return out


def attention_backward(dout, cache: AttentionCache, p, g):
    """g: this block's gradient views."""
    xp = backend.xp
    c_attn, q, k, v, probs, att, drop, c_proj = cache
    B, H, T, hs = q.shape
    C = H * hs
    useful = useful_causal_flops(B, H, T, 0, hs)
    with METER.scope(scopes.C_PROJ):
        dy = linear_backward(dout, c_proj, g["attn.c_proj.weight"], g["attn.c_proj.bias"])
    dy = dy.reshape(B, T, H, hs).transpose(0, 2, 1, 3)  # (B, H, T, hs) view
    # The three gradients land in their slots of one (B, T, 3, H, hs) buffer: c_attn's layout.
    dqkv = xp.empty((B, T, 3, H, hs), dtype=q.dtype)
    dq, dk, dv = dqkv.transpose(2, 0, 3, 1, 4)  # each (B, H, T, hs), views
    with METER.scope(scopes.MIX):
        datt = matmul(dy, v.swapaxes(-1, -2), op="grad_att", useful_flops=useful)  # (B, H, T, T)
        matmul(att.swapaxes(-1, -2), dy, op="grad_v", useful_flops=useful, out=dv)
    if drop is not None:
        with METER.scope(scopes.ATTN_DROPOUT):
            datt = dropout_backward(datt, drop)
    with METER.scope(scopes.SOFTMAX):
        dscores = causal_softmax_backward(datt, probs, 1.0 / math.sqrt(hs))
    with METER.scope(scopes.SCORES):
        matmul(dscores, k, op="grad_q", useful_flops=useful, out=dq)
        matmul(dscores.swapaxes(-1, -2), q, op="grad_k", useful_flops=useful, out=dk)
    with METER.scope(scopes.C_ATTN):
        return linear_backward(dqkv.reshape(B, T, 3 * C), c_attn, g["attn.c_attn.weight"],
                               g["attn.c_attn.bias"])


# ----------------------------------------------------------------------------- MLP


_GELU_K = math.sqrt(2.0 / math.pi)


def _gelu_rows(xs, t, o):
    """GELU of the rows xs into o; t keeps the tanh for the backward."""
    xp = backend.xp
    xp.multiply(xs, xs, out=t)
    t *= _GELU_K * 0.044715
    t += _GELU_K
    t *= xs
    xp.tanh(t, out=t)  # kept for the backward
    xp.add(t, 1.0, out=o)
    o *= xs
    o *= 0.5


def gelu_forward(x):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    if cuda_kernels.active():
        return cuda_kernels.gelu_forward(x)
    x2 = x.reshape(-1, x.shape[-1])  # (N, 4C)
    out, th = gelu_tanh(x2)
    return out.reshape(x.shape), (x2, th)


def gelu_tanh(x2):
    """The counted GELU of rows x2 (N, 4C), in blocks of rows: (out, th), th the tanh the
    backward reads."""
    xp = backend.xp
    th, out = xp.empty(x2.shape, x2.dtype), xp.empty(x2.shape, x2.dtype)
    with METER.op(kind="gelu", op="tanh") as c:
        if x2.nbytes <= backend.BLOCK_BYTES:
            _gelu_rows(x2, th, out)
        else:
            backend.by_rows(_gelu_rows, x2.shape[1] * x2.itemsize, (x2, th, out))
        c.count(elements=x2.size, bytes_read=x2.nbytes, bytes_written=out.nbytes + th.nbytes,
                dtype=x2.dtype)
    return out, th


def gelu_backward(dout, cache):
    """d/dx = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), times dout;
    written over dout."""
    if cuda_kernels.active():
        return cuda_kernels.gelu_backward(dout, cache)
    xp = backend.xp
    x2, th = cache  # (N, 4C) each
    dx = dout.reshape(x2.shape)

    def rows(r):
        xs, t = x2[r], th[r]
        g = xs * xs
        g *= 0.5 * _GELU_K * 3 * 0.044715
        g += 0.5 * _GELU_K
        g *= xs  # 0.5 x sqrt(2/pi) (1 + 3 * 0.044715 x^2)
        tmp = t * t
        xp.subtract(1.0, tmp, out=tmp)
        g *= tmp
        xp.multiply(t, 0.5, out=tmp)
        g += tmp
        g += 0.5
        dx[r] *= g

    with METER.op(kind="gelu", op="grad") as c:
        backend.map_rows(rows, x2.shape[0], x2.shape[1] * x2.itemsize)
        c.count(elements=x2.size, bytes_read=_nbytes(x2, th, dout), bytes_written=dx.nbytes,
                dtype=x2.dtype)
    return dx.reshape(dout.shape)


class BiasGeluCache(NamedTuple):
    """What the fused bias + GELU keeps: the product before its bias, and the bias."""

    h: object  # (N, 4C) x @ w of c_fc
    b: object  # (4C,)


def bias_gelu_forward(h, b):
    """gelu(h + b) in one pass, h (N, 4C) the c_fc product without its bias (fused schedule)."""
    out = backend.xp.empty(h.shape, h.dtype)
    with METER.op(kind="gelu", op="bias_tanh") as c:
        fk.bias_gelu_forward(h, b, out, fk.fast(h))
        c.count(*bias_gelu_sizes(h, b, out), dtype=h.dtype)
    return out, BiasGeluCache(h, b)


def bias_gelu_sizes(h, b, out) -> tuple:
    """(elements, bytes read, bytes written) of out = gelu(h + b)."""
    return h.size, h.nbytes + b.nbytes, out.nbytes


def bias_gelu_backward(dout, cache: BiasGeluCache, db):
    """d(h + b) = dout * gelu'(h + b), written over dout; db += its column sums (c_fc's bias
    gradient, in the same pass)."""
    h, b = cache
    d2 = dout.reshape(h.shape)
    with METER.op(kind="gelu", op="grad_bias") as c:
        fk.bias_gelu_backward(d2, h, b, db, fk.parts(h.shape[0]), fk.fast(h))
        c.count(elements=h.size, bytes_read=_nbytes(d2, h, b, db), bytes_written=d2.nbytes + db.nbytes,
                dtype=h.dtype)
    return d2


def fuses_mlp(p) -> bool:
    """Whether a block's MLP runs the fused schedule (c_fc's bias added inside the GELU's pass):
    fused() and float or packed weights (lowbit: their own product, then the same pass). int8
    weights (quant.Int8Weight) run their product, then NumPy's passes."""
    return fused() and not isinstance(p["mlp.c_fc.weight"], quant.Int8Weight)


def weight_product(x2, w):
    """x2 (N, C) @ w with no bias, counted as "x@w": a float weight's matmul, a packed one's
    product (lowbit.product) or a tiled one's (tiled.product), for a bias a fused pass adds."""
    if isinstance(w, lowbit.PackedWeight):
        return lowbit.product(x2, w)
    if isinstance(w, tiled.TiledWeight):
        return tiled.product(x2, w)
    return matmul(x2, w, op="x@w")


def mlp_forward(x, p):
    if fuses_mlp(p):
        C = x.shape[-1]
        x2 = x.reshape(-1, C)  # (N, C)
        with METER.scope(scopes.C_FC):
            h = weight_product(x2, p["mlp.c_fc.weight"])  # (N, 4C), its bias added by the GELU
        with METER.scope(scopes.GELU):
            h, gelu = bias_gelu_forward(h, p["mlp.c_fc.bias"])
        with METER.scope(scopes.C_PROJ):
            out, c_proj = linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (N, C)
        return out.reshape(x.shape), ((x2, p["mlp.c_fc.weight"]), gelu, c_proj)
    with METER.scope(scopes.C_FC):
        h, c_fc = linear_forward(x, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # (B, T, 4C)
    with METER.scope(scopes.GELU):
        h, gelu = gelu_forward(h)
    with METER.scope(scopes.C_PROJ):
        out, c_proj = linear_forward(h, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (B, T, C)
    return out, (c_fc, gelu, c_proj)


def mlp_backward(dout, cache, p, g):
    c_fc, gelu, c_proj = cache
    with METER.scope(scopes.C_PROJ):
        dh = linear_backward(dout, c_proj, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"])
    if isinstance(gelu, BiasGeluCache):
        with METER.scope(scopes.GELU):
            dh = bias_gelu_backward(dh, gelu, g["mlp.c_fc.bias"])
        x2, w = c_fc
        with METER.scope(scopes.C_FC):
            g["mlp.c_fc.weight"][...] += matmul(x2.T, dh, op="grad_w")  # (C, 4C)
            return matmul(dh, w.T, op="grad_x").reshape(dout.shape)  # (N, C)
    with METER.scope(scopes.GELU):
        dh = gelu_backward(dh, gelu)
    with METER.scope(scopes.C_FC):
        return linear_backward(dh, c_fc, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"])


# ----------------------------------------------------------------------------- small pieces


def residual_forward(x, branch):
    """x + branch, written over branch (the branch's fresh output: nothing else keeps it; x is
    kept by the layer that read it, for its backward)."""
    with METER.op(kind="residual", op="add") as c:
        out = backend.xp.add(x, branch, out=branch)
        c.count(*residual_sizes(x, out), dtype=x.dtype)
    return out


def residual_sizes(x, out) -> tuple:
    """(elements, bytes read, bytes written) of out = x + branch."""
    return x.size, 2 * x.nbytes, out.nbytes


def residual_backward(dx, dbranch):
    """The stream's gradient plus the branch's gradient, in place on dx."""
    with METER.op(kind="residual", op="grad") as c:
        dx += dbranch
        c.count(elements=dx.size, bytes_read=2 * dx.nbytes, bytes_written=dx.nbytes, dtype=dx.dtype)
    return dx


def dropout_forward(x, p, rng):
    """Inverted dropout: keep each element with probability 1 - p, scaled by 1 / (1 - p)."""
    with METER.op(kind="dropout", op="mask") as c:
        mask = (backend.asarray(rng.random(x.shape, dtype="float32")) >= p).astype(x.dtype)
        mask *= 1.0 / (1.0 - p)
        out = x * mask
        c.count(elements=x.size, bytes_read=x.nbytes, bytes_written=out.nbytes + mask.nbytes,
                dtype=x.dtype)
    return out, mask


def dropout_backward(dout, mask):
    with METER.op(kind="dropout", op="grad") as c:
        dx = dout * mask
        c.count(elements=dout.size, bytes_read=dout.nbytes + mask.nbytes, bytes_written=dx.nbytes,
                dtype=dx.dtype)
    return dx


def cross_entropy_forward(logits, targets):
    """Mean negative log-likelihood of targets (B, T) under logits (B, T, V)."""
    xp = backend.xp
    V = logits.shape[-1]
    if fused():
        l2, t1 = logits.reshape(-1, V), targets.reshape(-1)
        probs, losses = xp.empty(logits.shape, logits.dtype), xp.empty(t1.size, xp.float64)
        with METER.op(kind="cross_entropy", op="loss") as c:  # the same passes' counts, one pass
            fk.cross_entropy_forward(l2, t1, probs.reshape(-1, V), losses, fk.fast(l2))
            c.count(elements=logits.size, bytes_read=logits.nbytes + targets.nbytes,
                    bytes_written=probs.nbytes, dtype=logits.dtype)
        return losses.mean(), (probs, targets)
    with METER.op(kind="cross_entropy", op="loss") as c:
        probs = logits - logits.max(axis=-1, keepdims=True)  # (B, T, V), shifted logits for now
        rows = xp.arange(targets.size)
        picked = probs.reshape(-1, V)[rows, targets.reshape(-1)]  # shifted logit of each target
        xp.exp(probs, out=probs)
        total = probs.sum(axis=-1, keepdims=True)  # (B, T, 1)
        probs /= total
        # -log p(target) = log(sum exp) - shifted target logit; averaged in float64
        loss = (xp.log(total.reshape(-1).astype(xp.float64)) - picked).mean()
        c.count(elements=logits.size, bytes_read=logits.nbytes + targets.nbytes,
                bytes_written=probs.nbytes, dtype=logits.dtype)
    return loss, (probs, targets)


def cross_entropy_backward(cache, dloss=1.0):
    """dlogits = (probs - onehot(targets)) * dloss / N, written over the cached probabilities."""
    xp = backend.xp
    probs, targets = cache
    V = probs.shape[-1]
    with METER.op(kind="cross_entropy", op="grad") as c:
        flat = probs.reshape(-1, V)
        if fused():
            fk.cross_entropy_backward(flat, targets.reshape(-1), dloss / flat.shape[0])
        else:
            flat[xp.arange(flat.shape[0]), targets.reshape(-1)] -= 1.0
            probs *= dloss / flat.shape[0]
        c.count(elements=probs.size, bytes_read=probs.nbytes + targets.nbytes,
                bytes_written=probs.nbytes, dtype=probs.dtype)
    return probs
