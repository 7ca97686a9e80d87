"""Hostile input, generated: hypothesis over the config loader, the --set parser, scale scenarios,
the tokenizer(s) and the checkpoint loader. Every input must end in a result or one clear
MiniGPTError line: never another exception, a hang, or a memory blow-up.

The targets live in tests/fuzz/targets.py, shared with the atheris harnesses there (longer runs,
coverage-guided; counts in docs/reliability.md). Here each target gets a modest number of
examples (FUZZ_EXAMPLES, default 60) to keep the suite fast; set FUZZ_EXAMPLES=2000 for a longer
run. The crafted hostile checkpoints (object arrays, wrong dtypes and shapes, a petabyte shape,
deeply nested headers) are explicit cases below.
"""

import json
import math
import os
import string
import tracemalloc

import numpy as np
import pytest
from conftest import ROOT
from fuzz import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt import config
from minigpt.api import Model
from minigpt.errors import CheckpointError, ConfigError
from minigpt.scale import scenario

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def fuzz_folder(tmp_path_factory):
    targets.use_folder(tmp_path_factory.mktemp("fuzz"))
    yield
    targets.cleanup()


# --------------------------------------------------------------------------- TOML, generated


def toml_value(draw_value) -> str:
    if isinstance(draw_value, bool):
        return "true" if draw_value else "false"
    if isinstance(draw_value, float):
        if math.isnan(draw_value):
            return "nan"
        if math.isinf(draw_value):
            return "inf" if draw_value > 0 else "-inf"
        return repr(draw_value)
    if isinstance(draw_value, int):
        return str(draw_value)
    if isinstance(draw_value, list):
        return "[" + ", ".join(toml_value(v) for v in draw_value) + "]"
    return json.dumps(draw_value)


scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=20), st.sampled_from([0, 1, -1, 2**31, 1e300, "cpu", "float64"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=6)
words = st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)


def tables(schema: dict):
    """{section: {key: value}} drawing known and unknown sections and keys."""
    sections = st.sampled_from(sorted(schema)) | words
    keys = st.sampled_from(sorted({k for t in schema.values() for k in t})) | words
    return st.dictionaries(sections, st.dictionaries(keys, values, max_size=5), max_size=4)


def render(doc: dict) -> bytes:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).encode()


def nested(depth: int) -> bytes:
    return b"[model]\nn_layer = " + b"[" * depth + b"1" + b"]" * depth


CONFIG_SCHEMA = {s: {f.name: None for f in __import__("dataclasses").fields(c)}
                 for s, c in config.SECTIONS.items()}
raw_or_toml = st.one_of(st.binary(max_size=300), tables(CONFIG_SCHEMA).map(render),
                        st.integers(1, 5000).map(nested))


@FUZZ
@given(raw_or_toml)
def test_config_loader(data):
    result = targets.config_file(data)
    assert isinstance(result, (config.Config, ConfigError))


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.builds(lambda s, k, v: f"{s}.{k}={toml_value(v)}",
                                    st.sampled_from(sorted(config.SECTIONS)) | words,
                                    st.sampled_from(["n_layer", "dropout", "device", "max_steps",
                                                     "path", "dtype"]) | words, values)),
                max_size=4))
def test_set_parser(overrides):
    result = targets.set_overrides("\n".join(overrides).encode("utf-8", "surrogateescape"))
    assert isinstance(result, (config.Config, ConfigError))


@FUZZ
@given(st.one_of(st.binary(max_size=300), tables(scenario.SCHEMA).map(render),
                 st.integers(1, 5000).map(lambda d: b"[hardware]\nmfu = " + b"[" * d + b"]" * d)))
def test_scale_scenario_loader(data):
    result = targets.scenario_file(data)
    assert isinstance(result, (scenario.Scenario, ConfigError))


def test_every_tokenizer_kind_is_fuzzed():
    """Each tokenizer class needs a no-argument constructor or an example() to be fuzzed."""
    assert "byte" in {t.kind for t in targets.tokenizer_kinds()}
    assert targets.untested_tokenizer_classes() == []


@FUZZ
@given(st.one_of(st.binary(max_size=400), st.text(max_size=200).map(lambda s: s.encode("utf-8")),
                 st.recursive(st.none() | st.integers() | st.text(max_size=8),
                              lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3)
                              | st.lists(inner, max_size=3), max_leaves=5)
                 .map(lambda d: json.dumps(d).encode())))
def test_tokenizers(data):
    targets.tokenizers(data)  # asserts round trips and ranges inside


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def good():
    return targets.tiny_checkpoint_bytes()


