"""Bad input to train.py and generate.py, run as real commands.

Every case must end the same way: exit code 2, exactly one non-empty line on stderr that names what
was wrong and where (the key, the file, the option), nothing on stdout, no traceback, and every file
already on disk (a previous run's checkpoint and log, the damaged input itself) byte-identical.
"""

import shutil

import numpy as np
import pytest
from conftest import TINY, TINY_TOML, merge, run_cli, snapshot, write_toml


def reject(script, *args, names=(), keep=()):
    """Run script with args; assert it fails as bad input naming every string in names, and that
    the folders in keep are unchanged."""
    before = [snapshot(folder) for folder in keep]
    r = run_cli(script, *args)
    output = r.stdout + r.stderr
    assert "Traceback" not in output, output
    assert r.returncode == 2, f"exit code {r.returncode}\n{output}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one line on stderr, got:\n{r.stderr}"
    assert r.stdout == "", f"unexpected stdout:\n{r.stdout}"
    for name in names:
        assert str(name) in lines[0], f"{name!r} not named in: {lines[0]}"
    for folder, files in zip(keep, before):
        assert snapshot(folder) == files, f"files under {folder} changed"
    return lines[0]


def config_file(tmp_path, run_dir, change=None):
    """The TINY config writing to run_dir, with change merged in, as tmp_path/bad.toml."""
    sections = merge(merge(TINY, {"train": {"out_dir": str(run_dir)}}), change or {})
    return write_toml(tmp_path / "bad.toml", sections)


def reject_config(cfg, run_dir, *names, args=()):
    """train.py cfg must fail as bad input naming names, leaving run_dir (a previous run) intact."""
    return reject("train.py", cfg, "--no-progress", *args, names=names, keep=[run_dir])


# --------------------------------------------------------------------------- train.py: the config


def test_unknown_key_names_it_and_suggests_the_nearest(tmp_path, run_copy):
    cfg = config_file(tmp_path, run_copy, {"model": {"n_embed": 16}})
    reject_config(cfg, run_copy, cfg, "'n_embed'", "did you mean 'n_embd'")


def test_unknown_section(tmp_path, run_copy):
    cfg = config_file(tmp_path, run_copy, {"modle": {"n_layer": 1}})
    reject_config(cfg, run_copy, cfg, "[modle]", "did you mean 'model'")


def test_wrong_type(tmp_path, run_copy):
    cfg = config_file(tmp_path, run_copy, {"model": {"n_layer": "four"}})
    reject_config(cfg, run_copy, cfg, "n_layer", "int", "'four'")


def test_negative_size(tmp_path, run_copy):
    cfg = config_file(tmp_path, run_copy, {"model": {"n_layer": -1}})
    reject_config(cfg, run_copy, cfg, "n_layer", "-1")


def test_a_float_that_is_not_finite(tmp_path, run_copy):
    # TOML's nan and inf are floats; neither is a learning rate or a dropout
    for section, key, value in (("train", "learning_rate", float("nan")),
                                ("train", "learning_rate", float("inf")),
                                ("model", "aux_loss_coef", float("inf"))):
        cfg = config_file(tmp_path, run_copy, {section: {key: value}})
        reject_config(cfg, run_copy, cfg, key, "finite")


def test_n_embd_not_divisible_by_n_head(tmp_path, run_copy):
    cfg = config_file(tmp_path, run_copy, {"model": {"n_embd": 16, "n_head": 3}})
    reject_config(cfg, run_copy, cfg, "n_embd", "n_head", "16", "3")


def test_missing_corpus_path(tmp_path, run_copy):
    corpus = tmp_path / "no_such_corpus.txt"
    cfg = config_file(tmp_path, run_copy, {"data": {"path": str(corpus)}})
    reject_config(cfg, run_copy, "[data] path", corpus)


def test_empty_corpus_file(tmp_path, run_copy):
    corpus = tmp_path / "empty.txt"
    corpus.write_bytes(b"")
    cfg = config_file(tmp_path, run_copy, {"data": {"path": str(corpus)}})
    reject_config(cfg, run_copy, "[data] path", corpus, "empty")


def test_empty_corpus_folder(tmp_path, run_copy):
    corpus = tmp_path / "empty_folder"
    corpus.mkdir()
    cfg = config_file(tmp_path, run_copy, {"data": {"path": str(corpus)}})
    reject_config(cfg, run_copy, "[data] path", corpus, "no files")


def test_missing_config_file(tmp_path, run_copy):
    reject_config(tmp_path / "no_such_config.toml", run_copy, tmp_path / "no_such_config.toml")


def test_invalid_toml(tmp_path, run_copy):
    cfg = tmp_path / "broken.toml"
    cfg.write_text(f'[train\nout_dir = "{run_copy}"\n', encoding="utf-8")
    reject_config(cfg, run_copy, cfg, "TOML")


def test_set_without_equals(run_copy):
    reject_config(TINY_TOML, run_copy, "--set", "train.max_steps",
                  args=["--set", f"train.out_dir={run_copy}", "--set", "train.max_steps"])


def test_resume_without_a_checkpoint(tmp_path, run_copy):
    (run_copy / "ckpt.npz").unlink()  # a run folder that has a log but no checkpoint
    cfg = config_file(tmp_path, run_copy)
    reject_config(cfg, run_copy, run_copy / "ckpt.npz", args=["--resume"])
    assert not (run_copy / "ckpt.npz").exists()


