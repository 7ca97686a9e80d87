"""minigpt.track(): what a tracked block records equals what the commands report for the same
work (generate --costs, train.py's costs.json, the closed form of `minigpt costs --config`);
trackers nest; the decorator; typed Costs and Energy with to_json() and HTML displays."""

import numpy as np
import pytest
from conftest import TINY, TINY_TOML

import minigpt
from minigpt import config, tracking
from minigpt.cli import main as cli_main
from minigpt.counting import closed_form, tables
from minigpt.counting.meter import METER
from minigpt.energy import run_energy
from minigpt.energy.accounting import PowerBasis
from minigpt.errors import MiniGPTError
from minigpt.nn.params import FlatBuffer
from minigpt.train.optim import AdamW
from minigpt.train.trainer import training_step

FLAT_TINY = {k: v for table in TINY.values() for k, v in table.items()}
KEY = ("scope", "op", "kind", "phase", "dtype")


def counts(rows) -> dict:
    """{record key: (calls, FLOPs, bytes read, bytes written)}: what does not depend on timing."""
    return {tuple(r[k] for k in KEY): (r["calls"], r["flops"], r["bytes_read"], r["bytes_written"])
            for r in rows}


@pytest.fixture(scope="module")
def model(trained_run):
    return minigpt.load(trained_run)


