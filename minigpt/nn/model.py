"""GPT-2: embeddings, n_layer pre-LayerNorm blocks, final LayerNorm, LM head tied to wte.

The forward runs the layer pairs of layers.py in order, keeping each one's cache; the backward
runs them in reverse (llm.c's gpt2_backward, read as the forward in reverse).
"""

from typing import NamedTuple

from minigpt import backend
from minigpt.config import is_moe_block
from minigpt.counting import scopes
from minigpt.counting.meter import METER, matmul
from minigpt.nn import decode as batched
from minigpt.nn import layers as nn
from minigpt.nn import lowbit, moe, quant, tiled
from minigpt.nn.params import FlatBuffer


class KVCache:
    """Keys and values of every earlier position, per layer, for cached decoding.

    Stored position-major, (L, B, Tmax, H, hs): a decode step's new key (all heads) is one
    contiguous write, where a head-major layout scatters it into H places; the attention products
    read each head's keys as rows H * hs apart, which BLAS takes as they are.
    int8: store them as int8 with one float32 scale per key or value vector (see nn/quant.py)."""

    def __init__(self, cfg, batch: int, dtype="float32", int8: bool = False):
        xp = backend.xp
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch, cfg.block_size, cfg.n_head, hs)  # (L, B, Tmax, H, hs)
        self.int8 = int8
        # Written through now: xp.zeros maps its pages lazily, and the decode steps would then
        # take the page faults, a fresh page every few positions.
        self.k = xp.empty(shape, dtype="int8" if int8 else dtype)
        self.v = xp.empty(shape, dtype="int8" if int8 else dtype)
        self.k.fill(0)
        self.v.fill(0)
        if int8:
            self.k_scale = xp.zeros(shape[:-1] + (1,), dtype="float32")
            self.v_scale = xp.zeros(shape[:-1] + (1,), dtype="float32")
        self.length = 0  # positions filled, the same in every layer
        self.capacity = cfg.block_size

    def copy(self) -> "KVCache":
        """An independent cache holding the same positions (to decode several continuations of
        one prefilled prompt)."""
        twin = object.__new__(KVCache)
        twin.int8, twin.length, twin.capacity = self.int8, self.length, self.capacity
        twin.k, twin.v = self.k.copy(), self.v.copy()
        if self.int8:
            twin.k_scale, twin.v_scale = self.k_scale.copy(), self.v_scale.copy()
        return twin

    def layer(self, i: int) -> "_LayerSlot":
        return _LayerSlot(self, i)


class _LayerSlot:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i, self.length = cache, i, cache.length
        self.int8 = cache.int8

    def append(self, k, v):
        """Store k, v (B, H, T, hs) after the filled positions; return all keys and values so far
        as (B, H, t, hs) views (with an int8 cache: keys, their scales, values, their scales)."""
        c, i, t0 = self.cache, self.i, self.length
        t1 = t0 + k.shape[2]
        k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # (B, T, H, hs): the cache's order
        if not c.int8:
            c.k[i, :, t0:t1] = k
            c.v[i, :, t0:t1] = v
            return c.k[i, :, :t1].swapaxes(1, 2), c.v[i, :, :t1].swapaxes(1, 2)
        c.k[i, :, t0:t1], c.k_scale[i, :, t0:t1] = quant.quantize_vectors(k)
        c.v[i, :, t0:t1], c.v_scale[i, :, t0:t1] = quant.quantize_vectors(v)
        return tuple(a[i, :, :t1].swapaxes(1, 2) for a in (c.k, c.k_scale, c.v, c.v_scale))

    def arrays(self):
        """This layer's float keys and values as the cache holds them, (B, Tmax, H, hs) each."""
        return self.cache.k[self.i], self.cache.v[self.i]


class BlockCache(NamedTuple):
    """What block_forward keeps for block_backward: each layer's cache, in forward order."""

    ln_1: tuple
    attn: nn.AttentionCache | None  # None after a forward through an int8 KV cache (inference)
    d_1: object  # the attention branch's dropout mask, or None
    ln_2: tuple
    mlp: object  # nn.mlp_forward's cache, or a moe.MoECache
    d_2: object  # the MLP branch's dropout mask, or None


