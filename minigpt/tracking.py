"""What minigpt work cost, from Python: `minigpt.track()` and the typed results it gives.

    with minigpt.track() as t:            # or @minigpt.track() on a function (f.tracker.costs)
        m.generate("def ", max_new_tokens=50, seed=1)
    t.costs      Costs: .flops, .bytes, .seconds, .by("layer" | "op" | "phase" | "scope" | "kind")
                 -> [CostRow], .table(), .to_json()
    t.energy     Energy: .joules, .wh, .basis, the four layers (.measured, .time_x_power,
                 .roofline, .floor), .to_json() (energy.json's schema)

A tracker counts what the meter records inside its block, and measures the block's energy as a
run's is measured (minigpt.hardware.counters around it; minigpt.energy.run_energy.build from the
block's records and wall seconds), so its figures are the ones the commands print for the same
work. How: entering gives the meter a fresh table of records; leaving reads that table, then puts
the outer table back with the block's records added in. Trackers therefore nest (an outer one
sees everything an inner one saw), and work done with no tracker open still lands in
`METER.records`. The meter is one per process: track work from one thread at a time.

Costs, Energy and Estimate (`minigpt.scale`'s result, its JSON keys as attributes) show
themselves in a notebook with the report's inline SVG charts and tables (`_repr_html_`).
"""

import functools
import math
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING

from minigpt import backend, units
from minigpt.counting import tables
from minigpt.counting.meter import METER, Record
from minigpt.errors import ConfigError, MiniGPTError

if TYPE_CHECKING:
    from minigpt.energy.accounting import PowerBasis

# The energy, report and scale modules are imported where they are used, so that `import minigpt`
# (and with it every command) does not load them.

