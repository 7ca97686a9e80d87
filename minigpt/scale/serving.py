"""Serving a scenario's model: weight bytes, KV cache, and roofline ceilings on time and energy.

A query is prompt_tokens of prefill and output_tokens of decode, `batch` queries at a time, on
`chips` chips of the scenario's profile (their bandwidth, peak and power add up: an ideal split).

    weight bytes          params × weight_bits / 8              (every expert is resident)
    KV bytes per token    2 × n_layer × n_embd × kv_bits / 8    (K and V, every layer; our blocks
                                                                 have one KV head per query head)
    decode, per token     bytes = weights read per step / batch + KV bytes × context
                          FLOPs = one forward of one token at that context (our closed form)
                          seconds = max(bytes / bandwidth, FLOPs / peak)
    prefill, per token    the same for a prompt of prompt_tokens, the weights read once
    Wh per query          (prompt × prefill s + output × decode s) × chips × W × PUE / 3600

Energy per query has four bases, reported as wh_per_query_basis, the first that applies:

    stated          [inference] wh_per_query (a published figure; the workload keys then optional)
    throughput      [inference] tokens_per_s given: from observed speed, Jegham et al.'s form
                    (minigpt.scale.per_query; needs no model)
    compute-bound   [inference] mfu given: FLOPs per query / (peak × mfu) × W × PUE / 3600, FLOPs
                    per query = 2 × active params × (prompt + output tokens) for a stated count,
                    our closed form (prefill + decode forwards) for an architecture (Epoch AI's way)
    roofline        otherwise: the bandwidth/compute roofline above (a lower bound)

W is the chip's watts × power_fraction on its power basis (minigpt.scale.chips). Water and carbon per
query follow from Wh (minigpt.scale.footprint.per_query): mL = IT Wh × WUE + Wh × EWIF.

The decode context is the mean over the output: prompt_tokens + output_tokens / 2. The ceiling is
1 / decode seconds per token, over all the batch's streams: at batch 1 the memory-bound speed of
one stream. Beside it, the popular form: weights alone (no KV cache), batch × bandwidth / bytes.
Real serving is slower (kernels short of peak, idle chips): these are lower bounds on time and
energy.

The result is a Serving: energy per query and its footprint, the Wh inside each boundary
(accelerator, host, idle, overhead: per_query.boundaries), the throughput form where given, and,
for a model (not a stated or throughput figure alone), the Roofline's bytes, FLOPs and seconds. A
stated figure needs no watts: then a profile without a rated power leaves the roofline's Wh out.
"""

from dataclasses import dataclass

from minigpt import units
from minigpt.energy import accounting
from minigpt.errors import ConfigError
from minigpt.hardware.roofline import decode_ceiling
from minigpt.scale import footprint, per_query
from minigpt.scale.chips import FLOOR_ENERGY_OF_PEAK, Chip
from minigpt.scale.footprint import QueryFootprint
from minigpt.scale.per_query import Boundaries, Throughput
from minigpt.scale.scenario import Scenario
from minigpt.scale.work import Arch, forward_flops, kv_bytes_per_token, weights_read

DEFAULTS = {"batch": 1, "weight_bits": 16, "kv_bits": 16, "chips": 1}


@dataclass(frozen=True)
class Roofline:
    """A modelled query on the ideal machine: bytes, FLOPs and seconds per token, and the floor."""

    batch: int
    weight_bits: int
    kv_bits: int
    weight_bytes: float
    kv_bytes_per_token: float | None  # None without an architecture
    decode_bytes_per_token: float
    decode_flops_per_token: float
    prefill_s_per_token: float
    decode_s_per_token: float
    decode_tokens_per_s_ceiling: float  # all the batch's streams
    weights_only_tokens_per_s: float  # the popular form: weights alone, no KV cache
    flops_per_query: float
    serving_mfu: float | None  # [inference] mfu, for the compute-bound Wh
    floor_wh_per_query: float  # FLOPs × pJ + bytes × DRAM pJ, no PUE


