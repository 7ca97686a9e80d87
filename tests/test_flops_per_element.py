"""Every elementwise FLOPs-per-element constant against its documented derivation: the table in
docs/costs.md ("FLOPs per element": kind, op, the count, and what is counted) is read here and must
list exactly the kinds and numbers of minigpt.counting.meter.FLOPS_PER_ELEMENT, so a number changed
in the code alone (or in the doc alone) fails. The meter and the closed form both read the code's
table, so no count-equals-prediction test can see such a change.

Then the layers: GELU's and softmax's records, run here, carry the documented number times the
elements of their main operand.
"""

import math
import pathlib

import numpy as np
import pytest

from minigpt.counting.meter import FLOPS_PER_ELEMENT, METER
from minigpt.nn import layers as nn

COSTS_MD = pathlib.Path(__file__).resolve().parents[1] / "docs" / "costs.md"


def documented() -> dict[tuple[str, str], tuple[int, str]]:
    """{(kind, op): (FLOPs per element, what is counted)} from the table in docs/costs.md."""
    lines = COSTS_MD.read_text(encoding="utf-8").splitlines()
    start = lines.index("### FLOPs per element")
    table, seen_table = {}, False
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            if seen_table:
                break  # the first line after the table
            continue
        seen_table = True
        kind, op, count, what = (cell.strip() for cell in line.strip("|").split("|", 3))
        if kind == "kind" or set(kind) <= {"-"}:
            continue  # the header and the rule under it
        assert (kind, op) not in table, f"docs/costs.md lists {kind}/{op} twice"
        table[kind, op] = (int(count), what)
    return table


def test_the_doc_table_lists_every_kind_the_code_counts_and_no_other():
    doc = documented()
    assert sorted(set(FLOPS_PER_ELEMENT) - set(doc)) == [], "in the code, not in docs/costs.md"
    assert sorted(set(doc) - set(FLOPS_PER_ELEMENT)) == [], "in docs/costs.md, not in the code"


@pytest.mark.parametrize("key", sorted(FLOPS_PER_ELEMENT), ids="/".join)
def test_each_constant_is_its_documented_count(key):
    doc = documented()
    assert key in doc, f"{'/'.join(key)} has no row in docs/costs.md"
    count, what = doc[key]
    assert what, f"{'/'.join(key)}: the doc gives no derivation"
    assert FLOPS_PER_ELEMENT[key] == count, (key, FLOPS_PER_ELEMENT[key], count, what)


def _recorded(kind: str, op: str) -> tuple[int, int]:
    """(FLOPs, calls) of the meter's records of this kind and op."""
    rows = [r for (_, o, k, *_), r in METER.records.items() if (k, o) == (kind, op)]
    return sum(r.flops for r in rows), sum(r.calls for r in rows)


def test_gelu_records_the_documented_flops():
    doc = documented()
    x = np.random.default_rng(0).normal(0, 1, (2, 3, 20)).astype(np.float32)  # 120 elements
    METER.reset()
    out, cache = nn.gelu_forward(x.copy())
    nn.gelu_backward(np.ones_like(out), cache)
    assert _recorded("gelu", "tanh") == (doc["gelu", "tanh"][0] * x.size, 1)
    assert _recorded("gelu", "grad") == (doc["gelu", "grad"][0] * x.size, 1)
    METER.reset()


def test_softmax_records_the_documented_flops_per_score():
    doc = documented()
    scores = np.random.default_rng(1).normal(0, 1, (2, 3, 5, 5)).astype(np.float32)  # 150 scores
    METER.reset()
    att = nn.causal_softmax_forward(scores.copy(), 1 / math.sqrt(4))
    nn.causal_softmax_backward(np.ones_like(att), att, 1 / math.sqrt(4))
    assert _recorded("softmax", "causal") == (doc["softmax", "causal"][0] * scores.size, 1)
    assert _recorded("softmax", "grad") == (doc["softmax", "grad"][0] * scores.size, 1)
    METER.reset()
