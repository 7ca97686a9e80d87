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
"""

from minigpt.counting.closed_form import allreduce_bytes
from minigpt.counting.tables import si
from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.scale.footprint import WH_PER_MWH
from minigpt.units import SECONDS_PER_DAY, SECONDS_PER_HOUR

GRADIENT_BYTES = {"fp32": 4, "tf32": 4, "fp16": 2, "int8": 2}  # int8 training keeps 16-bit grads
LAYOUT = ("pure data parallel over all chips: a whole model per chip, one ring allreduce of the "
          "gradients per step over one link (the slowest hop), not overlapped with compute")


def _link(scn, chip) -> tuple[float, str]:
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


def _describe(prof, link: str) -> str:
    return f"{prof.name} {link} (`minigpt hardware {prof.name}` shows its source)"


def communication(scn, params: float | None, chip, s, projection: dict) -> dict:
    """The allreduce's share of a training projection (the dict of scale.training.training: its
    chip_hours and energy_mwh are the compute's); {"communication": None, ...} with the reason
    when the scenario lacks what it needs (batch_tokens, tokens, params, a chip count, a link)."""
    t = scn.values.get("training", {})
    name = scn.get("hardware", "interconnect")
    if name is not None and name not in profiles.LINKS:  # checked even when nothing is estimated
        raise ConfigError(f"{scn.where('hardware', 'interconnect')}: [hardware] interconnect "
                          f"must be one of {', '.join(profiles.LINKS)}, not {name!r}")
    if "batch_tokens" not in t:
        return {"communication": None,
                "communication_why": "give [training] batch_tokens (the global batch in tokens) to "
                                     "estimate the gradient allreduce"}
    if "tokens" not in t or not params:
        return {"communication": None,
                "communication_why": "the gradient allreduce needs [training] tokens and the "
                                     "model's parameter count"}
    N = chip.chips
    if not N or N < 2:
        return {"communication": None,
                "communication_why": "one chip: no allreduce (give [hardware] chips)"}
    link, link_is = _link(scn, chip)
    grad_bytes = t.get("gradient_bytes", GRADIENT_BYTES.get(chip.dtype, 4))
    buffer = params * grad_bytes
    sent = allreduce_bytes(float(buffer), N)
    step_s = sent / link
    steps = t["tokens"] / t["batch_tokens"]
    comm_s = steps * step_s
    compute_hours = projection.get("chip_hours")
    compute_s = compute_hours * SECONDS_PER_HOUR / N if compute_hours else None
    chip_hours = comm_s * N / SECONDS_PER_HOUR
    mwh = chip_hours * chip.watts * s.pue / WH_PER_MWH if chip.watts else None
    share = comm_s / (compute_s + comm_s) if compute_s else None
    compute_mwh = projection.get("energy_mwh")
    return {"communication": {
        "layout": LAYOUT, "chips": N, "gradient_bytes": grad_bytes, "buffer_bytes": buffer,
        "sent_bytes_per_chip_per_step": sent, "link_bytes_per_s": link, "link": link_is,
        "seconds_per_step": step_s, "steps": steps, "batch_tokens": t["batch_tokens"],
        "days": comm_s / SECONDS_PER_DAY,
        "compute_days": compute_s / SECONDS_PER_DAY if compute_s else None,
        "chip_hours": chip_hours, "energy_mwh": mwh,
        "co2_tonnes": mwh * s.carbon_kg_per_kwh if mwh is not None else None,
        "share": share,
        "total_days": (compute_s + comm_s) / SECONDS_PER_DAY if compute_s else None,
        "total_mwh": compute_mwh + mwh if compute_mwh and mwh else None},
        "communication_why": None}


def lines(r: dict) -> list[str]:
    """The report's communication rows (for scale_report's training table)."""
    c = r.get("communication")
    if c is None:
        why = r.get("communication_why")
        return [f"  communication: not estimated ({why})"] if why else []

    def row(name: str, value: str, how: str) -> str:
        return f"  {name:<28} {value:>12}  {how}"

    out = [f"communication (gradient allreduce), assuming {c['layout']}:",
           row("gradients per step", si(c["buffer_bytes"], "B"),
               f"params x {c['gradient_bytes']:g} bytes"),
           row("sent per chip per step", si(c["sent_bytes_per_chip_per_step"], "B"),
               f"2 (N-1)/N x gradients, N = {c['chips']:,} (ring; received: as much)"),
           row("link, each way", si(c["link_bytes_per_s"], "B/s"), c["link"]),
           row("seconds per step", f"{c['seconds_per_step']:.4g}", "sent / link"),
           row("steps", f"{c['steps']:,.0f}", f"tokens / batch_tokens ({c['batch_tokens']:.4g})"),
           row("days", f"{c['days']:,.1f}", f"beside {c['compute_days']:,.1f} days of compute"
               if c["compute_days"] is not None else "(compute days: not given)")]
    if c["share"] is not None:
        out.append(row("share of training time", f"{100 * c['share']:.1f}%",
                       "communication / (compute + communication), no overlap"))
    if c["energy_mwh"] is not None:
        out.append(row("energy_mwh", f"{c['energy_mwh']:,.1f}",
                       f"chips x W x PUE while they exchange ({c['co2_tonnes']:,.1f} tCO2e)"))
    if c["total_days"] is not None:
        mwh = f", {c['total_mwh']:,.1f} MWh" if c["total_mwh"] is not None else ""
        out.append(row("with compute", f"{c['total_days']:,.1f}",
                       f"days{mwh} (compute + communication, one after the other)"))
    out.append("  (an upper bound for this layout: overlap with the backward pass, one ring per "
               "network card, NVLink inside servers and model parallelism all shrink it; "
               "docs/costs.md)")
    return out