@dataclass(frozen=True)
class Serving:
    """Energy per query on its basis ("stated", "throughput", "compute-bound" or "roofline"), the
    others beside it, its boundaries and footprint, and the modelled query (roofline None: a stated
    or throughput Wh with no model)."""

    chips: int | None
    wh_per_query: float
    wh_per_query_basis: str
    wh_per_query_roofline: float | None  # None: no model, or no watts beside a stated figure
    wh_per_query_compute: float | None
    gwh_per_year: float | None  # None without queries_per_day
    fits_in_memory: bool | None  # None: not checked
    fit_note: str
    per_query: QueryFootprint
    roofline: Roofline | None
    throughput: Throughput | None
    boundaries: Boundaries

    def to_json(self) -> dict:
        energy = {"wh_per_query": self.wh_per_query, "wh_per_query_basis": self.wh_per_query_basis,
                  "wh_per_query_is": self.wh_per_query_basis,
                  "wh_per_query_roofline": self.wh_per_query_roofline,
                  "wh_per_query_compute": self.wh_per_query_compute,
                  "wh_per_query_throughput": self.throughput.wh_per_query if self.throughput
                  else None,
                  "throughput": self.throughput.to_json() if self.throughput else None,
                  "wh_per_query_boundaries": self.boundaries.to_json(),
                  "wh_per_query_boundaries_split": self.boundaries.split}
        r = self.roofline
        if r is None:
            return energy | {"gwh_per_year": self.gwh_per_year, "inference_chips": self.chips,
                             "fits_in_memory": self.fits_in_memory, "fit_note": self.fit_note
                             } | self.per_query.to_json()
        return {
            "inference_chips": self.chips, "batch": r.batch, "weight_bits": r.weight_bits,
            "kv_bits": r.kv_bits, "weight_bytes": r.weight_bytes,
            "kv_bytes_per_token": r.kv_bytes_per_token,
            "decode_bytes_per_token": r.decode_bytes_per_token,
            "decode_flops_per_token": r.decode_flops_per_token,
            "prefill_s_per_token": r.prefill_s_per_token,
            "decode_s_per_token": r.decode_s_per_token,
            "decode_tokens_per_s_ceiling": r.decode_tokens_per_s_ceiling,
            "weights_only_tokens_per_s": r.weights_only_tokens_per_s,
            "flops_per_query": r.flops_per_query, **energy, "serving_mfu": r.serving_mfu,
            "gwh_per_year": self.gwh_per_year, "fits_in_memory": self.fits_in_memory,
            "fit_note": self.fit_note,
            "inference_layers": {"measured": None,
                                 "roofline_wh_per_query": self.wh_per_query_roofline,
                                 "floor_wh_per_query": r.floor_wh_per_query},
        } | self.per_query.to_json()


def _per_token_seconds(nbytes: float, flops: float, chip: Chip, n: int) -> float:
    """max(bytes / bandwidth, FLOPs / peak) over n chips; the compute term needs a known peak."""
    memory = nbytes / (n * chip.bandwidth)
    return max(memory, flops / (n * chip.peak)) if chip.peak else memory


