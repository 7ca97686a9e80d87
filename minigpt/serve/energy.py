"""The joules of each step the server runs (one prefill, or one batched decode step), on the same
power basis a run's energy.json names (minigpt.energy.accounting.PowerBasis):

- measured   the energy counters' difference over the step (RAPL, NVML), where they can be read;
- given      --watts × the step's wall seconds;
- estimated  the CPU's rated power × the step's busy share (minigpt.hardware.cpu_power) × its
             wall seconds, where nothing is measured.

Each is facility energy: × PUE (the default's source is in profiles/constants.toml), as energy.json's
layers are. A request's share of a batched decode step is one sequence's share of the step: the
step's joules / the sequences in it.
"""

import threading
from contextlib import contextmanager
from dataclasses import dataclass

from minigpt.energy.accounting import PowerBasis, settings
from minigpt.errors import ConfigError
from minigpt.hardware import counters, cpu_power


@dataclass
class StepCost:
    """What one step cost: wall seconds and joules (facility, × PUE)."""

    seconds: float = 0.0
    joules: float = 0.0


class StepEnergy:
    """Joules per step at the best basis this machine gives; read `basis` and `note` for which.

    readers: the energy counters to try (default RAPL and NVML); watts: a given power figure, used
    where no counter can be read."""

    def __init__(self, watts: float | None = None, readers: list | None = None,
                 pue: float | None = None):
        if watts is not None and not watts > 0:
            raise ConfigError(f"--watts must be > 0, got {watts!r}")
        readers = counters.default_readers() if readers is None else list(readers)
        self.readers = [r for r in readers if r.available()]
        self.watts = watts
        self.pue = settings().pue if pue is None else pue
        self.cpu_model = cpu_power.cpu_model()
        self.lock = threading.Lock()  # the counters are read by one step at a time
        if self.readers:
            self.basis = PowerBasis.MEASURED
            self.note = "measured: " + ", ".join(r.name for r in self.readers)
        elif watts is not None:
            self.basis, self.note = PowerBasis.GIVEN, f"--watts {watts:g}"
        else:
            self.basis = PowerBasis.ESTIMATED
            # the estimate's sentence without its last part, the busy cores, which vary by step
            self.note = cpu_power.estimate(1.0, 1.0, self.cpu_model).basis.rsplit(", ", 1)[0]

    def _counters(self) -> float | None:
        try:
            return sum(r.read_joules() for r in self.readers)
        except (OSError, ValueError):
            return None

    def keep_counting(self) -> None:
        """Read the counters while idle, so none wraps twice unseen (counters.SAMPLE_INTERVAL_S)."""
        if self.readers:
            with self.lock:
                self._counters()

    @contextmanager
    def step(self):
        """Time the block and fill a StepCost with its joules on exit."""
        cost = StepCost()
        with self.lock:
            start = self._counters() if self.readers else None
            wall0, cpu0 = cpu_power.usage_now()
            yield cost
            wall1, cpu1 = cpu_power.usage_now()
            end = self._counters() if start is not None else None
        cost.seconds = wall1 - wall0
        if start is not None and end is not None:
            cost.joules = (end - start) * self.pue
        elif self.watts is not None:
            cost.joules = self.watts * cost.seconds * self.pue
        else:
            est = cpu_power.estimate(cpu1 - cpu0, cost.seconds, self.cpu_model)
            cost.joules = est.watts * cost.seconds * self.pue