# --------------------------------------------------------------------------- generate.py


def test_generate_from_a_missing_checkpoint(tmp_path, trained_run):
    missing = tmp_path / "no_such_run"
    reject("generate.py", missing, names=[missing], keep=[tmp_path])
    assert not missing.exists()


def test_generate_from_a_truncated_checkpoint(tmp_path, trained_run):
    ckpt = tmp_path / "ckpt.npz"
    shutil.copyfile(trained_run / "ckpt.npz", ckpt)
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    reject("generate.py", ckpt, names=[ckpt], keep=[tmp_path, trained_run])


def test_generate_from_a_foreign_npz(tmp_path):
    rng = np.random.default_rng(0)
    foreign = tmp_path / "weights.npz"
    np.savez(foreign, w=rng.normal(size=(4, 4)), b=rng.normal(size=4))
    reject("generate.py", foreign, names=[foreign], keep=[tmp_path])


def test_generate_from_random_bytes_named_ckpt_npz(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ckpt.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    reject("generate.py", run_dir, names=[run_dir / "ckpt.npz"], keep=[tmp_path])


def test_generate_negative_max_new_tokens(trained_run):
    reject("generate.py", trained_run, "--max-new-tokens", "-5",
           names=["--max-new-tokens", "-5"], keep=[trained_run])


def test_generate_unreadable_prompt_file(tmp_path, trained_run):
    missing = tmp_path / "no_such_prompt.txt"
    reject("generate.py", trained_run, "--prompt-file", missing,
           names=["--prompt-file", missing], keep=[trained_run])


def test_quantize_onto_its_own_checkpoint_is_refused(run_copy):
    # the fp32 training checkpoint (weights and Adam state) must not be replaced by its int8 copy
    for output in (run_copy, run_copy / "ckpt.npz"):
        reject("-m", "minigpt", "quantize", run_copy, "-o", output, names=["ckpt.npz"], keep=[run_copy])


def test_init_and_import_into_a_trained_run_are_refused(tmp_path, run_copy):
    # the run's checkpoint (and the log and costs that describe it) must not be silently replaced
    reject("-m", "minigpt", "init", TINY_TOML, run_copy, names=[run_copy], keep=[run_copy])
    hf = tmp_path / "hf"
    assert run_cli("-m", "minigpt", "export", run_copy, hf, "--format", "hf").returncode == 0
    reject("-m", "minigpt", "import", hf, run_copy, names=[run_copy], keep=[run_copy])


def test_resume_with_a_damaged_log_is_one_line(run_copy):
    log = run_copy / "log.jsonl"
    log.write_text(log.read_text() + "{\n")
    cfg = config_file(run_copy.parent, run_copy)
    reject_config(cfg, run_copy, "log.jsonl", "line", args=["--resume"])


def test_generate_sampling_options_out_of_range(trained_run):
    for option, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--seed", "-1"),
                          ("--outlier-threshold", "nan")):
        extra = ["--int8", "w8a8"] if option == "--outlier-threshold" else []
        reject("generate.py", trained_run, "--prompt", "hi", option, value, *extra, names=[option])


def test_quantize_outlier_threshold_out_of_range(tmp_path, trained_run):
    for value in ("-1", "nan"):
        reject("-m", "minigpt", "quantize", trained_run, "-o", tmp_path / "q", "--outlier-threshold",
               value, names=["--outlier-threshold"])
        assert not (tmp_path / "q").exists()


def test_resume_from_a_checkpoint_whose_run_state_is_not_ours(tmp_path, run_copy):
    # a header that hashes fine (the hashes cover the arrays) but whose run state another version
    # (an unknown field) or damage (a step that is not a number, a foreign RNG state) wrote
    from minigpt.train import checkpoint

    meta, arrays = checkpoint.load(run_copy)
    base = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    for change in ({"run": {**meta["run"], "future_field": 1}},
                   {"run": {**meta["run"], "step": "x"}},
                   {"run": {**meta["run"], "elapsed_s": "x"}},
                   {"run": {**meta["run"], "expert_load": []}},
                   {"run": {**meta["run"], "data_rng": {"bit_generator": "MT19937"}}},
                   {"meter": [{"x": 1}]}, {"meter": "x"}):
        checkpoint.save(run_copy / "ckpt.npz", base | change, arrays)
        reject_config(config_file(tmp_path, run_copy), run_copy, "ckpt.npz", "run state",
                      args=["--resume"])
    for config in ("x", {**meta["config"], "model": 3}):
        checkpoint.save(run_copy / "ckpt.npz", base | {"config": config}, arrays)
        reject_config(config_file(tmp_path, run_copy), run_copy, "ckpt.npz", "config",
                      args=["--resume"])


def test_generate_empty_prompt_ids_is_refused_not_replaced_by_a_newline(trained_run):
    for value in ("", ","):
        reject("generate.py", trained_run, "--prompt-ids", value, names=["--prompt-ids"])


@pytest.mark.parametrize("watts", ["-5", "0", "nan", "inf", "abc"])
def test_watts_must_be_a_positive_number_before_any_work(trained_run, watts):
    """--watts is checked when the command starts, not after a run or a generation has been spent."""
    for script, args in (("generate.py", [trained_run, "--max-new-tokens", "2", "--costs"]),
                         ("train.py", [TINY_TOML])):
        r = run_cli(script, *args, "--watts", watts)
        assert r.returncode == 2, (script, r.stdout, r.stderr)
        assert "--watts" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
