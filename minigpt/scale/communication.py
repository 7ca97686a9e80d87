"""Data-parallel communication at full size: the gradient allreduce a cluster runs every step.

The layout assumed (printed with every estimate): PURE DATA PARALLEL over all the scenario's chips,
each holding a whole copy of the model, with one ring allreduce of the gradients per optimizer
step, not overlapped with compute, every hop at the bandwidth of one link (each way):

    gradient bytes per step = params x gradient_bytes      (2 for fp16/bf16 gradients, 4 for fp32)
    bytes each chip sends   = 2 (N - 1) / N x gradient bytes    (minigpt.counting.closed_form.allreduce_bytes,
                                                                 the formula the meter counts with)
    seconds per step        = bytes each chip sends / link bytes/s
    steps                   = training tokens / batch_tokens     (the global batch, in tokens)
    communication time      = steps x seconds per step; energy = time x chips x W x PUE (the chips
                              draw their power while they wait: an assumption)
    share                   = communication time / (compute time + communication time)

The link is [hardware] interconnect ("nvlink", "pcie" or "infiniband", from the profile's
[interconnect.*] figures; by default the slowest one the profile gives, since a ring over many
servers is as fast as its slowest hop) or a number, [hardware] interconnect_bandwidth (bytes/s).
[training] batch_tokens is needed (without it nothing is estimated, and the report says so);
[training] gradient_bytes defaults from the scenario's dtype.

What this leaves out, so the share is an upper bound for a pure data-parallel run and not what a
real cluster does: overlap of the allreduce with the backward pass; several rings in parallel (one
per network card: a server with k cards crosses the network k times faster); hierarchical
allreduces that keep most hops on NVLink; latency (a ring of N chips pays 2 (N - 1) message
latencies a step); and model/pipeline parallelism, which GPT-3's real training used (a 175B-parameter
model does not fit one V100), and which shrinks the gradient share each chip must exchange.

The result is a Communication: the Allreduce's figures, or why none could be estimated.
"""

from dataclasses import asdict, dataclass

from minigpt.counting.closed_form import allreduce_bytes
from minigpt.energy import accounting
from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.scale.chips import Chip
from minigpt.scale.footprint import WH_PER_MWH
from minigpt.scale.scenario import Scenario
from minigpt.scale.training import Costs
from minigpt.units import SECONDS_PER_DAY, SECONDS_PER_HOUR

GRADIENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "int8": 2}  # int8 training keeps 16-bit grads
LAYOUT = ("pure data parallel over all chips: a whole model per chip, one ring allreduce of the "
          "gradients per step over one link (the slowest hop), not overlapped with compute")


@dataclass(frozen=True)
class Allreduce:
    """The gradient allreduce of a training run under LAYOUT, beside the run's compute."""

    layout: str
    chips: int
    gradient_bytes: float  # per parameter
    buffer_bytes: float  # gradients per step
    sent_bytes_per_chip_per_step: float
    link_bytes_per_s: float  # each way
    link: str  # which link, and where its figure came from
    seconds_per_step: float
    steps: float
    batch_tokens: float
    days: float  # communication alone
    compute_days: float | None
    chip_hours: float
    energy_mwh: float | None
    co2_tonnes: float | None
    share: float | None  # communication / (compute + communication)
    total_days: float | None
    total_mwh: float | None

    def to_json(self) -> dict:
        return asdict(self)  # the field names are the JSON keys


@dataclass(frozen=True)
class Communication:
    """The allreduce's figures, or (allreduce None) why the scenario lacks what they need."""

    allreduce: Allreduce | None
    why: str | None  # None when estimated

    def to_json(self) -> dict:
        return {"communication": self.allreduce.to_json() if self.allreduce else None,
                "communication_why": self.why}


def _link(scn: Scenario, chip: Chip) -> tuple[float, str]:
    """(bytes/s each way, what it is) for the ring's hops."""
    hw = scn.values["hardware"]
    if "interconnect_bandwidth" in hw:
        where = scn.where("hardware", "interconnect_bandwidth")
        return hw["interconnect_bandwidth"], f"[hardware] interconnect_bandwidth ({where})"
    prof = chip.profile
    name = hw.get("interconnect")
    if name is not None:
        try:
            return profiles.link_bandwidth(prof, name), _describe(prof, name)
        except ConfigError as e:
            raise ConfigError(f"{scn.where('hardware', 'interconnect')}: [hardware] "
                              f"interconnect: {e}") from None
    known = {k: v for k, v in prof.interconnect.items() if v is not None}
    if not known:
        raise ConfigError(f"{scn.where('hardware')}: [hardware] {prof.name} has no interconnect "
                          f"figure; give interconnect_bandwidth (bytes/s each way)")
    slowest = min(known, key=known.get)
    return known[slowest], _describe(prof, slowest) + ", the slowest link the profile gives"


def _describe(prof: profiles.Profile, link: str) -> str:
    return f"{prof.name} {link} (`minigpt hardware {prof.name}` shows its source)"


def communication(scn: Scenario, params: float | None, chip: Chip, s: accounting.Settings,
                  compute: Costs) -> Communication:
    """The allreduce beside a training run's compute (its chip-hours and MWh drawn), or why it
    cannot be estimated (the scenario lacks batch_tokens, tokens, params, a chip count)."""
    t = scn.values.get("training", {})
    name = scn.get("hardware", "interconnect")
    if name is not None and name not in profiles.LINKS:  # checked even when nothing is estimated
        raise ConfigError(f"{scn.where('hardware', 'interconnect')}: [hardware] interconnect "
                          f"must be one of {', '.join(profiles.LINKS)}, not {name!r}")
    if "batch_tokens" not in t:
        return Communication(None, "give [training] batch_tokens (the global batch in tokens) to "
                                   "estimate the gradient allreduce")
    if "tokens" not in t or not params:
        return Communication(None, "the gradient allreduce needs [training] tokens and the "
                                   "model's parameter count")
    N = chip.chips
    if not N or N < 2:
        return Communication(None, "one chip: no allreduce (give [hardware] chips)")
    link, link_is = _link(scn, chip)
    grad_bytes = t.get("gradient_bytes", GRADIENT_BYTES.get(chip.dtype, 4))
    buffer = params * grad_bytes
    sent = allreduce_bytes(float(buffer), N)
    step_s = sent / link
    steps = t["tokens"] / t["batch_tokens"]
    comm_s = steps * step_s
    compute_hours = compute.chip_hours
    compute_s = compute_hours * SECONDS_PER_HOUR / N if compute_hours else None
    chip_hours = comm_s * N / SECONDS_PER_HOUR
    mwh = chip_hours * chip.watts * s.pue / WH_PER_MWH if chip.watts else None
    share = comm_s / (compute_s + comm_s) if compute_s else None
    compute_mwh = compute.footprint.energy_mwh
    return Communication(Allreduce(
        LAYOUT, N, grad_bytes, buffer, sent, link, link_is, step_s, steps, t["batch_tokens"],
        days=comm_s / SECONDS_PER_DAY,
        compute_days=compute_s / SECONDS_PER_DAY if compute_s else None,
        chip_hours=chip_hours, energy_mwh=mwh,
        co2_tonnes=mwh * s.carbon_kg_per_kwh if mwh is not None else None, share=share,
        total_days=(compute_s + comm_s) / SECONDS_PER_DAY if compute_s else None,
        total_mwh=compute_mwh + mwh if compute_mwh and mwh else None), None)
