"""The decode step in one compiled call (kernels/step.py, nn/compiled.py): the same logits, caches
and meter records as the Python step (nn/decode.py) for every weight format it takes, ragged
batches, an outer scope and a paused meter; its op times on the clock the meter reads; the cases
that must take the Python step; the closed form's prediction of its records."""

import time

import numpy as np
import pytest

from minigpt import config as config_mod
from minigpt import kernels
from minigpt.counting import closed_form as cost_model
from minigpt.counting.meter import METER
from minigpt.nn import compiled, quant
from minigpt.nn.model import GPT, KVCache
from minigpt.nn.params import init

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")

FIELDS = ("calls", "flops", "useful_flops", "bytes_read", "bytes_written")


@pytest.fixture(autouse=True)
def _numba():
    kernels.use("numba")  # conftest puts NumPy's path back after each test


def _model(fmt: str):
    """A small model, its weights as fmt names them: "32" (float32, prepared for decoding),
    "16", "bf16", "8", "4" (packed; 4-bit in groups of 16), "4g8" (groups of 8)."""
    cfg = config_mod.ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=300)
    gpt = GPT(cfg, init(cfg, np.random.default_rng(0)))
    if fmt != "32":
        bits = {"16": 16, "bf16": 16, "8": 8, "4": 4, "4g8": 4}[fmt]
        qcfg = quant.QuantConfig(bits=bits, group_size=8 if fmt == "4g8" else 16,
                                 storage16="bf16" if fmt == "bf16" else "fp16")
        gpt.quant = quant.quantize_model(gpt.params, cfg, qcfg)
    gpt.prepare_decode()
    return gpt


def _decode(gpt, prompts, compiled_on: bool, steps: int = 3, scope: str | None = None):
    """Prefill each prompt into its own cache, then decode `steps` greedy steps of all of them:
    (logits of every step, the caches, the meter's records of the decode steps)."""
    compiled.ENABLED = compiled_on
    try:
        caches = [KVCache(gpt.cfg, 1) for _ in prompts]
        for kv, p in zip(caches, prompts):
            gpt.logits(np.asarray(p)[None], kv, last_only=True)
        METER.reset()
        tokens = np.arange(len(prompts)) + 3
        outs = []
        with METER.in_phase("decode"):
            for _ in range(steps):
                if scope is None:
                    outs.append(gpt.decode_step(tokens, caches))
                else:
                    with METER.scope(scope):
                        outs.append(gpt.decode_step(tokens, caches))
                tokens = outs[-1].argmax(axis=-1)
        return np.stack(outs), caches, dict(METER.records)
    finally:
        compiled.ENABLED = True


def _counts(records):
    return {k: [getattr(r, f) for f in FIELDS] for k, r in records.items()}


@pytest.mark.parametrize("fmt", ["32", "16", "bf16", "8", "4", "4g8"])
@pytest.mark.parametrize("lengths", [[5], [3, 9, 1]])
def test_the_compiled_step_is_the_python_step_bit_for_bit_and_record_for_record(fmt, lengths, monkeypatch):
    gpt = _model(fmt)
    prompts = [np.arange(n) % 300 + 7 * b for b, n in enumerate(lengths)]
    ref, ref_caches, ref_records = _decode(gpt, prompts, compiled_on=False)
    calls = []
    real = compiled.decode_step
    monkeypatch.setattr(compiled, "decode_step", lambda *a: calls.append(1) or real(*a))
    out, caches, records = _decode(gpt, prompts, compiled_on=True)
    assert len(calls) == 3  # every step ran compiled
    assert np.array_equal(out, ref)
    for kv, twin in zip(caches, ref_caches):
        assert kv.length == twin.length
        assert np.array_equal(kv.k, twin.k) and np.array_equal(kv.v, twin.v)
    assert _counts(records) == _counts(ref_records)
    assert all(r.seconds > 0 for r in records.values())


@pytest.mark.parametrize("fmt", ["32", "8", "4"])
def test_the_closed_form_predicts_the_compiled_steps_records(fmt):
    gpt = _model(fmt)
    positions = [4, 11, 2]
    caches = [KVCache(gpt.cfg, 1) for _ in positions]
    for kv, n in zip(caches, positions):
        gpt.logits(np.arange(n)[None], kv)
    assert compiled.usable(gpt, caches, [1] * len(caches))
    METER.reset()
    with METER.in_phase("decode"):
        gpt.decode_step(np.arange(len(positions)), caches)
    qcfg = None if fmt == "32" else gpt.quant.qcfg
    predicted = cost_model.predict_decode_batch(gpt.cfg, positions, quant=qcfg, fused=True)
    assert _counts(predicted) == _counts(METER.records)


