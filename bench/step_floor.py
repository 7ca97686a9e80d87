"""How much of a packed-weight decode step is the Python around its kernels: the model's
GPT.decode_step against the same kernels called one after another from a single compiled function.

    python bench/step_floor.py RUN [--bits 32,16,8,4] [--group-size G] [--prompt P] [--tokens N]
                               [--rounds R] [--threads N] [--format json]

For one sequence (batch 1) of RUN (e.g. `minigpt init configs/gpt2-124m.toml out/gpt2-124m`),
quantized at each width (32: the float32 model) and prepared as generation prepares it (packed
weights; float32 ones in the tiled kernel's layout), this times --tokens greedy
decode steps after a --prompt token prefill two ways, interleaved round by round (best of
--rounds):

    model      GPT.decode_step with the meter on, as generate and bench/decode.py run it
    unmetered  the same with the meter off
    compiled   every op of the step (the LayerNorms, the weight products with their biases, the
               attention kernels, the GELU, the residual adds, the head) called in order from one
               Numba function (`compiled_step`): no Python, no meter and no dispatch between them

and checks that the compiled step's logits equal the model's, bit for bit, at the first step
(the same kernels on the same arrays). "python" is model less compiled: what a decode step spends
outside its kernels. The compiled function is a measurement, not a path the package takes: the
meter cannot time its ops one by one (docs/benchmarks.md says what it showed).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import minigpt
from minigpt import kernels  # (sets the OpenMP wait policy before Numba loads)
from minigpt.counting.meter import METER
from minigpt.nn.layers import LAYERNORM_EPS
from minigpt.nn.lowbit import LINEAR_WEIGHTS
from minigpt.nn.model import KVCache
from minigpt.units import rows_text


def _kernels():
    """The compiled step, built on first use (Numba needed): compiled_step(product, ...)."""
    from numba import njit

    from minigpt.kernels import attend
    from minigpt.kernels import fused as fk

    @njit
    def compiled_step(product, x, weights, scales, biases, norms, keys, values, lengths, head,
                      head_scale, no_bias, n_head, logits):
        """One decode step of one sequence: x (1, C) its embedded token, overwritten; weights,
        scales: typed lists of the blocks' packed weights in LINEAR_WEIGHTS order (4 a block);
        biases: c_attn, attn c_proj, c_fc, mlp c_proj (4 a block); norms: ln_1 w, b, ln_2 w, b (4
        a block) then ln_f w, b; keys, values, lengths: attend's. logits (1, V) receives the
        head's output."""
        C = x.shape[1]
        hs = C // n_head
        h = np.empty_like(x)
        a = np.empty_like(x)
        m = np.empty_like(x)
        mean = np.empty(1, np.float32)
        rstd = np.empty(1, np.float32)
        qkv = np.empty((1, 3 * C), np.float32)
        y = np.empty((1, n_head, hs), np.float32)
        f = np.empty((1, 4 * C), np.float32)
        g = np.empty((1, 4 * C), np.float32)
        att = np.empty((1, n_head, lengths[0]), np.float32)
        for i in range(len(weights) // 4):
            fk.layernorm_forward(x, norms[4 * i], norms[4 * i + 1], LAYERNORM_EPS, h, mean, rstd)
            product(h, weights[4 * i], scales[4 * i], biases[4 * i], qkv)
            heads = qkv.reshape(1, 3, n_head, hs)
            q = heads[:, 0].copy()
            attend.scores(q, heads[:, 1], heads[:, 2], keys, values, i, lengths, att, 1)
            attend.softmax(att, lengths, 1.0 / np.sqrt(hs), True)
            attend.mix(att, values, i, lengths, y, 1)
            product(y.reshape(1, C), weights[4 * i + 1], scales[4 * i + 1], biases[4 * i + 1], a)
            fk.residual_layernorm_forward(x, a, norms[4 * i + 2], norms[4 * i + 3], LAYERNORM_EPS, h, mean, rstd)
            product(h, weights[4 * i + 2], scales[4 * i + 2], no_bias, f)
            fk.bias_gelu_forward(f, biases[4 * i + 2], g, True)
            product(g, weights[4 * i + 3], scales[4 * i + 3], biases[4 * i + 3], m)
            for j in range(C):  # a holds x + attention since the residual pass
                x[0, j] = a[0, j] + m[0, j]
        last = len(norms) - 2
        fk.layernorm_forward(x, norms[last], norms[last + 1], LAYERNORM_EPS, h, mean, rstd)
        product(h, head, head_scale, no_bias, logits)

    return compiled_step


def _product(bits: int, chunk: int):
    """product(x, data, scale, bias, out): the decode kernel of `bits` (kernels/tiles.py), with
    one signature for all widths: for 32 bits data and scale are a tiled weight's tiles and rest
    (nn/tiled.py), and the bias is added after the product, as linear_forward adds it."""
    from numba import njit

    from minigpt.kernels import tiles

    if bits == 32:
        f32 = tiles.kernels()["f32"]

        @njit
        def tiled_product(x, tiles, rest, b, out):
            f32(x, tiles, rest, out)
            for n in range(out.shape[0]):
                for j in range(b.shape[0]):
                    out[n, j] += b[j]

        return tiled_product
    k = tiles.kernels()[bits]
    if bits == 4:
        return njit(lambda x, d, s, b, out: k(x, d, s, chunk, b, out))
    if bits == 8:
        return njit(lambda x, d, s, b, out: k(x, d, s, b, out))
    return njit(lambda x, d, s, b, out: k(x, d, False, b, out))


def _arguments(gpt):
    """The compiled step's weights, scales, biases and norms, and its head's (data, scale), for a
    packed model or a prepared float32 one (tiles and rest in place of data and scale)."""
    from numba.typed import List

    none = np.zeros((1, 1, 1), np.uint16)  # 16 bits have no scales (their product ignores these)
    weights, scales, biases, norms = List(), List(), List(), List()
    for i in range(gpt.cfg.n_layer):
        p = gpt.block_params(i)
        for name in LINEAR_WEIGHTS:
            if gpt.quant is None:  # the tiled float32 weight
                w = gpt.decode_params(i)[name]
                weights.append(w.tiles)
                scales.append(w.rest)
            else:
                w = gpt.quant.blocks[i][name]
                weights.append(w.data)
                scales.append(none if w.tile_scale is None else w.tile_scale)
            biases.append(np.ascontiguousarray(p[name.replace("weight", "bias")], np.float32))
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            norms.append(p[name])
    norms.append(gpt.params["transformer.ln_f.weight"])
    norms.append(gpt.params["transformer.ln_f.bias"])
    if gpt.quant is None:
        head = (gpt._head.tiles, gpt._head.rest)
    else:
        h = gpt.quant.lm_head
        head = (h.data, none if h.tile_scale is None else h.tile_scale)
    return weights, scales, biases, norms, head


def measure(args) -> list:
    from numba.typed import List

    from minigpt.kernels import quant as kq

    kernels.use("numba")
    compiled_step = _kernels()
    rng = np.random.default_rng(0)
    rows = []
    models = {}
    for bits in args.bits:
        model = minigpt.load(args.run)
        if bits != 32:
            model.quantize(bits=bits, group_size=args.group_size)
        model.gpt.prepare_decode()
        models[bits] = (model.gpt, _product(bits, kq.chunk(args.group_size)), _arguments(model.gpt))
    prompt = rng.integers(0, models[args.bits[0]][0].cfg.vocab_size, size=args.prompt)
    no_bias = np.empty(0, np.float32)

    def run_model(gpt, meter: bool) -> float:
        kv = KVCache(gpt.cfg, 1, "float32")
        logits = gpt.logits(prompt[None], kv, last_only=True)[0, -1]
        METER.reset()
        METER.enabled = meter
        try:
            t0 = time.perf_counter()
            with METER.in_phase("decode"):
                for _ in range(args.tokens):
                    logits = gpt.decode_step(np.array([int(logits.argmax())]), [kv])[0]
            return (time.perf_counter() - t0) / args.tokens
        finally:
            METER.enabled = True

    def run_compiled(bits: int, check: bool = False) -> float:
        gpt, product, (weights, scales, biases, norms, (head, head_scale)) = models[bits]
        p = gpt.params
        kv = KVCache(gpt.cfg, 1, "float32")
        first = gpt.logits(prompt[None], kv, last_only=True)[0, -1]
        keys, values = List([kv.k]), List([kv.v])
        logits = np.empty((1, gpt.cfg.vocab_size), np.float32)
        token = int(first.argmax())
        if check:  # one step each way from the same prefilled cache: the same bits
            twin = kv.copy()
            expected = gpt.decode_step(np.array([token]), [twin])[0]
        t0 = time.perf_counter()
        for step in range(args.tokens):
            x = (p["transformer.wte.weight"][token] + p["transformer.wpe.weight"][kv.length])[None]
            with kq.threads(args.threads):
                kq.on_threads(compiled_step, product, x.astype(np.float32), weights, scales, biases, norms,
                              keys, values, np.array([kv.length + 1]), head, head_scale, no_bias,
                              gpt.cfg.n_head, logits)
            kv.length += 1
            if check and step == 0 and not np.array_equal(logits[0], expected):
                raise SystemExit(f"{bits} bits: the compiled step's logits differ from decode_step's "
                                 f"(max {np.abs(logits[0] - expected).max():.3g})")
            token = int(logits.argmax())
        return (time.perf_counter() - t0) / args.tokens

    for bits in args.bits:  # compile, warm up, check
        run_compiled(bits, check=True)
        run_model(models[bits][0], True)
    best = {(bits, kind): float("inf") for bits in args.bits for kind in ("model", "unmetered", "compiled")}
    for _ in range(args.rounds):
        for bits in args.bits:
            gpt = models[bits][0]
            best[bits, "model"] = min(best[bits, "model"], run_model(gpt, True))
            best[bits, "unmetered"] = min(best[bits, "unmetered"], run_model(gpt, False))
            best[bits, "compiled"] = min(best[bits, "compiled"], run_compiled(bits))
    for bits in args.bits:
        model_s, unmetered_s, compiled_s = (best[bits, k] for k in ("model", "unmetered", "compiled"))
        rows.append({"bits": bits, "model_step_s": model_s, "unmetered_step_s": unmetered_s,
                     "compiled_step_s": compiled_s, "python_s": model_s - compiled_s,
                     "model_tokens_per_s": 1 / model_s, "compiled_tokens_per_s": 1 / compiled_s})
    if 32 in args.bits:  # each width's speed-up over float32, each way
        fp32 = next(r for r in rows if r["bits"] == 32)
        for r in rows:
            r["model_vs_fp32"] = fp32["model_step_s"] / r["model_step_s"]
            r["compiled_vs_fp32"] = fp32["compiled_step_s"] / r["compiled_step_s"]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a run folder or checkpoint file (GPT-2 124M's shape: configs/gpt2-124m.toml)")
    ap.add_argument("--bits", default="32,16,8,4", help="weight widths, comma-separated (default 32,16,8,4)")
    ap.add_argument("--group-size", type=int, default=32, help="4 bits: inputs a scale (default 32)")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed steps (default 64)")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps a run (default 32)")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best counts (default 4)")
    ap.add_argument("--threads", type=int, default=None, help="the kernels' threads (default: every core)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if not kernels.AVAILABLE:
        ap.error("needs Numba (the compiled step is Numba's)")
    args.bits = [int(b) for b in args.bits.split(",")]
    if any(b not in (32, 16, 8, 4) for b in args.bits) or args.prompt < 1 or args.tokens < 1 or args.rounds < 1:
        ap.error("--bits takes 32, 16, 8 and 4; --prompt, --tokens and --rounds must be at least 1")
    if args.threads is None:
        import numba

        args.threads = numba.config.NUMBA_NUM_THREADS  # every core, as the kernels default to
    rows = measure(args)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.run}: one sequence, {args.prompt}-token prompt, best of {args.rounds} rounds of "
          f"{args.tokens} steps; compiled logits equal decode_step's")
    ratio = (lambda r, k: f"{r[k]:.2f}x" if k in r else "-")
    print("\n".join(rows_text(
        ("bits", "model ms", "unmetered ms", "compiled ms", "python ms", "model tok/s", "compiled tok/s",
         "model vs fp32", "compiled vs fp32"),
        [(str(r["bits"]), f"{1e3 * r['model_step_s']:.2f}", f"{1e3 * r['unmetered_step_s']:.2f}",
          f"{1e3 * r['compiled_step_s']:.2f}", f"{1e3 * r['python_s']:.2f}", f"{r['model_tokens_per_s']:.1f}",
          f"{r['compiled_tokens_per_s']:.1f}", ratio(r, "model_vs_fp32"), ratio(r, "compiled_vs_fp32"))
         for r in rows])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
