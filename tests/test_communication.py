"""minigpt scale's gradient allreduce (minigpt.scale.communication) and the profiles' interconnect
figures: the projection worked by hand, the link choice, and bad input in one line."""

import pytest

from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.scale import chips, communication, estimate, footprint, table, training
from minigpt.scale.scenario import load


def test_every_packaged_gpu_profile_sources_its_links():
    for p in profiles.list_profiles():
        for link, value in p.interconnect.items():
            if value is not None:
                assert p.sources[f"interconnect.{link}"].strip(), (p.name, link)
    v100 = profiles.load_profile("v100-sxm2")
    assert v100.interconnect["nvlink"] == 150e9  # 300 GB/s both ways, NVIDIA's headline / 2
    with pytest.raises(ConfigError, match="interconnect.nvlink is unknown"):
        profiles.link_bandwidth(profiles.load_profile("h100-pcie"), "nvlink")


def test_a_profile_with_an_unknown_link_is_refused(tmp_path):
    text = profiles.PACKAGED.joinpath("v100-sxm2.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[interconnect.pcie]", "[interconnect.pcei]"))
    with pytest.raises(ConfigError, match=r"interconnect\.pcei: unknown field.*interconnect\.pcie"):
        profiles.load_profile(bad)


def test_gpt3_on_10000_v100s_by_hand():
    r = estimate.estimate(load("gpt3-175b", ["hardware.interconnect=nvlink"]))
    c = r.communication.allreduce
    P, N = r.params, 10_000
    per_step = 2 * (N - 1) / N * P * 2 / 150e9  # fp16 gradients over NVLink at 150 GB/s each way
    steps = 300e9 / 3.2e6
    assert c.seconds_per_step == pytest.approx(per_step)
    assert c.days == pytest.approx(per_step * steps / 86400)
    compute_days = 3.14e23 / 24.6e12 / N / 86400
    assert c.share == pytest.approx(c.days / (c.days + compute_days))
    assert c.energy_mwh == pytest.approx(per_step * steps * N * 330 * 1.10 / 3.6e9)
    assert c.total_days == pytest.approx(c.days + compute_days)
    assert c.total_mwh == pytest.approx(c.energy_mwh + r.training.costs.footprint.energy_mwh)
    assert r.to_json()["communication"] == c.to_json()
    text = table.format_table(r)
    assert "pure data parallel over all chips" in text and "share of training time" in text


def test_the_default_link_is_the_slowest_and_a_number_overrides_it():
    scn = load("gpt3-175b")
    del scn.values["hardware"]["interconnect"]  # the shipped scenario names its network
    slowest = estimate.estimate(scn).communication.allreduce
    assert slowest.link_bytes_per_s == 16e9 and "pcie" in slowest.link
    given = estimate.estimate(load("gpt3-175b", ["hardware.interconnect_bandwidth=1e12"]))
    assert given.communication.allreduce.link_bytes_per_s == 1e12
    assert given.communication.allreduce.share < slowest.share


def test_without_batch_tokens_nothing_is_guessed():
    scn = load("gpt3-175b")
    del scn.values["training"]["batch_tokens"]
    r = estimate.estimate(scn)
    assert r.communication.allreduce is None and "batch_tokens" in r.communication.why
    assert r.to_json()["communication"] is None
    assert "communication: not estimated" in "\n".join(table.communication_lines(r.communication))


def test_a_bad_link_name_is_one_line():
    with pytest.raises(ConfigError, match="interconnect must be one of nvlink, pcie, infiniband"):
        estimate.estimate(load("gpt3-175b", ["hardware.interconnect=ethernet"]))
    unused = load("gpt3-175b", ["hardware.interconnect=pcie4"])
    del unused.values["training"]["batch_tokens"]
    with pytest.raises(ConfigError, match="interconnect must be one of"):  # even when unused
        estimate.estimate(unused)
    scn = load("gpt3-175b", ["hardware.profile=tpu-v4", "hardware.mfu=0.5"])
    chip, s = chips.chip_of(scn), footprint.settings_of(scn)
    compute = training.training_costs(None, chip, s, chip_hours=1.0)
    with pytest.raises(ConfigError, match="infiniband is not supported by this device"):
        communication.communication(scn, 1e9, chip, s, compute)
    del scn.values["hardware"]["interconnect"]
    with pytest.raises(ConfigError, match="no interconnect figure"):
        communication.communication(scn, 1e9, chip, s, compute)
