"""`minigpt scale`: a scenario's whole estimate, typed, and its JSON.

The top of the scale package: it takes a checked scenario down the one way (work: the FLOPs;
training: chip-hours; chips: hardware and power; footprint: energy, carbon, water), each part
computed from its own inputs and the parts it needs, and puts them in one Estimate. scale.table
formats it; Estimate.to_json() is the JSON `minigpt scale --format json` prints:

    scenario, description, path, params, active_params, params_closed_form,
    active_params_closed_form                           the scenario and the model's size
    hardware, dtype, power, power_basis, watts_per_chip  Chip.to_json()
    train_tokens ... train_flops_used_is, chip_hours, days, flops_per_chip, mfu, energy_it_mwh,
    energy_mwh, co2_tonnes, co2_net_tonnes, water_onsite_m3, water_offsite_m3, water_m3,
    households_year, chip_hours_is, flops_per_chip_is, training_layers, sensitivity
                                                        Training.to_json()
    communication, communication_why                    Communication.to_json()
    inference_chips, batch, weight_bits, kv_bits, weight_bytes, kv_bytes_per_token,
    decode_bytes_per_token, decode_flops_per_token, prefill_s_per_token, decode_s_per_token,
    decode_tokens_per_s_ceiling, weights_only_tokens_per_s, flops_per_query, wh_per_query,
    wh_per_query_basis (wh_per_query_is: the same), wh_per_query_roofline,
    wh_per_query_compute, wh_per_query_throughput, throughput, wh_per_query_boundaries,
    wh_per_query_boundaries_split, serving_mfu, gwh_per_year, fits_in_memory, fit_note,
    inference_layers, wh_it_per_query, co2_g_per_query, co2_net_g_per_query,
    water_onsite_ml_per_query, water_offsite_ml_per_query, water_ml_per_query
                                                        Serving.to_json()
    breakeven_days, breakeven_training_mwh, breakeven_training_mwh_is, inference_mwh_per_day
                                                        per_query.Breakeven.to_json()
    this_machine, measured (what rests on measurement), assumptions (each value with where it
    came from), published (the source's figures beside ours), published_source, notes

TRAINING_KEYS, INFERENCE_KEYS and per_query.BREAKEVEN_KEYS are always present: None ("not given"
in the table) where the scenario lacks the part or its inputs cannot give the figure.
"""

from dataclasses import asdict, dataclass

from minigpt.energy import accounting
from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.scale import chips, communication, footprint, per_query, serving, training, work
from minigpt.scale.communication import Communication
from minigpt.scale.per_query import BREAKEVEN_KEYS, Breakeven
from minigpt.scale.scenario import Scenario, training_work_given
from minigpt.scale.serving import Serving
from minigpt.scale.training import Training
from minigpt.units import SECONDS_PER_DAY

SECONDS_PER_YEAR = 365.25 * SECONDS_PER_DAY  # the Julian year
TRAINING_KEYS = ("train_tokens", "train_flops", "train_flops_6nd", "train_flops_published",
                 "train_flops_used", "chip_hours", "days", "flops_per_chip", "mfu",
                 "energy_it_mwh", "energy_mwh", "co2_tonnes", "co2_net_tonnes", "water_onsite_m3",
                 "water_offsite_m3", "water_m3", "households_year")
INFERENCE_KEYS = ("weight_bytes", "kv_bytes_per_token", "prefill_s_per_token", "decode_s_per_token",
                  "decode_tokens_per_s_ceiling", "wh_per_query", "wh_per_query_basis",
                  "wh_per_query_boundaries", "water_ml_per_query", "gwh_per_year")