def _fit(weight_bytes: float, kv_bytes: float, chip: Chip, n: int) -> tuple[bool | None, str]:
    have = chip.profile.memory_bytes
    if have is None:
        return None, f"{chip.profile.name}'s memory size is unknown: fit not checked"
    need = weight_bytes + kv_bytes
    if need <= n * have:
        return True, ""
    least = int(-(-need // have))
    return False, (f"weights + KV cache ({need / 1e9:,.0f} GB) exceed {n} × {have / 1e9:g} GB of "
                   f"{chip.profile.name} memory: needs at least {least} chips "
                   f"(--set inference.chips={least}) or fewer bits")


def _serving(scn: Scenario, chip: Chip, s: accounting.Settings, wh: float, basis: str,
             tp: Throughput | None, chips: int | None, wh_roofline: float | None = None,
             wh_compute: float | None = None, fits: bool | None = None, fit_note: str = "",
             roofline: Roofline | None = None) -> Serving:
    """A Serving of Wh on its basis: the fleet's GWh, the boundaries and the footprint added."""
    return Serving(chips, wh, basis, wh_roofline, wh_compute,
                   per_query.gwh_per_year(wh, scn.get("inference", "queries_per_day")), fits,
                   fit_note, footprint.per_query(wh, s), roofline, tp,
                   per_query.boundaries(scn, wh, basis, chip, tp, s))


def _without_model(scn: Scenario, chip: Chip, s: accounting.Settings,
                   tp: Throughput | None) -> Serving:
    """A stated or throughput Wh per query with no model: no bytes, no roofline."""
    stated = scn.get("inference", "wh_per_query")
    if stated is not None:
        return _serving(scn, chip, s, stated, "stated", tp, scn.get("inference", "chips"))
    return _serving(scn, chip, s, tp.wh_per_query, "throughput", tp, tp.chips)


def _per_query_wh(scn: Scenario, chip: Chip, flops_q: float, wh_roofline: float | None,
                  tp: Throughput | None, s: accounting.Settings
                  ) -> tuple[float, str, float | None]:
    """(Wh per query, its basis, the compute-bound Wh or None) by the rule in the docstring."""
    mfu = scn.get("inference", "mfu")
    compute = (units.wh(flops_q / (chip.peak * mfu) * chip.watts * s.pue)
               if mfu is not None and chip.watts is not None else None)  # chip-s × W × PUE, Wh
    stated = scn.get("inference", "wh_per_query")
    if stated is not None:
        return stated, "stated", compute
    if tp is not None:
        return tp.wh_per_query, "throughput", compute
    if compute is not None:
        return compute, "compute-bound", compute
    return wh_roofline, "roofline", compute


def inference(scn: Scenario, a: Arch | None, params: float, active: float, chip: Chip,
              s: accounting.Settings) -> Serving:
    """The serving figures of scn's [inference] on chip."""
    get = scn.values["inference"].get
    tp = per_query.throughput(scn, chip, s)
    stated = get("wh_per_query") is not None
    if params is None or get("output_tokens") is None or (stated and chip.bandwidth is None):
        return _without_model(scn, chip, s, tp)
    P, O = get("prompt_tokens", 0), get("output_tokens")
    b, wbits, kvbits, n = (get(k, DEFAULTS[k]) for k in DEFAULTS)  # batch, bits, bits, chips
    if chip.bandwidth is None:
        raise ConfigError(f"{scn.where('hardware')}: [hardware] memory_bandwidth: needed for "
                          f"inference ({chip.profile.name} has no bandwidth figure)")
    weight_bytes = params * wbits / 8  # bytes
    kv_tok = kv_bytes_per_token(a, kvbits) if a else 0.0  # bytes per token of context
    ctx = P + O / 2  # mean context while decoding, tokens
    step_bytes = weights_read(a, params, active, b) * wbits / 8  # one decode step, bytes
    dec_bytes = step_bytes / b + kv_tok * ctx  # per generated token, bytes
    dec_flops = forward_flops(a, 1, 1, pos0=round(ctx)) if a else 2 * active  # FLOPs per token
    decode_s = _per_token_seconds(dec_bytes, dec_flops, chip, n)
    if P:
        pre_bytes = weights_read(a, params, active, b * P) * wbits / 8 / (b * P) + kv_tok
        pre_flops = forward_flops(a, 1, P, last_only=True) / P if a else 2 * active
        prefill_s = _per_token_seconds(pre_bytes, pre_flops, chip, n)
    else:
        pre_bytes = pre_flops = prefill_s = 0.0
    query_s = P * prefill_s + O * decode_s  # chip-group seconds per query (share of a batch)
    wh_roofline = (units.wh(query_s * n * chip.watts * s.pue) if chip.watts is not None
                   else None)  # no watts: only beside a stated figure
    flops_q = P * pre_flops + O * dec_flops if a else 2 * active * (P + O)  # FLOPs per query
    wh, basis, wh_compute = _per_query_wh(scn, chip, flops_q, wh_roofline, tp, s)
    floor_j = ((P * pre_flops + O * dec_flops) * s.pj_per_flop[FLOOR_ENERGY_OF_PEAK[chip.dtype]]
               + (P * pre_bytes + O * dec_bytes) * s.pj_per_byte) * units.PJ
    fits, fit_note = _fit(weight_bytes, kv_tok * b * (P + O), chip, n)
    return _serving(scn, chip, s, wh, basis, tp, n, wh_roofline, wh_compute, fits, fit_note,
                    Roofline(b, wbits, kvbits, weight_bytes, kv_tok if a else None, dec_bytes,
                             dec_flops, prefill_s, decode_s, 1 / decode_s,
                             b * decode_ceiling(step_bytes, n * chip.bandwidth), flops_q,
                             get("mfu"), units.wh(floor_j)))
