"""Hardware profiles and constants: every packaged file loads, peaks are dense, unknowns stay
unknown, user profiles load by path and from $MINIGPT_HOME, and a bad file fails in one line naming
the file and the field."""

import pytest

from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.hardware.profiles import (
    DTYPES,
    FIGURES,
    format_profiles_table,
    list_profiles,
    load_constants,
    load_profile,
    peak,
    require,
)

NAMES = {"v100-sxm2", "a100-sxm-40gb", "a100-sxm-80gb", "h100-sxm", "h100-pcie", "h200", "b200",
         "tpu-v2", "tpu-v3", "tpu-v4", "m2-ultra"}

GOOD = """
name = "my-gpu"
description = "a user's own card"

[peak_flops.fp32]
value = 20e12
source = "my measurement"

[peak_flops.tf32]
value = "unsupported"

[peak_flops.fp16]
value = 80e12
source = "vendor sheet"

[peak_flops.int8]
value = "unknown"

[memory_bandwidth]
value = 1e12
source = "vendor sheet"

[memory_bytes]
value = 24e9
source = "vendor sheet"

[power_watts]
value = 300
source = "vendor sheet"
"""


@pytest.fixture(autouse=True)
def _empty_home(tmp_path, monkeypatch):
    """No test sees the developer's own ~/.minigpt."""
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))


def test_every_packaged_profile_loads_with_sources():
    profiles = {p.name: p for p in list_profiles()}
    assert set(profiles) == NAMES
    for name, p in profiles.items():
        assert p.path.stem == name and p.description
        assert set(p.peak_flops) == set(DTYPES) | {"fp64"}
        keys = [f"peak_flops.{t}" for t in DTYPES] + list(FIGURES) + ["system_power_watts"]
        values = [p.peak_flops[t] for t in DTYPES] + [getattr(p, f) for f in FIGURES]
        values.append(p.system_power_watts)
        for key, value in zip(keys, values):
            if value is None:
                assert p.missing[key] in ("unknown", "unsupported"), (name, key)
            else:
                assert value > 0 and p.sources[key].strip(), (name, key)


def test_peaks_are_dense_not_sparse():
    h100 = load_profile("h100-sxm")
    assert peak(h100, "fp16") in (989.4e12, 989e12)
    assert peak(h100, "bf16") == peak(h100, "fp16") < 1979e12  # 1979 is the sparse headline
    assert peak(h100, "int8") == 1979e12
    assert h100.memory_bandwidth == 3.35e12 and h100.power_watts == 700
    for name in ("a100-sxm-40gb", "a100-sxm-80gb"):
        a100 = load_profile(name)
        assert peak(a100, "fp16") == 312e12 and peak(a100, "int8") == 624e12
        assert peak(a100, "tf32") == 156e12 and peak(a100, "float32") == 19.5e12
    assert load_profile("a100-sxm-80gb").memory_bandwidth == 2039e9
    assert peak(load_profile("b200"), "fp16") == 2250e12
    assert peak(load_profile("h100-pcie"), "fp16") == 756e12
    assert load_profile("tpu-v3").memory_bytes == 32 * 2**30


def test_unknowns_are_none_and_peak_refuses_them():
    m2 = load_profile("m2-ultra")
    assert all(v is None for v in m2.peak_flops.values()) and m2.power_watts is None
    assert m2.memory_bandwidth == 800e9
    v100 = load_profile("v100-sxm2")
    assert v100.peak_flops["int8"] is None
    with pytest.raises(ConfigError, match=r"^v100-sxm2: peak int8 FLOP/s is unknown"):
        peak(v100, "int8")
    with pytest.raises(ConfigError, match=r"v100-sxm2: peak tf32 FLOP/s is not supported"):
        peak(v100, "tf32")
    with pytest.raises(ConfigError, match=r"tpu-v3: peak fp32 FLOP/s is unknown"):
        peak(load_profile("tpu-v3"), "fp32")
    with pytest.raises(ConfigError, match=r"tpu-v4: power_watts is unknown"):
        require(load_profile("tpu-v4"), "power_watts")
    with pytest.raises(ConfigError, match=r"v100-sxm2: peak fp64 FLOP/s is unknown"):
        peak(v100, "fp64")  # optional in a profile: absent means unknown
    assert require(load_profile("tpu-v3"), "power_watts") == 450  # TDP, not the measured 220


def test_user_profile_by_path_and_from_minigpt_home(tmp_path, monkeypatch):
    path = tmp_path / "mine.toml"
    path.write_text(GOOD)
    for arg in (path, str(path)):
        p = load_profile(arg)
        assert p.name == "my-gpu" and peak(p, "fp16") == 80e12 and p.path == path
        assert p.peak_flops["tf32"] is None and p.missing["peak_flops.tf32"] == "unsupported"
    home = tmp_path / "home"
    (home / "hardware").mkdir(parents=True)
    (home / "hardware" / "local-cpu.toml").write_text(GOOD.replace("my-gpu", "local-cpu"))
    assert load_profile("local-cpu").memory_bytes == 24e9
    assert "local-cpu" in [p.name for p in list_profiles()]
    assert profiles.user_dir() == home / "hardware"


