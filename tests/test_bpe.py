"""GPT-2's byte-level BPE: ids equal to transformers' GPT2Tokenizer on a varied text set (vocab
and merges learned by the tokenizers package), raw bytes round-trip, our own training and saving,
and a BPE run trained and sampled end to end."""

import json
import math

import pytest
from conftest import FABLES, TINY, TINY_TOML, merge, run_cli, set_args, tiny_config

pytest.importorskip("regex")
from minigpt.errors import DataError
from minigpt.tokenizers.bpe import BPETokenizer, bytes_to_unicode

TEXTS = [
    "Hello world! It's a test. We'll see, they've done it, I'm sure, you'd know.",
    "DON'T shout; don't. I'LL go, O'Neil's",
    "def f(x):\n    return x ** 2  # square\n\n\tindented\ttabs\r\n",
    "naïve café Ünïcödé 日本語のテキスト Ελληνικά русский עברית",
    "emoji 🙂🚀 and a family 👩‍👩‍👧 and flags 🇫🇷",
    "numbers 12345 3.14159 1e-5 0xFF 1,000,000 ٣٤٥",
    "   multiple   spaces\n\n\n  and newlines  ",
    "x = [1,2,3]; y = {'a': b} if a != b else None  # -> ok",
    "", " ", "  x", "\t", "\n\n", "a\u00a0b\u2028c", "Hello<|endoftext|>world",
]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(our tokenizer, transformers' GPT2Tokenizer) on one vocab.json + merges.txt from tokenizers."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bpe")
    trainer = tokenizers.ByteLevelBPETokenizer()
    corpus = TEXTS[:8] * 5 + [FABLES.read_text(encoding="utf-8")[:20000]]
    trainer.train_from_iterator(corpus, vocab_size=600, min_frequency=2, show_progress=False,
                                special_tokens=["<|endoftext|>"])
    trainer.save_model(str(folder))
    theirs = transformers.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    return BPETokenizer.load(folder), theirs


def test_ids_equal_gpt2_tokenizer_on_varied_text(hf_pair):
    ours, theirs = hf_pair
    assert len(ours.merges) > 200  # the learned merges are really used
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == text


def test_ids_equal_on_a_page_of_prose(hf_pair):
    ours, theirs = hf_pair
    page = FABLES.read_text(encoding="utf-8")[20000:26000]
    ids = ours.encode(page)
    assert ids == theirs.encode(page)
    assert len(ids) < 0.6 * len(page.encode())  # merges compress


def test_invalid_utf8_bytes_round_trip(hf_pair):
    ours, _ = hf_pair
    for blob in (b"\xff\xfe\x00abc", b"caf\xc3", b"\xed\xa0\x80 lone surrogate", bytes(range(256))):
        assert ours.decode_bytes(ours.encode_bytes(blob)) == blob
    assert ours.encode_bytes("naïve 🙂".encode()) == ours.encode("naïve 🙂")


def test_stream_decoder_holds_back_partial_characters(hf_pair):
    ours, _ = hf_pair
    text = "café 🙂 日本"
    dec = ours.stream_decoder()
    pieces = [dec([t]) for t in ours.encode_bytes(text.encode())] + [dec([], final=True)]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)


def test_train_save_load_round_trip(tmp_path):
    text = FABLES.read_bytes()[:60000]
    tok = BPETokenizer.train(text, 400)
    assert tok.vocab_size == 400 and len(tok.merges) >= 144
    assert tok.decode_bytes(tok.encode_bytes(text)) == text
    tok.save(tmp_path)
    again = BPETokenizer.load(tmp_path)
    assert again.encode_bytes(text) == tok.encode_bytes(text)
    assert len(tok.encode_bytes(text)) < 0.6 * len(text)
    first = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert [first[c] for c in bytes_to_unicode().values()] == list(range(256))


