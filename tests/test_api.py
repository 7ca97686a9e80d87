"""The Python API a notebook uses: Model.generate and Model.stream with text, bytes, ids and lists
of prompts, their errors; minigpt.train -> Run; minigpt.scale -> Estimate (its JSON keys as
attributes), each against the command that does the same work."""

import json
import threading

import numpy as np
import pytest
from conftest import FABLES, TINY, TINY_TOML, run_cli

import minigpt
from minigpt import api, sampling
from minigpt.counting import tables
from minigpt.errors import ConfigError, DataError, MiniGPTError
from minigpt.tokenizers import MissingTokenizer

FLAT_TINY = {k: v for table in TINY.values() for k, v in table.items()}  # TINY as keywords


@pytest.fixture(scope="module")
def model(trained_run):
    return minigpt.load(trained_run)


def test_text_in_gives_text_out_the_tokenizers_way(model):
    text = model.generate("The fox ", max_new_tokens=12, temperature=0.9, seed=3)
    ids = model.generate(model.tokenizer.encode("The fox "), max_new_tokens=12, temperature=0.9,
                         seed=3)
    assert isinstance(text, str) and isinstance(ids, np.ndarray) and len(ids) == 12
    assert text == model.tokenizer.decode(ids)
    assert model.generate(b"The fox ", max_new_tokens=12, temperature=0.9, seed=3) == bytes(
        ids.astype(np.uint8))


def test_ids_in_give_the_generations_ids(model):
    prompt = [70, 111, 120]
    out = model.generate(prompt, max_new_tokens=9, temperature=1.0, seed=5)
    assert out.dtype == np.int64
    assert out.tolist() == model.generation(prompt, 9, 1.0, seed=5).tokens.tolist()
    assert model.generate(np.array(prompt, dtype=np.uint8), max_new_tokens=9, seed=5).tolist() == \
        model.generate(tuple(prompt), max_new_tokens=9, seed=5).tolist()


def test_a_list_of_prompts_decodes_together(model):
    prompts = ["Once", "A lion", "The"]
    steps = []
    out = model.generate(prompts, max_new_tokens=6, seed=10, on_token=lambda b, t: steps.append(b))
    gens = sampling.generate_batch(model.gpt, [model.tokenizer.encode(p) for p in prompts], 6,
                                   seed=10, n_tokens=256)
    assert out == [model.tokenizer.decode(g.tokens) for g in gens]
    assert steps == [0, 1, 2] * 6  # one token for every prompt each step
    ids = model.generate(np.array([[1, 2], [3, 4]]), max_new_tokens=4, temperature=0)
    assert [a.tolist() for a in ids] == [model.generate([1, 2], 4, 0).tolist(),
                                         model.generate([3, 4], 4, 0).tolist()]
    mixed = model.generate(["The", [1, 2]], max_new_tokens=3, temperature=0)
    assert isinstance(mixed[0], str) and mixed[1].dtype == np.int64


def test_stream_yields_what_generate_returns(model):
    pieces = list(model.stream("The ant ", max_new_tokens=25, temperature=1.0, seed=2))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == model.generate("The ant ", max_new_tokens=25, temperature=1.0, seed=2)
    ids = list(model.stream([5, 6, 7], max_new_tokens=8, seed=4))
    assert ids == model.generate([5, 6, 7], max_new_tokens=8, seed=4).tolist()


def test_a_stream_generates_with_the_fused_kernels_on_one_thread(monkeypatch):
    """The stream's worker thread takes the fused kernels' thread count (one), as the model's
    thread in the server does (kernels.fused_threads_here): a new thread starts at every core."""
    numba = pytest.importorskip("numba")
    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: a thread starts at one anyway")
    seen = []
    pieces = api.stream_tokens(lambda on_token: [on_token(seen.append(numba.get_num_threads()) or t)
                                                 for t in (5, 6)])
    assert list(pieces) == [5, 6] and seen == [1, 1]


def test_a_stream_stopped_early_stops_its_generation(model, monkeypatch):
    chosen = []
    real = sampling.generate

    def counting(*args, **kwargs):
        inner = args[7]
        return real(*args[:7], lambda t: (chosen.append(t), inner(t)), *args[8:], **kwargs)

    monkeypatch.setattr(sampling, "generate", counting)
    workers = lambda: [t for t in threading.enumerate() if t.name == "minigpt-stream"]
    stream = model.stream([5, 6, 7], max_new_tokens=200, seed=1)
    got = [next(stream) for _ in range(3)]
    assert len(workers()) == 1
    stream.close()
    assert workers() == []  # the worker has ended
    assert chosen == got  # no token was sampled past the last one read


def test_an_error_inside_a_stream_reaches_the_reader(model, monkeypatch):
    def failing(*args, **kwargs):
        args[7](1)
        raise ValueError("planted")

    monkeypatch.setattr(sampling, "generate", failing)
    stream = model.stream([5, 6], max_new_tokens=5)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="planted"):
        next(stream)