def test_unknown_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'h100-sxm'"):
        load_profile("h100-sxn")
    with pytest.raises(ConfigError, match="not found"):
        load_profile("/no/such/profile.toml")


@pytest.mark.parametrize("edit, field, words", [
    (("[peak_flops.int8]", "[peak_flops.fp8]\nvalue = 1e12\nsource = \"x\"\n\n[peak_flops.int8]"),
     "peak_flops.fp8", "unknown dtype"),
    (("value = 1e12", "value = -1e12"), "memory_bandwidth.value", "must be positive"),
    (("[power_watts]\nvalue = 300\nsource = \"vendor sheet\"", ""), "power_watts",
     "missing required"),
    (("value = 24e9\nsource = \"vendor sheet\"", "value = 24e9"), "memory_bytes", "source"),
    (("value = 80e12", "value = \"lots\""), "peak_flops.fp16.value", "must be a number"),
    (("[memory_bytes]", "[memory_byte]"), "memory_byte", "did you mean 'memory_bytes'"),
    (("value = 300", "value = 300\nunits = \"W\""), "power_watts.units", "unknown field"),
    (("[peak_flops.tf32]\nvalue = \"unsupported\"", ""), "peak_flops.tf32", "missing required"),
    (("name = \"my-gpu\"", "name = "), "", "not valid TOML"),
])
def test_bad_profile_is_one_line_naming_file_and_field(tmp_path, edit, field, words):
    path = tmp_path / "bad.toml"
    old, new = edit
    assert old in GOOD
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as e:
        load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and field in msg and words in msg, msg


def test_format_profiles_table():
    text = format_profiles_table(list_profiles())
    lines = text.splitlines()
    assert "fp32 TFLOP/s" in lines[0] and "bandwidth GB/s" in lines[0]
    h100 = next(line for line in lines if line.startswith("h100-sxm "))
    assert h100.split() == ["h100-sxm", "66.9", "989.4", "1979", "80", "3350", "700", "1275"]
    m2 = next(line for line in lines if line.startswith("m2-ultra"))
    assert m2.split() == ["m2-ultra", "?", "?", "?", "192", "800", "?", "?"]
    assert "dense" in lines[-1]


def test_constants_are_sourced_and_consistent():
    c = load_constants()
    assert c["pue"].value == 1.10 and "Patterson" in c["pue"].source
    assert c["carbon_kg_per_kwh"].value == 0.367 and "EIA" in c["carbon_kg_per_kwh"].source
    assert c["household_kwh_per_year"].value == 10715
    assert c["water_onsite_l_per_kwh"].value == 0.55 and "2304.03271" in c[
        "water_onsite_l_per_kwh"].source
    assert c["water_offsite_l_per_kwh"].value == 3.142 and "Li" in c["water_offsite_l_per_kwh"].source
    assert c["carbon_net_kg_per_kwh"].value is None  # no general figure: only when given
    op = {k.split(".", 1)[1]: v.value for k, v in c.items() if k.startswith("energy_per_op.")}
    assert op["fp32_mult"] == 3.7 and op["sram_read_64bit"] == 10
    assert (op["dram_read_64bit_low"], op["dram_read_64bit_high"]) == (1300, 2600)
    assert c["energy_per_byte.sram_read"].value == op["sram_read_64bit"] / 8
    assert c["energy_per_byte.dram_read_low"].value == op["dram_read_64bit_low"] / 8
    assert c["energy_per_byte.dram_read_high"].value == op["dram_read_64bit_high"] / 8
    for t in ("int8", "int32", "fp16", "fp32"):
        flop = c[f"energy_per_flop.{t}"]
        assert flop.value == pytest.approx((op[f"{t}_add"] + op[f"{t}_mult"]) / 2)
        assert flop.arithmetic and flop.unit == "pJ / FLOP"
    for name, const in c.items():
        assert const.unit and (const.value is None or const.source), name


def test_bad_constants_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[pue]\nvalue = 1.1\nsource = "x"\n')
    with pytest.raises(ConfigError, match=r"c\.toml: pue: missing required field 'unit'"):
        load_constants(path)
    path.write_text('[group.x]\nvalue = -2\nunit = "pJ"\nsource = "x"\n')
    with pytest.raises(ConfigError, match=r"group\.x\.value: must be positive"):
        load_constants(path)


def test_system_power_per_accelerator_is_sourced_where_published():
    """DGX servers' maximum power over their 8 GPUs; Patterson's measured averages for V100, TPU v3;
    an older or user profile without the entry still loads (unknown)."""
    expected = {"a100-sxm-40gb": 6500 / 8, "a100-sxm-80gb": 6500 / 8, "h100-sxm": 10200 / 8,
                "h200": 10200 / 8, "b200": 14300 / 8, "v100-sxm2": 325, "tpu-v3": 283}
    for name, watts in expected.items():
        p = load_profile(name)
        assert p.system_power_watts == watts, name
        assert p.sources["system_power_watts"] and p.system_power_watts > p.power_watts * 0.5
    assert load_profile("tpu-v4").system_power_watts is None
    assert load_profile("tpu-v4").missing["system_power_watts"] == "unknown"