def test_our_merges_load_in_gpt2_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    BPETokenizer.train(FABLES.read_bytes()[:40000], 350).save(tmp_path)
    ours = BPETokenizer.load(tmp_path)
    theirs = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    for text in TEXTS[:8]:
        assert ours.encode(text) == theirs.encode(text), text


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(DataError, match="vocab.json: no such file"):
        BPETokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DataError, match="lacks 255 of the 256 byte symbols") as lacking:
        BPETokenizer.load(tmp_path)
    assert str(tmp_path) in str(lacking.value)  # the message names the folder it read
    (tmp_path / "vocab.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must map token strings"):
        BPETokenizer.load(tmp_path)


def test_bpe_run_trains_generates_and_reports_bits_per_byte(tmp_path):
    out = tmp_path / "run"
    sections = merge(TINY, {"train": {"out_dir": str(out)}, "model": {"vocab_size": 320},
                            "data": {"tokenizer": "bpe", "vocab_size": 300}})
    r = run_cli("train.py", TINY_TOML, "--no-progress", *set_args(sections))
    assert r.returncode == 0, r.stderr
    assert "bits/byte" in r.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    bpt = log[-1]["val_loss"] / log[-1]["val_bpb"] / math.log(2)  # bytes per token
    assert 1.5 < bpt < 4  # merges made tokens longer than a byte
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    g = run_cli("generate.py", out, "--prompt", "The fox ", "--max-new-tokens", "20", "--seed", "1")
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("The fox ") and len(g.stdout) > len("The fox ") + 10


def test_byte_run_reports_bits_per_byte_as_nats_over_ln2(tmp_path):
    from minigpt.train.trainer import Trainer

    Trainer(tiny_config(tmp_path), progress=False).run()
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2), rel=1e-12)


def test_model_vocab_must_cover_the_tokenizer(tmp_path):
    from minigpt.errors import ConfigError

    with pytest.raises(ConfigError, match="exceeds \\[model\\] vocab_size = 256"):
        tiny_config(tmp_path, data={"tokenizer": "bpe", "vocab_size": 300})


def test_bpe_run_resumes_exactly(tmp_path):
    """A resumed BPE run learns the same merges again, so it reproduces the uninterrupted run."""
    import numpy as np

    from minigpt.train import checkpoint
    from minigpt.train.trainer import Trainer

    sections = {"train": {"max_steps": 6}, "eval": {"interval": 3}, "model": {"vocab_size": 300},
                "data": {"tokenizer": "bpe"}}
    Trainer(tiny_config(tmp_path / "a", **sections), progress=False).run()

    def stop_at_3(trainer):
        if trainer.state.step == 3:
            trainer.request_stop()

    Trainer(tiny_config(tmp_path / "b", **sections), progress=False, on_step=stop_at_3).run()
    Trainer(tiny_config(tmp_path / "b", **sections), resume=True, progress=False).run()
    meta_a, arrays_a = checkpoint.load(tmp_path / "a")
    meta_b, arrays_b = checkpoint.load(tmp_path / "b")
    assert meta_a["tokenizer"] == meta_b["tokenizer"] and meta_a["tokenizer"]["kind"] == "bpe"
    assert np.array_equal(arrays_a["params"], arrays_b["params"])


def test_tokenizer_path_is_used_and_must_fit_the_model(tmp_path):
    from minigpt.errors import ConfigError
    from minigpt.train.trainer import Trainer

    folder = tmp_path / "tok"
    BPETokenizer.train(FABLES.read_bytes()[:30000], 280).save(folder)
    cfg = tiny_config(tmp_path / "run", model={"vocab_size": 280},
                      data={"tokenizer": "bpe", "tokenizer_path": str(folder)})
    trainer = Trainer(cfg, progress=False)
    assert trainer.tokenizer.merges == BPETokenizer.load(folder).merges
    assert trainer.corpus.train.dtype == "uint16" and trainer.corpus.train.max() < 280
    small = tiny_config(tmp_path / "run2", model={"vocab_size": 270},
                        data={"tokenizer": "bpe", "tokenizer_path": str(folder)})
    with pytest.raises(ConfigError, match="smaller than the tokenizer's 280"):
        Trainer(small, progress=False)