def block_forward(x, p, cfg, kv=None, rng=None):
    """x + attn(ln_1(x)), then + mlp(ln_2(.)). x (B, T, C)."""
    drop = cfg.dropout if rng is not None else 0.0
    with METER.scope(scopes.LN_1):
        h, ln_1 = nn.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    with METER.scope(scopes.ATTN):
        a, attn = nn.attention_forward(h, p, cfg.n_head, kv, drop, rng)
    a, d_1 = _maybe_dropout(a, drop, rng, scopes.join(scopes.ATTN, scopes.RESID_DROPOUT))
    x, h, ln_2 = nn.block_residual_norm(x, a, p["ln_2.weight"], p["ln_2.bias"])
    with METER.scope(scopes.MLP):
        if "mlp.router.weight" in p:  # a mixture-of-experts block (config.is_moe_block)
            m, mlp = moe.moe_forward(h, p, cfg)
        else:
            m, mlp = nn.mlp_forward(h, p)
    m, d_2 = _maybe_dropout(m, drop, rng, scopes.join(scopes.MLP, scopes.RESID_DROPOUT))
    with METER.scope(scopes.RESIDUAL_2):
        x = nn.residual_forward(x, m)
    return x, BlockCache(ln_1, attn, d_1, ln_2, mlp, d_2)


def block_decode(x, p, cfg, kv: "_LayerSlot"):
    """block_forward for one new position of each sequence (x (B, 1, C)) with a float KV cache
    and a dense MLP: the same counted helpers of layers.py on the same arrays (so the same
    records), without what a single row never uses (reshapes, the caches a backward reads,
    dropout, the MoE and int8-cache branches): nn/decode.py's block_step, attending the B rows of
    this one cache together. tests/test_generate.py checks the records and the logits against
    block_forward's. Why it exists: a decode step of a real-size model is mostly
    weight products that leave the CPU's caches cold, so every line of Python between them runs
    slowly, and block_forward's general path costs about 2% of a GPT-2 124M step
    (docs/benchmarks.md). Returns x (B, 1, C)."""
    B, _, C = x.shape

    def attend(q, k, v, y):  # the B rows of one cache together
        pos0 = kv.length
        kv.append(k, v)
        nn.cached_attention(q, *kv.arrays(), pos0 + 1, y)

    return batched.block_step(x.reshape(B, C), p, cfg, attend, False).reshape(B, 1, C)


def block_backward(dx, cache: BlockCache, p, g, daux: float = 1.0):
    """daux: the weight of a MoE block's auxiliary loss in the objective (the model's dloss)."""
    ln_1, attn, d_1, ln_2, mlp, d_2 = cache
    dm = _maybe_dropout_backward(dx, d_2, scopes.join(scopes.MLP, scopes.RESID_DROPOUT))
    with METER.scope(scopes.MLP):
        if isinstance(mlp, moe.MoECache):
            dh = moe.moe_backward(dm, mlp, p, g, daux)
        else:
            dh = nn.mlp_backward(dm, mlp, p, g)
    if isinstance(ln_2, nn.FusedNormCache):  # its dx added into the stream's in the same pass
        with METER.scope(scopes.LN_2):
            dx = nn.layernorm_backward(dh, ln_2, g["ln_2.weight"], g["ln_2.bias"], into=dx)
    else:
        with METER.scope(scopes.LN_2):
            dh = nn.layernorm_backward(dh, ln_2, g["ln_2.weight"], g["ln_2.bias"])
        with METER.scope(scopes.RESIDUAL_2):
            dx = nn.residual_backward(dx, dh)
    da = _maybe_dropout_backward(dx, d_1, scopes.join(scopes.ATTN, scopes.RESID_DROPOUT))
    with METER.scope(scopes.ATTN):
        dh = nn.attention_backward(da, attn, p, g)
    if isinstance(ln_1, nn.FusedNormCache):
        with METER.scope(scopes.LN_1):
            return nn.layernorm_backward(dh, ln_1, g["ln_1.weight"], g["ln_1.bias"], into=dx)
    with METER.scope(scopes.LN_1):
        dh = nn.layernorm_backward(dh, ln_1, g["ln_1.weight"], g["ln_1.bias"])
    with METER.scope(scopes.RESIDUAL_1):
        return nn.residual_backward(dx, dh)


def _maybe_dropout(x, p, rng, scope):
    if p == 0.0:
        return x, None
    with METER.scope(scope):
        return nn.dropout_forward(x, p, rng)


def _maybe_dropout_backward(dx, mask, scope):
    if mask is None:
        return dx
    with METER.scope(scope):
        return nn.dropout_backward(dx, mask)