def test_records_follow_the_outer_scope_and_the_phase():
    gpt = _model("4")
    prompts = [np.arange(4)]
    _, _, ref = _decode(gpt, prompts, compiled_on=False, scope="serve")
    _, _, records = _decode(gpt, prompts, compiled_on=True, scope="serve")
    assert all(k.scope.startswith("serve.") for k in records)
    assert _counts(records) == _counts(ref)
    # the same model, the meter reset and in another phase: the records are made afresh
    caches = [KVCache(gpt.cfg, 1)]
    gpt.logits(np.arange(3)[None], caches[0])
    METER.reset()
    with METER.in_phase("eval"):
        gpt.decode_step(np.array([1]), caches)
    assert {k.phase for k in METER.records} == {"eval"} and len(METER.records) == len(records)


def test_a_paused_meter_records_nothing_and_the_logits_are_the_same():
    gpt = _model("8")
    ref, _, _ = _decode(gpt, [np.arange(6)], compiled_on=True, steps=1)
    caches = [KVCache(gpt.cfg, 1)]
    gpt.logits(np.arange(6)[None], caches[0], last_only=True)
    METER.reset()
    with METER.paused():
        out = gpt.decode_step(np.array([3]), caches)
    assert METER.records == {}
    assert np.array_equal(out, ref[0])


def test_the_op_times_are_the_meters_clock(monkeypatch):
    """Each op's time is nanoseconds of the clock perf_counter reads, converted once: their sum
    fits inside the compiled call, and fills most of it (the call's own work between ops is a
    few copies and thread-count switches). A wrong unit is off by a factor of a thousand."""
    from minigpt.kernels import step

    gpt = _model("32")
    caches = [KVCache(gpt.cfg, 1) for _ in range(4)]
    for kv in caches:
        gpt.logits(np.arange(12)[None], kv)
    gpt.decode_step(np.arange(4), caches)  # compiled and warm
    walls = []
    real = step.decode_step

    def timed(*a):
        t0 = time.perf_counter()
        real(*a)
        walls.append(time.perf_counter() - t0)

    monkeypatch.setattr(step, "decode_step", timed)
    METER.reset()
    gpt.decode_step(np.arange(4), caches)
    recorded = sum(r.seconds for k, r in METER.records.items() if k.scope != "embedding")
    assert 0.3 * walls[0] < recorded <= walls[0]


@pytest.mark.parametrize("case", ["extend", "int8_cache", "unprepared", "numpy", "disabled", "synchronizing"])
def test_other_steps_take_the_python_path(case, monkeypatch):
    gpt = _model("32")
    if case == "unprepared":
        gpt = GPT(gpt.cfg, gpt.params)
    caches = [KVCache(gpt.cfg, 1, int8=case == "int8_cache")]
    gpt.logits(np.arange(3)[None], caches[0])
    if case == "numpy":
        kernels.use("numpy")
    if case == "disabled":
        monkeypatch.setattr(compiled, "ENABLED", False)
    monkeypatch.setattr(compiled, "decode_step", lambda *a: pytest.fail("ran compiled"))
    with METER.synchronizing(case == "synchronizing"):
        if case == "extend":
            out = gpt.extend_step([np.array([5, 6])], caches)
        else:
            out = gpt.decode_step(np.array([5]), caches)
    assert out.shape == (1, 300) and caches[0].length == (5 if case == "extend" else 4)