@dataclass(frozen=True)
class ThisMachine:
    """This machine's measured fp32 matmul rate, and the years the training's FLOPs take at it."""

    flops_per_s: float
    source: str
    years: float | None

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Assumption:
    """One parameter the estimate used: "section.key", its value, and where it came from."""

    field: str
    value: object
    origin: str

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PublishedRow:
    """A figure the scenario's source publishes beside ours (an output key of to_json)."""

    key: str
    published: float
    ours: float | None
    difference: float | None  # ours / published - 1

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    """The whole estimate of a scenario: its parts (None where the scenario lacks one)."""

    scenario: str
    description: str
    path: str | None
    params: float | None
    active_params: float | None
    params_closed_form: int | None  # our architecture's count, beside a stated one
    active_params_closed_form: int | None
    chip: chips.Chip
    settings: accounting.Settings
    training: Training | None
    communication: Communication | None  # with training only
    serving: Serving | None
    breakeven: Breakeven | None  # with a training energy and queries a day
    this_machine: ThisMachine | None
    measured: tuple[str, ...]
    assumptions: tuple[Assumption, ...]
    published: tuple[PublishedRow, ...]
    published_source: str
    notes: tuple[str, ...]

    def to_json(self) -> dict:
        """The JSON of `minigpt scale --format json` (the keys in the module docstring)."""
        out = {"scenario": self.scenario, "description": self.description, "path": self.path,
               "params": self.params, "active_params": self.active_params,
               "params_closed_form": self.params_closed_form,
               "active_params_closed_form": self.active_params_closed_form} | self.chip.to_json()
        out |= dict.fromkeys(TRAINING_KEYS + INFERENCE_KEYS + BREAKEVEN_KEYS)
        for part in (self.training, self.communication, self.serving, self.breakeven):
            if part is not None:
                out |= part.to_json()
        return out | {
            "this_machine": self.this_machine.to_json() if self.this_machine else None,
            "measured": list(self.measured), "assumptions": [a.to_json() for a in self.assumptions],
            "published": [p.to_json() for p in self.published],
            "published_source": self.published_source, "notes": list(self.notes)}


def this_machine(flops: float | None) -> ThisMachine | None:
    """This machine's measured fp32 matmul FLOP/s (local-cpu profile) and the years `flops` take."""
    try:
        prof = profiles.load_profile("local-cpu")
        rate = profiles.peak(prof, "fp32")
    except ConfigError:
        return None
    return ThisMachine(rate, prof.sources.get("peak_flops.fp32", ""),
                       flops / rate / SECONDS_PER_YEAR if flops else None)


def _assumptions(scn: Scenario, chip: chips.Chip, s: accounting.Settings) -> list[Assumption]:
    """Every parameter the estimate used: its value and where it came from."""
    out = [Assumption(f"{sec}.{k}", v, scn.where(sec, k))
           for sec, table in scn.values.items() for k, v in table.items()]
    given = {a.field for a in out}
    hw = "hardware."

    def default(name: str, value, origin: str) -> None:
        if name not in given:
            out.append(Assumption(name, value, f"default: {origin}"))

    default(hw + "dtype", chip.dtype, "fp16 (mixed-precision) peak: an assumption")
    default(hw + "power_basis", chip.basis, "the accelerator's rated power (\"chip\")")
    default(hw + "watts_per_chip", chip.rating, chip.power_source)
    default(hw + "power_fraction", chip.power_fraction, "1: draw at the full rating")
    if scn.has("inference"):
        default(hw + "memory_bandwidth", chip.bandwidth, f"{chip.profile.name} memory_bandwidth "
                f"({chip.profile.sources.get('memory_bandwidth', '')})")
        from_speed = scn.get("inference", "tokens_per_s") is not None
        if from_speed and scn.get("inference", "chips") is None:
            default("inference.chips", per_query.throughput_chips(scn),
                    "the throughput form: [hardware] chips, else 1")
            given.add("inference.chips")
        for k, v in serving.DEFAULTS.items():
            default(f"inference.{k}", v, "an assumption")
    if scn.get("inference", "tokens_per_s") is not None:  # the throughput form's defaults
        default("inference.latency_s", 0.0, "no time to the first token")
        default(hw + "accelerator_utilization", 1.0, "the accelerators' whole power")
        default(hw + "host_watts", 0.0, "no host counted")
        if "hardware.host_watts" in given:
            default(hw + "host_utilization", 1.0, "the host's whole power")
    for k in footprint.SETTING_KEYS:
        if not (k == "water_onsite_l_per_kwh" and hw + "water_l_per_kwh" in given):
            default(hw + k, getattr(s, k), s.origins[k].removeprefix("default: "))
    return out


