"""Integrity: content hashes in checkpoints, flipped bits, older checkpoints, resuming on other
data, and non-finite gradients named before they touch the weights."""

import json
import random
import zipfile

import numpy as np
import pytest
from conftest import FABLES, TINY, TINY_TOML, merge, run_cli, set_args, snapshot, tiny_config

from minigpt.errors import CheckpointError, ConfigError
from minigpt.nn.params import layout
from minigpt.train import checkpoint
from minigpt.train.faults import backward_order, dict_differences
from minigpt.train.trainer import NonFiniteGradient, Trainer


def rewrite(path, change):
    """Rewrite a checkpoint's members as they are, after change(meta, arrays) (no new hashes)."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays.pop("meta").tobytes())
    change(meta, arrays)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_every_array_carries_its_sha256(trained_run):
    meta, arrays = checkpoint.load(trained_run)
    assert set(meta["sha256"]) == set(arrays) == {"params", "adam_m", "adam_v"}
    assert all(meta["sha256"][k] == checkpoint.digest(a) for k, a in arrays.items())


def test_a_changed_array_with_a_valid_zip_is_reported_by_name(run_copy):
    """The zip's CRC-32 is recomputed here, as a careless tool would: only the hash catches it."""
    def nudge(meta, arrays):
        arrays["adam_v"] = arrays["adam_v"].copy()
        arrays["adam_v"][7] = np.nextafter(arrays["adam_v"][7], np.float32(1))

    rewrite(run_copy / "ckpt.npz", nudge)
    with pytest.raises(CheckpointError, match="array 'adam_v' is corrupt .*not used"):
        checkpoint.load(run_copy)
    r = run_cli("generate.py", run_copy, "--max-new-tokens", "3")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and "'adam_v' is corrupt" in r.stderr


def test_flipped_bits_are_refused_or_harmless(trained_run, tmp_path):
    """200 random single-bit flips anywhere in a real checkpoint: each is refused as corrupt, or
    (a zip timestamp, a version field: bits that carry no content) loads the very same arrays.
    A flip inside the array data is always refused."""
    raw = (trained_run / "ckpt.npz").read_bytes()
    _, original = checkpoint.load(trained_run)
    with zipfile.ZipFile(trained_run / "ckpt.npz") as z:
        params = z.getinfo("params.npy")
        data_start = params.header_offset + 30 + len(params.filename) + 128  # inside the values
        data_end = params.header_offset + 30 + len(params.filename) + params.file_size
    rng = random.Random(15)
    positions = [rng.randrange(len(raw)) for _ in range(180)]
    positions += [rng.randrange(data_start, data_end) for _ in range(20)]
    refused = 0
    for pos in positions:
        bad = bytearray(raw)
        bad[pos] ^= 1 << rng.randrange(8)
        path = tmp_path / "flipped.npz"
        path.write_bytes(bad)
        try:
            _, arrays = checkpoint.load(path)
        except CheckpointError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert not data_start <= pos < data_end, f"a flip at byte {pos} of the data was accepted"
        assert all(np.array_equal(arrays[k], original[k]) for k in original)
    assert refused >= 150


def test_an_older_checkpoint_without_hashes_loads_with_a_note(run_copy, capsys):
    rewrite(run_copy / "ckpt.npz", lambda meta, arrays: meta.pop("sha256"))
    meta, _ = checkpoint.load(run_copy)
    assert meta["run"]["step"] == 6
    assert "written before checkpoints carried content hashes" in capsys.readouterr().err


def test_a_hash_table_that_misses_an_array_is_refused(run_copy):
    rewrite(run_copy / "ckpt.npz", lambda meta, arrays: meta["sha256"].pop("adam_m"))
    with pytest.raises(CheckpointError, match="'adam_m' has no recorded hash"):
        checkpoint.load(run_copy)


def test_a_checkpoint_larger_than_the_available_memory_is_refused_before_reading(trained_run, monkeypatch):
    from minigpt.counting import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: (50_000, "test"))
    with pytest.raises(CheckpointError, match=r"its arrays take [\d.]+ KiB, more than the 48.8 KiB of memory available \(test\)"):
        checkpoint.load(trained_run)
    r = run_cli("generate.py", trained_run, "--max-new-tokens", "2")  # the real machine: it fits
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- same data on resume


