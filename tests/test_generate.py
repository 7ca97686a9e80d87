"""Generation and the Python API: KV-cached decoding against full forward passes, the samplers,
generate.py on a trained run, the Hugging Face names and shapes of the parameters, and the byte
tokenizer's exact round trip."""

import numpy as np
import pytest
from conftest import run_cli
from hypothesis import given
from hypothesis import strategies as st

import minigpt
from minigpt import config
from minigpt.api import Model
from minigpt.nn.model import KVCache
from minigpt.tokenizers import ByteTokenizer

SMALL = {"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 24}


def random_model(dtype="float32", seed=0) -> Model:
    cfg = config.load(None, [f"model.{k}={v}" for k, v in SMALL.items()])
    return Model.from_config(cfg, seed=seed, dtype=dtype)


def random_tokens(shape, seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=shape)


def rel_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def greedy_by_full_forward(model: Model, prompt, n: int) -> list[int]:
    """n greedy tokens, each the argmax of a fresh full forward pass over everything so far."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(model.logits(np.array([ids]))[0, -1])))
    return ids[len(prompt):]


# --------------------------------------------------------------------------- (a) the KV cache


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cached_decoding_matches_the_full_forward_pass(batch):
    m = random_model("float32")
    T, prefill = SMALL["block_size"], 5
    tokens = random_tokens((batch, T))
    full = m.gpt.logits(tokens)

    kv = KVCache(m.gpt.cfg, batch, "float32")
    steps = [m.gpt.logits(tokens[:, :prefill], kv)]
    steps += [m.gpt.logits(tokens[:, t : t + 1], kv) for t in range(prefill, T)]
    cached = np.concatenate(steps, axis=1)

    assert cached.shape == full.shape == (batch, T, 256)
    assert cached.dtype == full.dtype == np.float32
    assert kv.length == T
    assert rel_diff(cached, full) <= 1e-5


@pytest.mark.parametrize("variant", ["dense", "moe", "int8 weights"])
def test_decode_blocks_count_and_compute_what_the_general_blocks_do(variant, monkeypatch):
    """A decode step's blocks run model.block_decode; block_forward on the same steps gives the
    same logits (float64: to rounding) and the same records, call for call (MoE blocks keep
    block_forward, and int8 weights go through block_decode's linear layers)."""
    from minigpt.counting.meter import METER
    from minigpt.nn import model as model_mod

    extra = {"moe": ["model.n_experts=2", "model.moe_every=2"]}.get(variant, [])
    cfg = config.load(None, [f"model.{k}={v}" for k, v in SMALL.items()] + extra)
    tokens = random_tokens((2, 12))
    runs = []
    for general in (False, True):
        m = Model.from_config(cfg, seed=0, dtype="float64")
        if variant == "int8 weights":
            m.quantize("w8a32")
        if general:
            monkeypatch.setattr(model_mod, "block_decode", lambda x, p, cfg, kv: model_mod.block_forward(x, p, cfg, kv)[0])
        METER.reset()
        kv = KVCache(cfg.model, 2, "float64")
        out = [m.gpt.logits(tokens[:, :4], kv)]
        with METER.in_phase("decode"):
            out += [m.gpt.logits(tokens[:, t : t + 1], kv) for t in range(4, 12)]
        counts = {k: (r.calls, r.flops, r.useful_flops, r.bytes_read, r.bytes_written)
                  for k, r in METER.records.items()}
        runs.append((np.concatenate(out, axis=1), counts))
    (fast, fast_counts), (general, general_counts) = runs
    assert any(k.scope.endswith("attn.softmax") and k.phase == "decode" for k in fast_counts)
    assert fast_counts == general_counts
    assert rel_diff(fast, general) <= 1e-12


def test_last_only_is_the_last_position():
    m = random_model("float32")
    tokens = random_tokens((2, 10))
    kv = KVCache(m.gpt.cfg, 2, "float32")
    last = m.gpt.logits(tokens, kv, last_only=True)
    assert last.shape == (2, 1, 256)
    assert rel_diff(last, m.gpt.logits(tokens)[:, -1:]) <= 1e-5


# --------------------------------------------------------------------------- (b) sampling


def test_greedy_is_deterministic_and_the_argmax_of_full_forward_passes():
    m = random_model("float64")  # float64: no near-ties flipped by rounding
    prompt = random_tokens(5)
    n = SMALL["block_size"] - len(prompt)  # stay within one context: no cache rebuild
    first = m.generate(prompt, n, temperature=0)
    assert first.tolist() == m.generate(prompt, n, temperature=0).tolist()
    assert first.tolist() == greedy_by_full_forward(m, prompt, n)


def test_same_seed_same_sample():
    m = random_model()
    prompt = random_tokens(4)
    a = m.generate(prompt, 30, temperature=1.0, seed=7)
    assert a.tolist() == m.generate(prompt, 30, temperature=1.0, seed=7).tolist()
    assert a.tolist() != m.generate(prompt, 30, temperature=1.0, seed=8).tolist()


@pytest.mark.parametrize("limit", [{"top_k": 1}, {"top_p": 1e-9}], ids=["top_k=1", "tiny top_p"])
def test_keeping_only_the_likeliest_token_is_greedy(limit):
    m = random_model("float64")
    prompt = random_tokens(4)
    greedy = m.generate(prompt, 15, temperature=0)
    assert m.generate(prompt, 15, temperature=1.0, seed=3, **limit).tolist() == greedy.tolist()


def test_generation_runs_past_the_context_length():
    m = random_model()
    new = m.generate(random_tokens(10), 3 * SMALL["block_size"], temperature=1.0, seed=0)
    assert new.shape == (3 * SMALL["block_size"],)
    assert ((0 <= new) & (new < 256)).all()


def test_a_generation_counts_its_prefills_and_decode_steps_by_hand():
    """10 prompt tokens, 72 new ones, a 24-position cache. The prefill fills 10 positions and gives
    token 1; decode steps fill the other 14 (tokens 2-15); token 15 finds the cache full, so a
    rebuild reads the last 12 tokens and gives token 16; 12 decode steps fill it again (tokens
    17-28), and so on: rebuilds give tokens 16, 29, 42, 55 and 68, and decode steps tokens 69-72.
    The meter's forward passes per phase (one embedding record each) say the same."""
    from minigpt.counting import tables
    from minigpt.counting.meter import METER

    m = random_model()
    METER.reset()
    gen = m.generation(random_tokens(10), 72, temperature=1.0, seed=0)
    assert (gen.rebuilds, gen.decode_steps, gen.prefills) == (5, 14 + 4 * 12 + 4, 6)
    assert gen.prefill_tokens == 10 + 5 * 12
    assert len(gen.tokens) == 72 == gen.prefills + gen.decode_steps
    passes = {phase: sum(r["calls"] for r in tables.rows_from_records(METER.records)
                         if r["phase"] == phase and r["scope"] == "embedding")
              for phase in ("prefill", "decode")}
    assert passes == {"prefill": gen.prefills, "decode": gen.decode_steps}
    assert gen.tokens.tolist() == m.generate(random_tokens(10), 72, temperature=1.0,
                                             seed=0).tolist()
    assert gen.to_json() == {"tokens": gen.tokens.tolist(), "prefill_tokens": 70,
                             "decode_steps": 66, "rebuilds": 5}
    within = m.generation(random_tokens(10), 15, temperature=0)  # fills the cache, no rebuild
    assert (within.prefill_tokens, within.decode_steps, within.rebuilds) == (10, 14, 0)
    nothing = m.generation(random_tokens(10), 0)  # the prompt's prefill, no token
    assert (len(nothing.tokens), nothing.prefill_tokens, nothing.decode_steps) == (0, 10, 0)


# --------------------------------------------------------------------------- (c) generate.py


def greedy_text(run_dir, prompt: str, n: int) -> str:
    """What generate.py --temperature 0 should print: the prompt and n greedy tokens."""
    m = minigpt.load(run_dir)
    ids = m.tokenizer.encode(prompt)[-m.config.model.block_size:]
    return m.tokenizer.decode(ids) + m.tokenizer.decode(m.generate(ids, n, temperature=0)) + "\n"


def generate(run_dir, *args):
    r = run_cli("generate.py", run_dir, *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return r


def test_generate_continues_the_prompt_and_a_seed_repeats_it(trained_run):
    args = ("--prompt", "The fox", "--max-new-tokens", "12", "--seed", "1")
    r = generate(trained_run, *args)
    assert r.stdout.startswith("The fox")
    assert r.stderr == ""
    assert generate(trained_run, *args).stdout == r.stdout


def test_generate_greedy_matches_the_api(trained_run):
    r = generate(trained_run, "--prompt", "A heron", "--max-new-tokens", "10", "--temperature", "0")
    assert r.stdout == greedy_text(trained_run, "A heron", 10)


def test_generate_reads_a_prompt_file(trained_run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Once upon a time", encoding="utf-8")
    r = generate(trained_run, "--prompt-file", prompt, "--max-new-tokens", "8", "--temperature", "0")
    assert r.stdout == greedy_text(trained_run, "Once upon a time", 8)


def test_generate_keeps_the_end_of_a_prompt_longer_than_the_context(trained_run):
    block = minigpt.load(trained_run).config.model.block_size
    prompt = "".join(chr(ord("a") + i % 26) for i in range(block + 9))
    r = generate(trained_run, "--prompt", prompt, "--max-new-tokens", "5", "--temperature", "0")
    assert f"{len(prompt)} tokens" in r.stderr and f"last {block}" in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert r.stdout.startswith(prompt[-block:])
    assert r.stdout == greedy_text(trained_run, prompt, 5)


def test_generate_past_the_context_length(trained_run):
    n = 3 * minigpt.load(trained_run).config.model.block_size
    r = generate(trained_run, "--prompt", "The miller", "--max-new-tokens", n, "--temperature", "0")
    assert r.stdout == greedy_text(trained_run, "The miller", n)


# --------------------------------------------------------------------------- (d) the Python API


def hf_shapes(n_layer, C, V, T) -> dict:
    """Parameter names and shapes of Hugging Face's GPT2LMHeadModel (Conv1D weights are
    (in, out); the LM head is tied to wte and has no entry)."""
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
              "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        shapes |= {
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        }
    return shapes


def test_load_takes_a_run_folder_or_a_checkpoint_file(trained_run):
    by_folder, by_file = minigpt.load(trained_run), minigpt.load(trained_run / "ckpt.npz")
    assert by_folder.config == by_file.config
    assert by_folder.params.keys() == by_file.params.keys()
    for name, value in by_folder.params.items():
        assert np.array_equal(value, by_file.params[name]), name


def test_params_have_hugging_face_names_and_shapes(trained_run):
    m = minigpt.load(trained_run)
    c = m.config.model
    expected = hf_shapes(c.n_layer, c.n_embd, c.vocab_size, c.block_size)
    assert {name: tuple(v.shape) for name, v in m.params.items()} == expected


def test_logits_and_loss_and_grads(trained_run):
    m = minigpt.load(trained_run)
    tokens, targets = random_tokens((2, 8), seed=2), random_tokens((2, 8), seed=3)
    logits = m.logits(tokens)
    assert logits.shape == (2, 8, 256) and logits.dtype == np.float32

    loss, grads = m.loss_and_grads(tokens, targets)
    assert isinstance(loss, float)
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    cross_entropy = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert loss == pytest.approx(cross_entropy, rel=1e-5)
    assert grads.keys() == m.params.keys()
    for name, g in grads.items():
        assert g.shape == m.params[name].shape, name
        assert np.isfinite(g).all(), name


def test_grads_are_the_derivative_of_the_loss():
    """A directional finite difference in float64 agrees with the gradient's projection."""
    m = random_model("float64")
    tokens, targets = random_tokens((2, 6), seed=4), random_tokens((2, 6), seed=5)
    _, grads = m.loss_and_grads(tokens, targets)
    rng = np.random.default_rng(6)
    direction = {name: rng.normal(size=p.shape) for name, p in m.params.items()}
    h = 1e-5

    def loss_at(scale):
        for name, p in m.params.items():
            p += scale * h * direction[name]
        loss = m.loss_and_grads(tokens, targets)[0]
        for name, p in m.params.items():
            p -= scale * h * direction[name]
        return loss

    numeric = (loss_at(1) - loss_at(-1)) / (2 * h)
    analytic = sum(float((grads[n] * direction[n]).sum()) for n in grads)
    assert numeric == pytest.approx(analytic, rel=1e-6)


UNICODE_SAMPLES = ["", "plain ASCII\n", "naïve café — “quotes” …", "日本語のテキスト",
                   "emoji 🎉👩‍💻 and flags 🇳🇴", "e\u0301 combining", "\x00\t\r\n\x7f", "\ufeffBOM"]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    stream = tok.stream_decoder()  # one byte at a time, as generate.py prints
    assert "".join(stream([i]) for i in ids) == text


@given(st.text())
def test_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text