class GPT:
    """The model: a config (ModelConfig), parameters and, once backward has run, gradients."""

    def __init__(self, cfg, params: FlatBuffer):
        self.cfg = cfg
        self.params = params
        self.grads: FlatBuffer | None = None
        # set for quantized inference: QuantizedWeights (int8 modes) or lowbit.PackedWeights (--bits)
        self.quant: quant.QuantizedWeights | lowbit.PackedWeights | None = None
        self.routing: dict[int, moe.Routing] = {}  # the last forward's MoE blocks, by index
        self._scratch = None  # see _scratch_like
        self._head = None  # the LM head's weight as prepare_decode laid it out, or None
        self._tiled = None  # each block's {name: tiled.TiledWeight} (prepare_decode), or None
        # every process that runs a model runs it on memory kept for reuse, so a step costs the
        # same in training, generation, serving and the time model's calibration (no page faults)
        backend.keep_freed_memory()

    def prepare_decode(self) -> None:
        """Lay the weights out for decoding, in a copy: each block's linear weights and the LM
        head in the column tiles of minigpt/kernels/tiles.py (nn/tiled.py), whose products (a
        decode step of any number of sequences) ran faster than BLAS's at every row count
        measured: 1.7x for one row, 3x for eight (BLAS copies the whole weight on every call of
        two or more), 1.1x for 512 (docs/benchmarks.md). Where that kernel cannot run
        (no Numba, float64), the head's transpose laid out row-major, which BLAS multiplies a few
        rows by faster than the transposed view (8 rows in 6.8 ms against 9-11). As many bytes
        again as the weights (497 MB at GPT-2 124M's size; the head alone 154 MB), so only for
        generation and serving; dropped as soon as a backward pass runs (the weights are about to
        change). Float weights only: packed and int8 weights have their own layouts."""
        if self.quant is not None:
            return
        wte_t = self.params["transformer.wte.weight"].T
        if tiled.usable(self.params.data.dtype):
            self._tiled = [tiled.tile_block(self.params.block(i)) for i in range(self.cfg.n_layer)]
            self._head = tiled.tile(wte_t)
        else:
            self._head = backend.xp.ascontiguousarray(wte_t)

    def _scratch_like(self, a):
        """An array shaped like a, kept between steps: a product that would allocate more than the
        C library keeps for reuse (the tied table's gradient, 154 MB at GPT-2's size) lands here
        instead of page-faulting its way through fresh memory every step."""
        if getattr(self, "_scratch", None) is None or self._scratch.shape != a.shape \
                or self._scratch.dtype != a.dtype:
            self._scratch = backend.xp.empty_like(a)
        return self._scratch

    def block_params(self, i: int) -> dict:
        """Block i's parameters by short name; int8 weights in place of the float ones if quantized."""
        p = self.params.block(i)
        return p if self.quant is None else {**p, **self.quant.blocks[i]}

    def decode_params(self, i: int) -> dict:
        """block_params(i) for a decode step: the tiled weights once prepare_decode has run,
        unless the model has been quantized since (its own weights then)."""
        p = self.block_params(i)
        return p if self._tiled is None or self.quant is not None else {**p, **self._tiled[i]}

    def hidden(self, idx, kv: KVCache | None = None, rng=None):
        """The final LayerNorm's output (B, T, C) for tokens idx (B, T), and the caches.

        kv: continue from a KV cache (positions kv.length, ...); rng: a numpy Generator turns
        dropout on (training only)."""
        cfg, p = self.cfg, self.params
        T = idx.shape[1]
        pos0 = kv.length if kv is not None else 0
        if pos0 + T > cfg.block_size:
            raise ValueError(f"positions {pos0}..{pos0 + T - 1} exceed block_size {cfg.block_size}")
        with METER.scope(scopes.EMBEDDING):
            if self.quant is not None and self.quant.qcfg.quantize_embedding:
                x, emb = quant.embedding_forward(
                    idx, self.quant.wte_q, self.quant.wte_scale, p["transformer.wpe.weight"], pos0), None
            else:
                x, emb = nn.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"], pos0)
        drop = cfg.dropout if rng is not None else 0.0
        x, d_emb = _maybe_dropout(x, drop, rng, scopes.join(scopes.EMBEDDING, scopes.DROPOUT))
        blocks = []
        self.routing = {}
        for i in range(cfg.n_layer):
            with METER.scope(scopes.block(i)):
                if T == 1 and kv is not None and not kv.int8 and not is_moe_block(cfg, i) and drop == 0.0:
                    x = block_decode(x, self.decode_params(i), cfg, kv.layer(i))  # a decode step
                    blocks.append(None)
                    continue
                x, cache = block_forward(x, self.block_params(i), cfg, kv.layer(i) if kv else None, rng)
            blocks.append(cache)
            if isinstance(cache.mlp, moe.MoECache):
                self.routing[i] = cache.mlp.routing
        if kv is not None:
            kv.length += T
        with METER.scope(scopes.LN_F):
            x, ln_f = nn.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
        return x, (emb, d_emb, blocks, ln_f)

    def decode_step(self, tokens, caches: list) -> object:
        """Next-token logits (B, V) after one new token per sequence: tokens (B,) ids, caches B
        KVCaches of batch 1, each with its own length (ragged). The weight products (the linear
        layers, the MLP, the LM head) run once over all B rows, so each weight is read once a
        step for every sequence; attention runs per sequence against its own cache (all of them
        in one call per operation on the compiled kernels: nn/decode.py). Each cache advances by
        one. Counted under the meter's current phase."""
        return batched.decode_step(self, tokens, caches)

    def extend_step(self, token_lists: list, caches: list) -> object:
        """Logits (B, V) at the last new position of each sequence after appending
        token_lists[b] (one or more ids: a prompt into a fresh cache, or a decode token) to
        caches[b], all the new rows in the same weight products (nn/decode.py)."""
        return batched.extend_step(self, token_lists, caches)

    def logits(self, idx, kv: KVCache | None = None, last_only: bool = False):
        """Next-token logits (B, T, V) for tokens idx (B, T); last_only: just the last position."""
        x, _ = self.hidden(idx, kv)
        if last_only:
            x = x[:, -1:]
        return self._lm_head(x)[0]

    def _lm_head(self, x):
        B, T, C = x.shape
        x2 = x.reshape(-1, C)
        with METER.scope(scopes.LM_HEAD):
            if isinstance(self.quant, lowbit.PackedWeights):
                logits = lowbit.product(x2, self.quant.lm_head, op="x@wte.T")  # (B*T, V)
            elif self.quant is not None:
                logits = quant.matmul_int8_weight(x2, self.quant.lm_head, op="x@wte.T")  # (B*T, V)
            else:
                head = self._head if self._head is not None else self.params["transformer.wte.weight"].T
                if isinstance(head, tiled.TiledWeight):
                    logits = tiled.product(x2, head, op="x@wte.T")
                else:
                    logits = matmul(x2, head, op="x@wte.T")
        return logits.reshape(B, T, -1), x2

    @property
    def aux_loss(self) -> float:
        """The last forward's MoE load-balancing loss, summed over blocks (0 for a dense model).
        The objective backward differentiates is loss + aux_loss; loss() returns the first alone,
        so a MoE model's loss compares with a dense one's."""
        return sum(r.aux_loss for r in self.routing.values())

    def loss(self, idx, targets, rng=None):
        """Mean cross-entropy of targets (B, T) after tokens idx (B, T); returns (loss, cache)."""
        x, trunk = self.hidden(idx, rng=rng)
        logits, x2 = self._lm_head(x)
        with METER.scope(scopes.LOSS):
            loss, ce = nn.cross_entropy_forward(logits, targets)
        return float(loss), (trunk, x2, ce)

    def backward(self, cache, dloss: float = 1.0, on_block_done=None) -> FlatBuffer:
        """Add d(dloss * (loss + aux_loss))/d(params) into self.grads (zero them between steps
        yourself). on_block_done(i), when given, is called as soon as block i's gradients are
        complete (blocks finish last to first; data parallelism starts their allreduce there)."""
        cfg, p = self.cfg, self.params
        self._head = self._tiled = None  # the weights are about to change: prepare_decode's copies would go stale
        if self.grads is None:
            self.grads = FlatBuffer(cfg, p.data.dtype)
        g = self.grads
        (emb, d_emb, blocks, ln_f), x2, ce = cache
        wte = p["transformer.wte.weight"]
        with METER.scope(scopes.LOSS):
            dlogits = nn.cross_entropy_backward(ce, dloss)  # (B, T, V)
        B, T, V = dlogits.shape
        d2 = dlogits.reshape(-1, V)
        with METER.scope(scopes.LM_HEAD):
            dwte = g["transformer.wte.weight"]
            dwte += matmul(d2.T, x2, op="grad_w", out=self._scratch_like(dwte))  # (V, C)
            dx = matmul(d2, wte, op="grad_x").reshape(B, T, -1)  # (B, T, C)
        with METER.scope(scopes.LN_F):
            dx = nn.layernorm_backward(dx, ln_f, g["transformer.ln_f.weight"], g["transformer.ln_f.bias"])
        for i in reversed(range(cfg.n_layer)):
            with METER.scope(scopes.block(i)):
                dx = block_backward(dx, blocks[i], p.block(i), g.block(i), dloss)
            if on_block_done is not None:
                on_block_done(i)
        dx = _maybe_dropout_backward(dx, d_emb, scopes.join(scopes.EMBEDDING, scopes.DROPOUT))
        with METER.scope(scopes.EMBEDDING):
            nn.embedding_backward(dx, emb, g["transformer.wte.weight"], g["transformer.wpe.weight"])
        return g