def test_resuming_on_a_changed_corpus_says_what_differs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(FABLES.read_bytes())
    out = tmp_path / "run"
    cfg = tiny_config(out, data={"path": str(corpus)}, train={"max_steps": 3}, eval={"interval": 3})
    Trainer(cfg, progress=False).run()
    before = snapshot(out)
    text = bytearray(corpus.read_bytes())
    text[100] ^= 0x20  # one letter's case: same size, different tokens
    corpus.write_bytes(bytes(text))
    cfg = tiny_config(out, data={"path": str(corpus)}, train={"max_steps": 6}, eval={"interval": 3})
    with pytest.raises(ConfigError, match="the corpus differs .*sha256: checkpoint") as e:
        Trainer(cfg, resume=True, progress=False)
    assert "train_tokens" not in str(e.value)  # the sizes are the same
    corpus.write_bytes(bytes(text[:-1000]))
    with pytest.raises(ConfigError, match="train_tokens: checkpoint"):
        Trainer(cfg, resume=True, progress=False)
    assert snapshot(out) == before


def test_resuming_with_another_tokenizer_says_what_differs(run_copy):
    meta, arrays = checkpoint.load(run_copy)
    meta["tokenizer"] = {**meta["tokenizer"], "vocab_size": 300, "merges": [[1, 2]]}
    checkpoint.save(run_copy / "ckpt.npz", {k: v for k, v in meta.items() if k not in ("format", "sha256")},
                    arrays)
    cfg = tiny_config(run_copy, train={"max_steps": 9})
    with pytest.raises(ConfigError, match="tokenizer differs") as e:
        Trainer(cfg, resume=True, progress=False)
    assert "merges: checkpoint [[1, 2]], now absent" in str(e.value)
    assert "vocab_size: checkpoint 300, now 256" in str(e.value)


def test_dict_differences_is_generic():
    a = {"kind": "bpe", "merges": [[1, 2], [3, 4]], "special": {"eot": 50256}}
    b = {"kind": "bpe", "merges": [[1, 2], [3, 5]], "special": {"eot": 0}}
    assert dict_differences(a, b) == ["merges.[1]: checkpoint [3, 4], now [3, 5]",
                                      "special.eot: checkpoint 50256, now 0"]
    assert dict_differences({"kind": "byte"}, {"kind": "bpe"}) == ["kind: checkpoint 'byte', now 'bpe'"]


# --------------------------------------------------------------------------- numerical faults


def test_backward_order_is_the_forward_reversed():
    cfg = tiny_config("unused", model={"n_layer": 2}).model
    order = backward_order([name for name, _ in layout(cfg)])
    assert order[:3] == ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert order[3:5] == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    assert order.index("transformer.h.1.ln_1.bias") < order.index("transformer.h.0.mlp.c_proj.weight")
    assert order[-1] == "transformer.wpe.weight" and sorted(order) == sorted(n for n, _ in layout(cfg))


@pytest.mark.parametrize("poisoned, named", [
    (["transformer.h.0.mlp.c_fc.weight"], "transformer.h.0.mlp.c_fc.weight"),
    (["transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_2.weight"], "transformer.h.1.ln_2.weight"),
])
def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_update(tmp_path, poisoned, named):
    out = tmp_path / "run"
    cfg = tiny_config(out, model={"n_layer": 2}, train={"max_steps": 6}, eval={"interval": 3})
    trainer = Trainer(cfg, progress=False)
    real_backward = trainer.model.backward

    def backward(cache, dloss=1.0):
        g = real_backward(cache, dloss)
        if trainer.state.step == 4:  # step 5 goes wrong, after the step-3 checkpoint
            for name in poisoned:
                g[name].flat[0] = np.inf
        return g

    trainer.model.backward = backward
    weights = {}
    trainer.on_step = lambda t: weights.update(step=t.state.step, params=t.model.params.data.copy())
    with pytest.raises(NonFiniteGradient) as e:
        trainer.run()
    msg = str(e.value)
    assert f"first non-finite gradient, in backward order: {named}" in msg
    assert "at step 5 with a finite loss" in msg and str(out / "ckpt.npz") in msg
    assert weights["step"] == 4 and np.array_equal(trainer.model.params.data, weights["params"])
    assert checkpoint.load(out)[0]["run"]["step"] == 3


def test_a_nan_loss_names_the_gradients_too(run_copy):
    before = snapshot(run_copy)
    r = run_cli("train.py", TINY_TOML, "--no-progress", "--resume",
                *set_args(merge(TINY, {"train": {"out_dir": str(run_copy), "max_steps": 20,
                                                 "learning_rate": 1e30}})))
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "loss became nan" in last and "first non-finite gradient, in backward order:" in last
    assert "is unchanged" in last and "Traceback" not in r.stderr
    assert snapshot(run_copy) == before