def test_the_seed_checkpoint_loads(good):
    assert isinstance(targets.checkpoint_file(good), Model)


@FUZZ
@given(st.binary(max_size=2000))
def test_checkpoint_loader_random_bytes(data):
    assert isinstance(targets.checkpoint_file(data), CheckpointError)


@FUZZ
@given(st.data())
def test_checkpoint_loader_truncated_and_bit_flipped(good, data):
    cut = data.draw(st.integers(0, len(good)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(good) - 1), st.integers(0, 7)), max_size=3))
    bad = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for pos, bit in flips:
        if pos < len(bad):
            bad[pos] ^= 1 << bit
    result = targets.checkpoint_file(bytes(bad))
    assert isinstance(result, (Model, CheckpointError))
    if cut < len(good) and len(bad) == cut:
        assert isinstance(result, CheckpointError)  # a truncated file is never used
    if isinstance(result, Model):  # only a bit that carries no content (a zip timestamp) loads
        original = targets.checkpoint_file(good)
        assert np.array_equal(result.gpt.params.data, original.gpt.params.data)


@pytest.mark.parametrize("arrays, words", [
    ({"params": np.array([object(), 1], dtype=object)}, "pickled objects"),
    ({"params": np.zeros(4, dtype=np.complex64)}, "numbers only"),
    ({"params": np.array(["a", "b"])}, "numbers only"),
    ({"params": np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])}, "numbers only"),
])
def test_foreign_arrays_are_refused(arrays, words):
    meta = np.frombuffer(json.dumps({"format": "minigpt-checkpoint-v1"}).encode(), dtype=np.uint8)
    result = targets.checkpoint_file(targets.npz_bytes({"meta": meta, **arrays}))
    assert isinstance(result, CheckpointError) and words in str(result)


@pytest.mark.parametrize("change, words", [
    (lambda p: p.astype(np.int32), "dtype int32"),
    (lambda p: p[:-1], "the layout needs"),
    (lambda p: p.reshape(1, -1), "the layout needs"),
])
def test_wrong_dtypes_and_shapes_are_refused(change, words):
    cfg = config.load(None, ["model.n_layer=1", "model.n_embd=8", "model.n_head=2", "model.block_size=8"])
    from minigpt.nn.params import count

    data = targets.tiny_checkpoint_bytes(adam_m=change(np.zeros(count(cfg.model), np.float32)))
    result = targets.checkpoint_file(data)
    assert isinstance(result, CheckpointError) and words in str(result)


@pytest.mark.parametrize("shape", [(2**50,), (2**25, 2**25), (10**30,)])
def test_a_petabyte_shape_is_refused_before_allocating(shape):
    tracemalloc.start()
    try:
        result = targets.checkpoint_file(targets.huge_shape_npz(shape))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(result, CheckpointError) and "declares shape" in str(result)
    assert peak < 10 << 20  # nothing near the declared size was ever allocated


def test_deeply_nested_checkpoint_header_is_refused():
    meta = np.frombuffer(b"[" * 100_000, dtype=np.uint8)
    result = targets.checkpoint_file(targets.npz_bytes({"meta": meta}))
    assert isinstance(result, CheckpointError) and "corrupt checkpoint header" in str(result)


@pytest.mark.parametrize("meta", [
    {"format": "minigpt-checkpoint-v1", "layout": {"a": 1}},
    {"format": "minigpt-checkpoint-v1", "layout": [["w", [4]]], "config": [1, 2], "tokenizer": 3},
    {"format": "minigpt-checkpoint-v1", "layout": [["w", [4]]], "config": {}, "tokenizer": "byte"},
    {"format": "minigpt-int8-v1", "layout": [["w", [4]]], "int8_names": [[1]], "quant": {"mode": 1}},
    {"format": ["minigpt-checkpoint-v1"]},
])
def test_hostile_headers_are_refused(meta):
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
              "params": np.zeros(4, np.float32)}
    assert isinstance(targets.checkpoint_file(targets.npz_bytes(arrays)), CheckpointError)


REGRESSIONS = sorted((ROOT / "tests" / "fuzz" / "regressions").glob("*"))


@pytest.mark.parametrize("path", REGRESSIONS, ids=lambda p: p.name)
def test_inputs_the_fuzzers_found_stay_fixed(path):
    """Inputs that once escaped as a traceback (found by the atheris harnesses), named
    <target>-<what>.<ext>: each must now end in a result or one clear error."""
    target = targets.TARGETS[path.name.split("-")[0]]
    result = target(path.read_bytes())
    if path.name.startswith("checkpoint-"):
        assert isinstance(result, CheckpointError)