def test_a_tracked_generation_equals_generate_costs(model, trained_run, capsys):
    """The FLOPs and bytes of a tracked generation are those `generate --costs` reports for the
    same prompt and seed, record by record and as printed."""
    with minigpt.track() as t:
        text = model.generate("The fox ", max_new_tokens=40, temperature=0.8, top_k=20, seed=7)
    capsys.readouterr()
    code = cli_main(["generate", str(trained_run), "--prompt", "The fox ", "--max-new-tokens", "40",
                     "--temperature", "0.8", "--top-k", "20", "--seed", "7", "--costs"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("The fox " + text)
    cli_rows = tables.rows_from_records(METER.records)  # the command reset the meter first
    assert counts(t.costs.rows) == counts(cli_rows)
    printed = {line.split()[0]: line for line in out.splitlines()
               if line.split()[:1] in (["prefill"], ["decode"]) and "tokens" not in line}
    assert set(printed) == {"prefill", "decode"}
    for phase in t.costs.by("phase"):
        assert f" {tables.si(phase.flops)} " in printed[phase.name]
        assert f" {tables.si(phase.bytes, 'B')} " in printed[phase.name]
    assert t.costs.flops == sum(r["flops"] for r in cli_rows)
    assert t.costs.bytes == sum(r["bytes_read"] + r["bytes_written"] for r in cli_rows)
    assert t.energy.tokens == 40


def test_trackers_nest_and_the_meter_keeps_everything(model):
    def gen(prompt, n):
        return model.generate(prompt, max_new_tokens=n, temperature=0)

    with minigpt.track() as alone:
        gen("B", 7)
    METER.reset()
    before = sum(r.flops for r in METER.records.values())
    with minigpt.track() as outer:
        gen("A", 5)
        with minigpt.track() as inner:
            gen("B", 7)
        gen("C", 3)
    assert counts(inner.costs.rows) == counts(alone.costs.rows)
    assert inner.energy.tokens == 7 and outer.energy.tokens == 15
    with minigpt.track() as a:
        gen("A", 5)
    with minigpt.track() as c:
        gen("C", 3)
    assert outer.costs.flops == a.costs.flops + inner.costs.flops + c.costs.flops
    assert outer.costs.bytes == a.costs.bytes + inner.costs.bytes + c.costs.bytes
    after = sum(r.flops for r in METER.records.values())
    assert after - before == outer.costs.flops + a.costs.flops + c.costs.flops


def test_the_decorator_tracks_each_call(model):
    @minigpt.track
    def write(prompt):
        return model.generate(prompt, max_new_tokens=6, temperature=0)

    with minigpt.track() as t:
        model.generate("ab", max_new_tokens=6, temperature=0)
    write("a longer prompt")
    first = write.tracker.costs
    write("ab")
    assert counts(write.tracker.costs.rows) == counts(t.costs.rows)
    assert first.flops > t.costs.flops  # each call replaced the last one's results

    watts = minigpt.track(watts=25.0)(lambda: model.generate([1, 2], 3))
    watts()
    e = watts.tracker.energy
    assert e.basis is PowerBasis.GIVEN and e.basis == "given" and e.watts == 25.0
    assert e.joules == pytest.approx(e.seconds * 25.0 * e.to_json()["pue"])
    for bad in (0, -3.0, float("nan"), "25"):
        with pytest.raises(MiniGPTError, match="watts"):
            minigpt.track(watts=bad)


def test_an_error_in_the_block_keeps_the_counts(model):
    with pytest.raises(ZeroDivisionError), minigpt.track() as outer, minigpt.track() as t:
        model.generate([3, 4], max_new_tokens=4)
        1 / 0  # noqa: B018
    assert t.costs.flops > 0 and outer.costs.flops == t.costs.flops


def test_results_before_the_block_ends_are_refused(model):
    t = minigpt.track()
    with pytest.raises(MiniGPTError, match="has not finished a block"):
        t.costs  # noqa: B018
    with t, pytest.raises(MiniGPTError, match="has not finished"):
        t.energy  # noqa: B018


def test_training_inside_a_tracker_adds_to_what_it_tracked(model, tmp_path):
    with minigpt.track() as gen_only:
        model.generate("The ", max_new_tokens=5, temperature=0)
    with minigpt.track() as t:
        model.generate("The ", max_new_tokens=5, temperature=0)
        run = minigpt.train(TINY_TOML, progress=False, out_dir=tmp_path / "run", **FLAT_TINY)
    assert t.costs.flops == gen_only.costs.flops + run.costs.flops
    assert counts(r for r in t.costs.rows if r["phase"] in ("forward", "backward", "optimizer")) \
        == counts(r for r in run.costs.rows if r["phase"] in ("forward", "backward", "optimizer"))
    assert t.energy.tokens == 5 + run.tokens


def test_costs_and_energy_are_typed_and_serialise(model):
    with minigpt.track() as t:
        model.generate("Once", max_new_tokens=12, temperature=0)
    c, e = t.costs, t.energy
    for grouping in ("layer", "op", "phase", "scope", "kind"):
        rows = c.by(grouping)
        assert sum(r.flops for r in rows) == c.flops and sum(r.bytes for r in rows) == c.bytes
        assert all(isinstance(r, minigpt.CostRow) for r in rows)
    assert {r.name for r in c.by("phase")} == {"prefill", "decode"} == set(c.phases)
    assert sum(r.joules for r in c.by("layer")) == pytest.approx(e.to_json()["metered"]["joules"])
    assert c.by("layer", phase="decode")[0].flops <= c.flops
    with pytest.raises(MiniGPTError, match="group by one of"):
        c.by("layers")
    doc = c.to_json()
    assert doc["totals"]["all"]["flops"] == c.flops and len(doc["records"]) == len(c.rows)
    assert "lm_head" in c.table() and "h0" in c.table(by="layer", phase="decode")
    assert run_energy._shape_fault(e.to_json()) == ""
    assert set(e.layers) == {"measured", "time_x_power", "roofline", "floor"}
    assert e.floor.joules > 0 and e.floor.joules == e.layers["floor"].joules
    best = e.measured if e.measured.joules is not None else e.time_x_power
    assert e.joules == best.joules and e.wh == pytest.approx(e.joules / 3600)
    assert isinstance(e.basis, PowerBasis) and e.basis_note
    assert "energy, four ways" in str(e) and "Energy(" in repr(e) and "Costs(" in repr(c)
    assert c._repr_html_().count("<svg") >= 3 and "decode" in c._repr_html_()
    assert "<svg" in e._repr_html_() and "physics floor" in e._repr_html_()


def test_a_tracked_training_run_matches_its_cost_files(tmp_path):
    with minigpt.track() as t:
        run = minigpt.train(TINY_TOML, progress=False, out_dir=tmp_path / "run", **FLAT_TINY)
    on_disk = tables.load(run.out_dir)["records"]
    assert counts(t.costs.rows) == counts(on_disk)
    assert t.energy.floor.joules == pytest.approx(run.energy.floor.joules)


@pytest.mark.parametrize(("n_layer", "n_head", "n_embd", "block", "batch", "seq"),
                         [(1, 2, 8, 16, 2, 5), (2, 4, 16, 12, 3, 12)])
def test_tracked_steps_and_generations_equal_the_closed_form(n_layer, n_head, n_embd, block,
                                                            batch, seq):
    """A training step and a generation, tracked, equal what `minigpt costs --config ... --mode
    train|prefill|decode` predicts for the same shapes (the closed form), record by record."""
    cfg = config.load(None, [f"model.n_layer={n_layer}", f"model.n_head={n_head}",
                             f"model.n_embd={n_embd}", f"model.block_size={block}"])
    m = minigpt.Model.from_config(cfg, seed=1)
    m.gpt.grads = FlatBuffer(cfg.model, "float32")
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, 256, (batch, seq)) for _ in range(2))
    with minigpt.track() as step:
        training_step(m.gpt, AdamW(m.gpt.params), [(x, y)], lr=1e-3)
    predicted = closed_form.predict_training_step(cfg.model, batch, seq)
    assert counts(step.costs.rows) == counts(tables.rows_from_records(predicted))

    prompt, new = x[0, : seq // 2 + 1], block - seq // 2 - 1  # fills the cache, no rebuild
    with minigpt.track() as gen:
        m.generate(prompt, max_new_tokens=new, temperature=0)
    predicted = dict(closed_form.predict_forward(cfg.model, 1, len(prompt), phase="prefill"))
    for position in range(len(prompt), len(prompt) + new - 1):
        tracking.add_records(predicted, closed_form.predict_decode(cfg.model, 1, position))
    assert counts(gen.costs.rows) == counts(tables.rows_from_records(predicted))
