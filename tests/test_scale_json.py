"""The JSON of `minigpt scale --format json`: for every shipped scenario, its keys in order, the
nested objects' keys, and JSON types only; the command prints the Estimate's to_json()."""

import json

import pytest

from minigpt import cli
from minigpt.scale import estimate, scenario

SHIPPED = sorted(p.stem for p in scenario.SCENARIO_DIR.glob("*.toml"))
HEAD = ("scenario", "description", "path", "params", "active_params", "params_closed_form",
        "active_params_closed_form", "hardware", "dtype", "power", "power_basis", "watts_per_chip")
ALWAYS = ("train_tokens", "train_flops", "train_flops_6nd", "train_flops_published",
          "train_flops_used", "chip_hours", "days", "flops_per_chip", "mfu", "energy_it_mwh",
          "energy_mwh", "co2_tonnes", "co2_net_tonnes", "water_onsite_m3", "water_offsite_m3",
          "water_m3", "households_year", "weight_bytes", "kv_bytes_per_token",
          "prefill_s_per_token", "decode_s_per_token", "decode_tokens_per_s_ceiling",
          "wh_per_query", "wh_per_query_basis", "wh_per_query_boundaries", "water_ml_per_query",
          "gwh_per_year", "breakeven_days", "breakeven_training_mwh", "breakeven_training_mwh_is",
          "inference_mwh_per_day")
TRAINING = ("train_flops_used_is", "chip_hours_is", "flops_per_chip_is", "training_layers",
            "sensitivity", "communication", "communication_why")
PER_QUERY = ("wh_it_per_query", "co2_g_per_query", "co2_net_g_per_query",
             "water_onsite_ml_per_query", "water_offsite_ml_per_query")
ENERGY = ("wh_per_query_is", "wh_per_query_roofline", "wh_per_query_compute",
          "wh_per_query_throughput", "throughput", "wh_per_query_boundaries_split")
SERVING = ("inference_chips", "batch", "weight_bits", "kv_bits", "decode_bytes_per_token",
           "decode_flops_per_token", "weights_only_tokens_per_s", "flops_per_query",
           *ENERGY, "serving_mfu", "fits_in_memory", "fit_note", "inference_layers") + PER_QUERY
STATED = (*ENERGY, "inference_chips", "fits_in_memory", "fit_note") + PER_QUERY
TAIL = ("this_machine", "measured", "assumptions", "published", "published_source", "notes")
NESTED = {
    "training_layers": ("measured", "time_x_power_mwh", "roofline_mwh", "floor_mwh"),
    "sensitivity": ("pue", "rows"),
    "communication": ("layout", "chips", "gradient_bytes", "buffer_bytes",
                      "sent_bytes_per_chip_per_step", "link_bytes_per_s", "link",
                      "seconds_per_step", "steps", "batch_tokens", "days", "compute_days",
                      "chip_hours", "energy_mwh", "co2_tonnes", "share", "total_days",
                      "total_mwh"),
    "inference_layers": ("measured", "roofline_wh_per_query", "floor_wh_per_query"),
    "wh_per_query_boundaries": ("accelerator", "host", "idle", "overhead"),
    "throughput": ("chips", "seconds", "accelerator_watts", "host_watts", "wh_per_query"),
}
ROWS = {"assumptions": ("field", "value", "origin"),
        "published": ("key", "published", "ours", "difference")}
SENSITIVITY_ROW = ("factor", "flops_per_chip", "mfu", "days", "energy_mwh")


@pytest.fixture(autouse=True)
def _empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIGPT_HOME", str(tmp_path / "home"))


def expected_keys(scn: scenario.Scenario) -> tuple[str, ...]:
    keys = HEAD + ALWAYS + (TRAINING if scenario.training_work_given(scn) else ())
    if scn.has("inference"):
        no_model = not scn.has("model") or scn.get("inference", "output_tokens") is None
        keys += STATED if no_model else SERVING
    return keys + TAIL


@pytest.mark.parametrize("name", SHIPPED)
def test_to_json_has_the_keys_of_the_json_output_in_order(name):
    scn = scenario.load(name)
    doc = estimate.estimate(scn).to_json()
    assert tuple(doc) == expected_keys(scn)
    for key, inner in NESTED.items():
        if doc.get(key) is not None:
            assert tuple(doc[key]) == inner, key
    if doc.get("sensitivity") is not None:
        assert all(tuple(r) == SENSITIVITY_ROW for r in doc["sensitivity"]["rows"])
    for key, inner in ROWS.items():
        assert all(tuple(r) == inner for r in doc[key]), key
    assert json.loads(json.dumps(doc)) == doc  # JSON types only: lists, dicts, numbers, strings


@pytest.mark.parametrize("name", ["gpt3-175b", "google-gemini-2025", "dense-70b-h100"])
def test_the_cli_prints_to_json(name, capsys):
    assert cli.main(["scale", name, "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == estimate.estimate(scenario.load(name)).to_json()