@pytest.mark.parametrize(("prompt", "kwargs", "says"), [
    ("", {}, "the prompt is empty"),
    ([], {}, "empty list"),
    ([1.5, 2], {}, "whole numbers"),
    ([True, 2], {}, "whole numbers"),
    ([1, 9999], {}, "9999 is not a token id"),
    ([-1], {}, "-1 is not a token id"),
    (np.zeros((2, 2, 2), dtype=int), {}, "shape"),
    (None, {}, "not NoneType"),
    (3.0, {}, "not float"),
    ("x", {"max_new_tokens": -1}, "max_new_tokens"),
    ("x", {"max_new_tokens": 2.5}, "max_new_tokens"),
    ("x", {"temperature": -0.1}, "temperature"),
    ("x", {"temperature": float("nan")}, "temperature"),
    ("x", {"top_k": 0}, "top_k"),
    ("x", {"top_p": 0.0}, "top_p"),
    ("x", {"top_p": 1.5}, "top_p"),
    ("x", {"seed": -3}, "seed"),
    (["x", None], {}, "not NoneType"),
])
def test_wrong_input_raises_a_minigpt_error_naming_it(model, prompt, kwargs, says):
    with pytest.raises(ConfigError, match=says):
        model.generate(prompt, **kwargs)
    if not isinstance(prompt, list):
        with pytest.raises(ConfigError, match=says):
            model.stream(prompt, **kwargs)  # at the call, before any piece is read


def test_text_to_a_run_without_a_tokenizer_is_a_data_error(model):
    bare = api.Model(model.config, model.gpt, MissingTokenizer(256))
    with pytest.raises(DataError, match="no tokenizer"):
        bare.generate("hello", max_new_tokens=2)
    assert len(bare.generate([1, 2], max_new_tokens=2)) == 2


# ---- minigpt.train -------------------------------------------------------------------------------


def test_train_does_what_train_py_does(trained_run, tmp_path):
    """The same config through minigpt.train and train.py: the same counts, losses and files."""
    run = minigpt.train(TINY_TOML, progress=False, out_dir=tmp_path / "run", **FLAT_TINY)
    assert isinstance(run, minigpt.Run) and not run.interrupted
    assert run.steps == TINY["train"]["max_steps"]
    cli_log = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    assert run.val_loss == pytest.approx(cli_log[-1]["val_loss"], rel=1e-6)
    ours, theirs = (tables.load(d)["records"] for d in (run.out_dir, trained_run))
    key = lambda r: (r["scope"], r["op"], r["kind"], r["phase"], r["dtype"])
    count = lambda rows: {key(r): (r["calls"], r["flops"], r["bytes_read"], r["bytes_written"])
                          for r in rows}
    assert count(ours) == count(theirs)
    assert run.costs.flops == sum(r["flops"] for r in theirs)
    assert run.energy.to_json() == json.loads((run.out_dir / "energy.json").read_text())
    assert run.energy.tokens == run.tokens
    assert run.report_path == run.out_dir / "report.html" and run.report_path.is_file()
    assert "GPT-3 175B" in run.projection
    page = run._repr_html_()
    assert page.count("<svg") >= 3 and "validation loss" in page


@pytest.mark.parametrize(("overrides", "says"), [
    ({"max_step": 5}, "did you mean 'max_steps'"),
    ({"vocab_size": 300}, "vocab_size is a key of model and data"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": [1]}, "a value must be a number"),
    ({"model__nlayer": 2}, "unknown key 'nlayer'"),
    ({"watts": -5}, "positive number of watts"),
])
def test_train_overrides_are_checked(tmp_path, overrides, says):
    with pytest.raises(MiniGPTError, match=says):
        minigpt.train(TINY_TOML, progress=False, out_dir=tmp_path / "x", **overrides)
    assert not (tmp_path / "x" / "ckpt.npz").exists()


def test_train_takes_section__key_overrides(tmp_path):
    run = minigpt.train(None, progress=False, out_dir=tmp_path / "r", path=FABLES, max_steps=2,
                        n_layer=1, n_embd=16, n_head=2, block_size=8, batch_size=2,
                        model__vocab_size=260, interval=2, batches=1)
    assert minigpt.load(run.out_dir).config.model.vocab_size == 260


# ---- minigpt.scale -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt3-175b", "patterson-t5", "dense-70b-h100", "llama-65b"])
def test_an_estimates_attributes_are_its_json_keys(name):
    est = minigpt.scale(name)
    doc = est.to_json()
    assert len(doc) > 30
    for k, v in doc.items():
        assert getattr(est, k) == v, k
    assert set(doc) <= set(dir(est))
    with pytest.raises(AttributeError, match="no figure 'energy_kwh'"):
        est.energy_kwh  # noqa: B018


def test_scale_overrides_equal_the_commands_set():
    est = minigpt.scale("gpt3-175b", hardware__mfu=0.4, pue=1.2)
    r = run_cli("-m", "minigpt", "scale", "gpt3-175b", "--set", "hardware.mfu=0.4", "--set",
                "hardware.pue=1.2", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert est.to_json() == json.loads(r.stdout)
    assert est.mfu == 0.4 and est.energy_mwh > 0
    with pytest.raises(ConfigError, match="mfu is a key of inference and hardware"):
        minigpt.scale("gpt3-175b", mfu=0.4)
    with pytest.raises(ConfigError, match="no such scenario"):
        minigpt.scale("gpt-3")
    assert "<svg" in est._repr_html_() and "energy_mwh" in est._repr_html_()


def test_train_and_scale_stay_functions_beside_their_packages():
    """minigpt/train/ and minigpt/scale/ are packages too: importing their modules (as the rest
    of the code does) must not rebind minigpt.train or minigpt.scale to them."""
    import importlib

    for module in ("minigpt.train.trainer", "minigpt.scale.estimate", "minigpt.scale.table",
                   "minigpt.train.dist", "minigpt.cli"):
        importlib.import_module(module)
    assert callable(minigpt.train) and callable(minigpt.scale)
    assert minigpt.train.__module__ == minigpt.scale.__module__ == "minigpt.runs"
