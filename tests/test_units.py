"""minigpt.units against hand-computed values: the conversions every energy figure goes through,
the SI-prefixed text and the fitted table lines."""

import pytest

from minigpt import units


def test_energy_conversions():
    assert units.wh(3600.0) == 1.0
    assert units.kwh(3.6e6) == 1.0
    assert units.mwh(7.2e9) == 2.0
    assert units.gwh(3.6e12) == 1.0
    assert units.joules(wh=1, kwh=1) == 3600 + 3.6e6
    assert units.joules(mwh=0.5) == 1.8e9
    assert units.watt_hours(60, 120) == pytest.approx(2.0)  # 60 W for two minutes
    assert units.megawatt_hours(300, 1e4) == pytest.approx(3.0)  # 10,000 chip-hours at 300 W


@pytest.mark.parametrize(("x", "kwargs", "text"), [
    (12345, {"unit": "J"}, "12.3 kJ"),
    (0.0456, {"unit": "J"}, "45.6 mJ"),
    (3.2e9, {"sep": ""}, "3.2G"),
    (0.5, {"sep": ""}, "500m"),
    (0, {"unit": "B"}, "0 B"),
    (786.43e6, {"unit": "B", "spec": ".2f", "down_to": 1e3, "rest": ".0f"}, "786.43 MB"),
    (512, {"unit": "B", "spec": ".2f", "down_to": 1e3, "rest": ".0f"}, "512 B"),
    (2.5e15, {"unit": "FLOP"}, "2.5 PFLOP"),
    (-4e6, {"unit": "W"}, "-4 MW"),
])
def test_si(x, kwargs, text):
    assert units.si(x, **kwargs) == text


def test_rows_text_fits_columns_and_aligns():
    lines = units.rows_text(("name", "n"), [("a", "1"), ("longer", "100")])
    assert lines == ["name      n", "-----------", "a         1", "longer  100"]
    assert units.rows_text(("x", "y"), [("1", "2")], align="><", rule=False) == ["x  y", "1  2"]