def test_the_plan_follows_the_models_weights():
    """Quantizing a prepared model makes a new plan, on the packed weights (not the float tiles
    prepare_decode laid out before), in both steps: they decode as a model quantized unprepared."""
    gpt = _model("32")
    caches = [KVCache(gpt.cfg, 1)]
    gpt.logits(np.arange(3)[None], caches[0])
    gpt.decode_step(np.array([1]), caches)
    first = gpt._compiled_plans[1]
    gpt.quant = quant.quantize_model(gpt.params, gpt.cfg, quant.QuantConfig(bits=8))
    fresh = _model("8")
    steps = {}
    for name, model, on in (("compiled", gpt, True), ("python", gpt, False), ("fresh", fresh, False)):
        compiled.ENABLED = on
        try:
            kv = [KVCache(gpt.cfg, 1)]
            model.logits(np.arange(3)[None], kv[0])
            steps[name] = model.decode_step(np.array([2]), kv)
        finally:
            compiled.ENABLED = True
    assert gpt._compiled_plans[1] is not first and gpt._compiled_plans[1].quant is gpt.quant
    assert np.array_equal(steps["compiled"], steps["fresh"])
    assert np.array_equal(steps["python"], steps["fresh"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("sequences", [1, 4])
def test_the_step_on_one_thread_or_every_core_is_the_python_steps(threads, sequences):
    """The compiled step runs its products and attention on the products' threads (one sequence
    on two: its heads in two parts); the Python step on its own choice: the same logits."""
    from minigpt.kernels import quant as kq

    gpt = _model("4")
    prompts = [np.arange(n) + b for b, n in enumerate((2, 11, 6, 1)[:sequences])]
    ref, _, _ = _decode(gpt, prompts, compiled_on=False)
    with kq.threads(threads):
        out, _, _ = _decode(gpt, prompts, compiled_on=True)
    assert np.array_equal(out, ref)


def test_two_threads_stepping_one_model_get_their_own_logits():
    """The compiled call lets go of the GIL, and a plan's scratch is one: its lock keeps two
    threads' steps apart (without it, one thread's LayerNorm overwrites the other's rows)."""
    import threading

    gpt = _model("4")
    prompts = [np.arange(4), np.arange(7) + 50]
    expected = [_decode(gpt, [p], compiled_on=True, steps=8)[0] for p in prompts]
    results = [None, None]
    # The meter is one per process (its records, its scope path), not for two threads at once:
    # off, and its scope path put back after (the threads' scopes interleave).
    METER.enabled = False
    try:
        def work(j):
            kv = [KVCache(gpt.cfg, 1)]
            gpt.logits(np.asarray(prompts[j])[None], kv[0], last_only=True)
            tokens, outs = np.array([3]), []  # as _decode starts one sequence
            for _ in range(8):
                outs.append(gpt.decode_step(tokens, kv))
                tokens = outs[-1].argmax(axis=-1)
            results[j] = np.stack(outs)

        for _ in range(5):
            threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for j in range(2):
                assert np.array_equal(results[j], expected[j])
    finally:
        METER.enabled = True
        METER.scope_path = ""


def _steps_with_reads(gpt, compiled_on: bool):
    """Decode steps read after each; steps in phases "decode", "eval", "decode" and under a scope
    with no read between them; a swap of the meter's table (as a tracker does) with no read
    before it: what each read saw."""
    compiled.ENABLED = compiled_on
    try:
        caches = [KVCache(gpt.cfg, 1) for _ in range(2)]
        for kv, n in zip(caches, (3, 6)):
            gpt.logits(np.arange(n)[None], kv)
        METER.reset()
        seen = []
        tokens = np.array([4, 5])
        for _ in range(2):
            with METER.in_phase("decode"):
                gpt.decode_step(tokens, caches)
            seen.append(_counts(METER.records))
        table = METER.records
        for phase in ("decode", "eval", "decode"):
            with METER.in_phase(phase):
                gpt.decode_step(tokens, caches)
        with METER.in_phase("decode"), METER.scope("outer"):  # the last step's phase, a scope
            gpt.decode_step(tokens, caches)
        METER.records = {}  # no read since those steps
        seen.append(_counts(table))
        with METER.in_phase("decode"), METER.scope("outer"):  # as before the swap: only the table differs
            gpt.decode_step(tokens, caches)
        seen += [_counts(table), _counts(METER.records), list(METER.records)]
        return seen
    finally:
        compiled.ENABLED = True


def test_counts_held_back_are_there_whenever_the_records_are_read():
    """The compiled step adds its counts to the records lazily (METER.hold): every read, phase
    change and swap of the table sees exactly what the Python step's records say, in the
    Python step's order."""
    gpt = _model("4")
    assert _steps_with_reads(gpt, True) == _steps_with_reads(gpt, False)