# ---- costs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CostRow:
    """One group of records (a layer, an op, a phase...), summed; joules where the costs carry an
    energy document (metered seconds × watts × PUE, and the roofline's ideal seconds × the same)."""

    name: str
    calls: int
    flops: int
    useful_flops: int
    bytes_read: int
    bytes_written: int
    seconds: float
    joules: float | None = None
    joules_roofline: float | None = None

    @property
    def bytes(self) -> int:
        """Bytes read and written."""
        return self.bytes_read + self.bytes_written

    @property
    def flop_per_byte(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Costs:
    """The meter's records of some work (tables' rows: scope, op, kind, phase, dtype, calls,
    flops, useful_flops, bytes_read, bytes_written, seconds), summed and grouped on demand.
    energy: the work's energy document, when known, for joules per group."""

    rows: tuple[dict, ...]
    tokens: int | None = None
    energy: dict | None = None

    def _sum(self, field: str):
        return sum(r[field] for r in self.rows)

    @property
    def flops(self) -> int:
        return self._sum("flops")

    @property
    def useful_flops(self) -> int:
        return self._sum("useful_flops")

    @property
    def bytes_read(self) -> int:
        return self._sum("bytes_read")

    @property
    def bytes_written(self) -> int:
        return self._sum("bytes_written")

    @property
    def bytes(self) -> int:
        """Bytes read and written, as the cost tables count them."""
        return self.bytes_read + self.bytes_written

    @property
    def seconds(self) -> float:
        """Metered seconds: the sum of the timed operations (less than the wall time)."""
        return self._sum("seconds")

    @property
    def phases(self) -> list[str]:
        return [g.name for g in self.by("phase")]

    def by(self, grouping: str = "layer", phase: str | None = None) -> list[CostRow]:
        """Rows summed by "layer", "scope", "op", "kind" or "phase" (one phase only, when given),
        biggest FLOPs first, as `minigpt costs RUN --by ...` prints them."""
        from minigpt.energy import run_energy

        if grouping not in tables.GROUPINGS:
            raise MiniGPTError(f"by({grouping!r}): group by one of {', '.join(tables.GROUPINGS)}")
        joules_of = run_energy.row_joules(self.energy) if self.energy else None
        return [CostRow(**g) for g in tables.group(list(self.rows), grouping, phase, joules_of)]

    def table(self, by: str = "layer", phase: str | None = None, top: int | None = None) -> str:
        """The fixed-width table `minigpt costs` prints, of these records."""
        groups = [g.to_json() for g in self.by(by, phase)]
        for g in groups:
            if g["joules"] is None:
                del g["joules"], g["joules_roofline"]
        what = f"{phase} phase" if phase else "all phases"
        return tables.format_table(groups, title=f"cost by {by}, {what}", top=top)

    def to_json(self) -> dict:
        """costs.json's schema (records, totals, conventions) with this work's tokens."""
        rows = list(self.rows)
        return {"tokens": self.tokens, "conventions": tables.CONVENTIONS,
                "records": [{k: r[k] for k in tables.FIELDS} for r in rows],
                "totals": tables.totals(rows)}

    def __repr__(self) -> str:
        return (f"Costs({units.si(self.flops, 'FLOP')}, {units.si(self.bytes, 'B')}, "
                f"{self.seconds:.3g} s metered, phases {', '.join(self.phases) or 'none'})")

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        from minigpt.report import html

        cells = "".join(
            f"<tr><td style='text-align:left'>{escape(g.name)}</td><td>{g.calls:,}</td>"
            f"<td>{tables.si(g.flops)}</td><td>{tables.si(g.bytes, 'B')}</td>"
            f"<td>{g.seconds:.4g}</td></tr>" for g in self.by("phase"))
        phases = ("<table><tr><th style='text-align:left'>phase</th><th>calls</th><th>FLOPs</th>"
                  f"<th>bytes</th><th>seconds</th></tr>{cells}</table>")
        head = (f"<p><b>costs</b>: {tables.si(self.flops)}FLOP, {tables.si(self.bytes, 'B')} "
                f"moved, {self.seconds:.4g} s metered</p>")
        return head + phases + html.layer_section(list(self.rows), self.energy, phases=None)


# ---- energy -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnergyLayer:
    """One of the four layers: joules (None where it cannot be given, and `why` says why)."""

    name: str  # measured, time_x_power, roofline, floor
    joules: float | None
    wh: float | None
    gco2e: float | None
    j_per_token: float | None
    why: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Energy:
    """The energy of some work in four layers, from its energy document (energy.json's schema:
    minigpt.energy.run_energy). `joules` is the best figure: the counters' where they were read,
    else time × power at the power figure whose basis `basis` names."""

    doc: dict

    def layer(self, name: str) -> EnergyLayer:
        d = self.doc["layers"][name]
        return EnergyLayer(name, d["joules"], d["wh"], d["gco2e"], d["j_per_token"], d["why"])

    @property
    def layers(self) -> dict[str, EnergyLayer]:
        from minigpt.energy import run_energy

        return {key: self.layer(key) for key in run_energy.LAYER_KEYS.values()}

    measured = property(lambda self: self.layer("measured"))
    time_x_power = property(lambda self: self.layer("time_x_power"))
    roofline = property(lambda self: self.layer("roofline"))
    floor = property(lambda self: self.layer("floor"))

    @property
    def best(self) -> EnergyLayer:
        """The measured layer where counters were read, else time x power."""
        m = self.measured
        return m if m.joules is not None else self.time_x_power

    @property
    def joules(self) -> float | None:
        return self.best.joules

    @property
    def wh(self) -> float | None:
        return self.best.wh

    @property
    def gco2e(self) -> float | None:
        return self.best.gco2e

    @property
    def j_per_token(self) -> float | None:
        return self.best.j_per_token

    @property
    def basis(self) -> "PowerBasis":
        """Where the power figure came from: measured, given, profile, estimated or none."""
        from minigpt.energy.accounting import PowerBasis

        return PowerBasis(self.doc["watts_method"])

    @property
    def basis_note(self) -> str:
        """The power figure's note as the report prints it ("estimated: <CPU>, ...")."""
        return self.doc["watts_basis"]

    @property
    def watts(self) -> float | None:
        return self.doc["watts"]

    @property
    def seconds(self) -> float:
        """Wall seconds of the work."""
        return self.doc["seconds"]

    @property
    def tokens(self) -> int | None:
        return self.doc["tokens"]

    def to_json(self) -> dict:
        """The energy document: energy.json's schema."""
        return dict(self.doc)

    def report(self) -> str:
        """The energy table the commands print."""
        from minigpt.energy import run_energy

        return "\n".join(run_energy.report_lines(self.doc))

    def __repr__(self) -> str:
        j = "none" if self.joules is None else units.si(self.joules, "J")
        return f"Energy({j}, basis {self.basis.value}, {self.seconds:.3g} s)"

    __str__ = report

    def _repr_html_(self) -> str:
        from minigpt.report import html

        return html.energy_section(self.doc, "this work")


# ---- the tracker --------------------------------------------------------------------------------


class _Window:
    """One entry into a tracker: the meter's records around the block, the block's energy
    measurement, its tokens."""

    def __init__(self):
        from minigpt.hardware import counters

        self.around = METER.records
        self.tokens = 0
        self.measuring = counters.measure()
        self.measured = None


_OPEN: list[_Window] = []  # the windows open now, outermost first


def note_tokens(n: int) -> None:
    """Tell every open tracker that n tokens were generated or trained on (for J per token)."""
    for w in _OPEN:
        w.tokens += int(n)


def add_records(into: dict, records: dict) -> None:
    """Add the meter records `records` into the table `into`, key by key (copies, not shared)."""
    for key, r in records.items():
        mine = into.get(key)
        if mine is None:
            mine = into[key] = Record()
        mine.calls += r.calls
        mine.flops += r.flops
        mine.useful_flops += r.useful_flops
        mine.bytes_read += r.bytes_read
        mine.bytes_written += r.bytes_written
        mine.seconds += r.seconds


def check_watts(watts, where: str) -> None:
    """A power figure given by hand: None, or a positive, finite number of watts."""
    if watts is not None and (isinstance(watts, bool) or not isinstance(watts, int | float)
                              or not 0 < watts < math.inf):
        raise ConfigError(f"{where} must be a positive number of watts, got {watts!r}")


class Tracker:
    """`with minigpt.track() as t:` ... then t.costs and t.energy (of the last block the tracker
    ran; entering again starts anew). Blocks nest: an inner block closes before its outer one.
    As a decorator, each call of the function is a block, and the wrapped function carries the
    tracker as `.tracker`.

    hardware: the roofline profile for the energy (default local-cpu on the CPU, none on a GPU);
    watts: a power figure to use where no energy counter was read (as --watts)."""

    def __init__(self, hardware: str | None = None, watts: float | None = None):
        check_watts(watts, "track(watts=...)")
        self.hardware, self.watts = hardware, watts
        self._windows: list[_Window] = []
        self._costs: Costs | None = None
        self._energy: Energy | None = None

    def __enter__(self) -> "Tracker":  # noqa: PYI034 - typing.Self needs Python 3.11
        w = _Window()
        METER.records = {}
        w.measured = w.measuring.__enter__()
        self._windows.append(w)
        _OPEN.append(w)
        return self

    def __exit__(self, *exc) -> bool:
        from minigpt.energy import run_energy

        w = self._windows.pop()
        _OPEN.remove(w)
        w.measuring.__exit__(None, None, None)
        mine = METER.records
        METER.records = w.around
        add_records(w.around, mine)
        rows = tables.rows_from_records(mine)
        on_cpu = backend.device == "cpu"
        hw = self.hardware or ("local-cpu" if on_cpu else None)
        doc = run_energy.build(rows, w.measured.seconds, hw, w.measured, self.watts,
                               w.tokens or None, estimate=on_cpu)
        self._energy = Energy(doc)
        self._costs = Costs(tuple(rows), w.tokens or None, doc)
        return False

    def _result(self, what: str):
        value = getattr(self, f"_{what}")
        if value is None:
            raise MiniGPTError(f"the tracker has not finished a block yet: read .{what} after the "
                               f"`with minigpt.track()` block (or the tracked call) ends")
        return value

    @property
    def costs(self) -> Costs:
        return self._result("costs")

    @property
    def energy(self) -> Energy:
        return self._result("energy")

    def __call__(self, fn):
        @functools.wraps(fn)
        def tracked(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        tracked.tracker = self
        return tracked


def track(fn=None, *, hardware: str | None = None, watts: float | None = None):
    """A Tracker (a context manager and a decorator); `@minigpt.track` bare works too."""
    t = Tracker(hardware, watts)
    return t(fn) if fn is not None else t


# ---- minigpt.scale's result ---------------------------------------------------------------------


class Estimate:
    """`minigpt.scale(...)`'s result: every key of `minigpt scale --format json` is an attribute
    (est.energy_mwh, est.co2_tonnes, est.wh_per_query ...); `.estimate` is the typed
    minigpt.scale.estimate.Estimate it reads, `.table()` the text report."""

    def __init__(self, estimate):
        self.estimate = estimate
        self._json = estimate.to_json()

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_json"][name]
        except KeyError:
            raise AttributeError(f"an Estimate has no figure {name!r} (its keys: "
                                 f"{', '.join(self.__dict__.get('_json', {}))})") from None

    def __dir__(self):
        return [*super().__dir__(), *self._json]

    def to_json(self) -> dict:
        return self.estimate.to_json()

    def table(self) -> str:
        from minigpt.scale import table as scale_table

        return scale_table.format_table(self.estimate)

    def __repr__(self) -> str:
        return f"Estimate({self._json['scenario']!r}: {self._json['hardware']})"

    __str__ = table

    def _repr_html_(self) -> str:
        from minigpt.report import svg

        j = self._json
        shown = [(k, j[k]) for k in ("params", "train_flops_used", "days", "energy_mwh",
                                     "co2_tonnes", "water_m3", "decode_tokens_per_s_ceiling",
                                     "wh_per_query", "co2_g_per_query", "gwh_per_year")
                 if j.get(k) is not None]
        cells = "".join(f"<tr><td style='text-align:left'>{k}</td><td>{v:,.4g}</td></tr>"
                        for k, v in shown)
        charts = []
        for key, title, unit in (("training_layers", "training energy, MWh", "MWh"),
                                 ("inference_layers", "energy per query, Wh", "Wh")):
            layers = {k: v for k, v in (j.get(key) or {}).items() if isinstance(v, int | float)}
            if layers:
                charts.append(svg.bar_chart(list(layers), list(layers.values()), title,
                                            lambda v, u=unit: f"{v:,.4g} {u}", log=True))
        return (f"<p><b>{escape(j['scenario'])}</b>: {escape(j['description'])}<br>"
                f"{escape(j['hardware'])}</p><table>{cells}</table>"
                f"<div style='display:flex;flex-wrap:wrap;gap:12px'>{''.join(charts)}</div>")