def _notes(scn: Scenario, a: work.Arch | None, serve: Serving | None,
           s: accounting.Settings) -> list[str]:
    """What a reader of the figures should know: a basis stated, a floor passed, a part left out."""
    notes = []
    if serve is not None:
        notes += [serve.fit_note] if serve.fit_note else []
        if serve.wh_per_query_basis == "stated":
            notes.append("wh_per_query: the scenario's stated figure, not a computed one")
        floor = serve.roofline.floor_wh_per_query if serve.roofline else None
        if serve.wh_per_query_basis == "compute-bound" and floor and floor > serve.wh_per_query:
            notes.append(f"the compute-bound Wh per query is below the bytes floor of batch "
                         f"{serve.roofline.batch} ({floor:.3g} Wh): it assumes the weight reads "
                         f"are shared by a larger batch (try --set inference.batch=64)")
    if s.water_onsite_l_per_kwh is None and s.water_offsite_l_per_kwh is None:
        notes.append("water: not estimated (give hardware.water_onsite_l_per_kwh or "
                     "water_offsite_l_per_kwh)")
    m = scn.values.get("model", {})
    if a and "d_head" in m and m["d_head"] * a.n_head != a.n_embd:
        notes.append(f"n_head × d_head = {a.n_head * m['d_head']} ≠ n_embd = {a.n_embd}: our "
                     f"blocks split n_embd across the heads, so attention is counted at n_embd")
    if a and a.n_experts > 1:
        notes.append("mixture of experts: counted by the closed form that predicts our trained "
                     "MoE (nn/moe.py) exactly, here under balanced routing; decode reads every "
                     "expert some token of the batch picks, under uniform routing")
    return notes


def _measured(machine: ThisMachine | None) -> tuple[str, ...]:
    here = (f"this machine's float32 matmul: {machine.flops_per_s / 1e9:,.1f} GFLOP/s "
            f"({machine.source})" if machine else
            "this machine's FLOP/s: not calibrated here (run `minigpt calibrate`)")
    return (("closed-form FLOP counts: equal to the meter's counts of the same model on this "
             "machine (tests/test_costs.py, tests/test_scaling.py)"), here,
            "per-chip figures marked as measured in the scenario's comments (e.g. Patterson's)")


def _published(scn: Scenario, train: Training | None, serve: Serving | None,
               even: Breakeven | None) -> list[PublishedRow]:
    """The source's figures beside ours: [published] names output keys of the parts' JSON."""
    ours = {}
    for part in (train, serve, even):
        ours |= part.to_json() if part else {}
    return [PublishedRow(k, v, ours.get(k),
                         ours[k] / v - 1 if ours.get(k) is not None else None)
            for k, v in scn.published.items()]


def estimate(scn: Scenario) -> Estimate:
    """The whole estimate of a checked scenario (see the module docstring for its JSON)."""
    a, chip, s = work.arch_of(scn), chips.chip_of(scn), footprint.settings_of(scn)
    params, active, computed = work.model_size(scn)
    train = comm = serve = None
    if training_work_given(scn):
        train = training.training(scn, a, active, chip, s)
        comm = communication.communication(scn, params, chip, s, train.costs)
    if scn.has("inference"):
        serve = serving.inference(scn, a, params, active, chip, s)
    even = per_query.breakeven(scn, train.costs.footprint.energy_mwh if train else None,
                               serve.wh_per_query if serve else None)
    notes = _notes(scn, a, serve, s)
    machine = this_machine(train.flops.used if train else None)
    return Estimate(
        scn.name, scn.description, str(scn.path) if scn.path else None, params, active,
        computed[0] if computed else None, computed[1] if computed else None, chip, s,
        train, comm, serve, even, machine, _measured(machine),
        tuple(_assumptions(scn, chip, s)), tuple(_published(scn, train, serve, even)),
        scn.published_source, tuple(notes))
