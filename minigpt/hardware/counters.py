"""Measured energy: the counters a machine exposes, read around a block of work, never made up.

Two readers, each with `name`, `available()` (False with `reason` saying why) and `read_joules()`
(raises OSError when the counter cannot be read):

- RaplReader: Linux powercap, /sys/class/powercap/intel-rapl:N/energy_uj (also used for AMD CPUs).
  It adds the top-level *package* domains and every *dram* domain (a top-level one, or a package's
  subdomain named "dram": RAPL meters DRAM separately from the package, so the two add up without
  overlap). It never adds the other subdomains (core, uncore: parts of a package) nor "psys" (the
  whole platform, which contains the packages), nor intel-rapl-mmio:* (the same package counter
  seen through MMIO on some laptops): any of them would count energy twice. Each counter
  wraps at its max_energy_range_uj; `read_joules` keeps a running total from the reader's first
  read, right as long as it is read at least once per wrap, which `measure` ensures by reading
  every counter from a small background thread every `interval` seconds (a wrap takes minutes
  even on a big server at full load). Since Linux 5.10 energy_uj is readable by root only; the
  reason then says so, with the command that grants read access.
- NvmlReader: NVIDIA's nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded,
  Volta or later) for every GPU or one index, through pynvml (pip install nvidia-ml-py), imported
  only when asked.

    with measure() as m:          # or measure([RaplReader(), NvmlReader(0)], interval=10)
        work()
    m.joules   {"rapl": 812.4, "nvml": None}    m.seconds   m.cpu_seconds   m.describe()

A reader that is not available gives None and its reason; with none available, `describe()` says
"not measured here". The Measurement also records the process's CPU seconds, from which
minigpt.hardware.cpu_power estimates power where nothing was measured. These are CPU-package, DRAM
and GPU counters: not fans, disks or the power supply.
"""

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from minigpt.hardware import cpu_power

NOT_MEASURED = "not measured here"
UJ_PER_J = 1e6  # RAPL's energy_uj counts microjoules
MJ_PER_J = 1e3  # NVML's total energy counts millijoules
SAMPLE_INTERVAL_S = 10.0  # how often `measure` reads every counter, far below a wrap's minutes


class EnergyReader(Protocol):
    name: str
    reason: str

    def available(self) -> bool: ...

    def read_joules(self) -> float: ...


def wrapped_delta(start: int, end: int, max_range: int) -> int:
    """Ticks from `start` to `end` on a counter that wraps to 0 after `max_range` (at most once)."""
    if end >= start:
        return end - start
    if max_range <= 0:
        raise ValueError(f"counter went backwards ({start} -> {end}) with no wrap range")
    return max_range - start + end


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


class RaplReader:
    """CPU package energy from Linux powercap (intel-rapl); see the module docstring."""

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        self.root = Path(root)
        self.name = "rapl"
        self.reason = ""
        self._ranges: dict[Path, int] = {}
        self._last: dict[Path, int] = {}
        self._total_uj = 0
        self._lock = threading.Lock()  # `measure`'s sampling thread reads too

    def domains(self) -> list[Path]:
        """Package domains (intel-rapl:0, :1 ...) and DRAM domains (top-level or a package's
        subdomain named dram), sorted; never core/uncore subdomains or psys."""
        if not self.root.is_dir():
            return []
        found = []
        for d in sorted(self.root.glob("intel-rapl:*")):
            depth = d.name.count(":")  # 1: top level, 2: a package's subdomain
            try:
                label = (d / "name").read_text().strip()
            except OSError:
                continue
            if (depth == 1 and label.startswith(("package", "dram"))) or (depth == 2 and
                                                                           label == "dram"):
                found.append(d)
        return found

    def available(self) -> bool:
        domains = self.domains()
        if not domains:
            self.reason = f"no RAPL package domains under {self.root}"
            return False
        for d in domains:
            try:
                _read_int(d / "energy_uj")
                self._ranges[d] = _read_int(d / "max_energy_range_uj")
            except PermissionError:
                self.reason = (f"RAPL counters exist but {d}/energy_uj is readable by root only "
                               f"(Linux 5.10+); to grant read access until the next reboot: sudo "
                               f"chmod a+r {self.root}/intel-rapl:*/energy_uj")
                return False
            except (OSError, ValueError) as e:
                self.reason = f"cannot read {d}: {e}"
                return False
        self.reason = ""
        return True

    def read_joules(self) -> float:
        """Joules used by all packages since this reader's first read, wraparounds included."""
        if not self._ranges and not self.available():
            raise OSError(self.reason)
        with self._lock:
            for d, max_range in self._ranges.items():
                now = _read_int(d / "energy_uj")
                if d in self._last:
                    self._total_uj += wrapped_delta(self._last[d], now, max_range)
                self._last[d] = now
            return self._total_uj / UJ_PER_J


class NvmlReader:
    """GPU energy from NVML's total-energy counter, for all GPUs or one index."""

    def __init__(self, index: int | None = None):
        self.index = index
        self.name = "nvml" if index is None else f"nvml:{index}"
        self.reason = ""
        self._nvml = None
        self._handles: list = []
        self._error: type[Exception] = OSError

    def _open(self) -> None:
        if self._nvml is not None:
            return
        import pynvml  # lazily: nvidia-ml-py is an optional dependency

        self._error = getattr(pynvml, "NVMLError", OSError)
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if self.index is not None and not 0 <= self.index < count:
                raise OSError(f"no GPU {self.index} (NVML sees {count})")
            indices = range(count) if self.index is None else [self.index]
            if not indices:
                raise OSError("NVML sees no GPU")
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        except self._error as e:  # no driver, no library, no such GPU
            raise OSError(f"NVML: {e}") from e
        self._nvml = pynvml

    def available(self) -> bool:
        try:
            self._open()
            self.read_joules()
        except ImportError:
            self.reason = "pynvml is not installed (pip install nvidia-ml-py)"
            return False
        except OSError as e:  # no driver, no GPU, counter not supported (before Volta)
            self.reason = str(e)
            return False
        self.reason = ""
        return True

    def read_joules(self) -> float:
        """Joules since the driver loaded, summed over this reader's GPUs; OSError if unreadable."""
        self._open()
        try:
            total_mj = sum(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles)
        except self._error as e:
            raise OSError(f"NVML: {e}") from e
        return total_mj / MJ_PER_J


def default_readers() -> list[EnergyReader]:
    """RAPL for the CPU packages and NVML for every GPU."""
    return [RaplReader(), NvmlReader()]


@dataclass
class Measurement:
    """What `measure` saw: joules per reader (None where not measured, with a reason), seconds."""

    joules: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float | None = None  # this process's (and its children's) CPU time, s
    samples: int = 0  # reads of every counter by the sampling thread, besides the first and last

    @property
    def measured(self) -> bool:
        return any(j is not None for j in self.joules.values())

    @property
    def total_joules(self) -> float | None:
        """Sum over the readers that measured (CPU packages + GPUs), or None if none did."""
        got = [j for j in self.joules.values() if j is not None]
        return sum(got) if got else None

    def describe(self) -> str:
        why = "; ".join(f"{n}: {r}" for n, r in self.reasons.items()) or "no energy readers"
        if not self.measured:
            return f"energy: {NOT_MEASURED} ({why})"
        parts = [f"{n} {j:.3g} J" if j is not None else f"{n} {NOT_MEASURED} ({self.reasons[n]})"
                 for n, j in self.joules.items()]
        watts = self.total_joules / self.seconds if self.seconds > 0 else 0.0
        return f"energy over {self.seconds:.3g} s: " + ", ".join(parts) + f" (mean {watts:.3g} W)"


class _Sampler(threading.Thread):
    """Reads every started counter every `interval` seconds until stopped, so that none wraps
    twice between two reads (a reader keeps its own running total)."""

    def __init__(self, readers: list[EnergyReader], interval: float, m: Measurement):
        super().__init__(name="minigpt-energy-sampler", daemon=True)
        self.readers, self.interval, self.m = readers, interval, m
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            for r in self.readers:
                try:
                    r.read_joules()
                except (OSError, ValueError):
                    pass  # the final read reports it
            self.m.samples += 1


@contextmanager
def measure(readers: list[EnergyReader] | None = None,
            interval: float = SAMPLE_INTERVAL_S) -> Iterator[Measurement]:
    """Read each available counter before and after the block, and every `interval` seconds in
    between (a background thread); fill the Measurement, CPU seconds included, on exit."""
    readers = default_readers() if readers is None else list(readers)
    m = Measurement()
    started = []
    for r in readers:
        m.joules[r.name] = None
        if not r.available():
            m.reasons[r.name] = r.reason
            continue
        try:
            started.append((r, r.read_joules()))
        except (OSError, ValueError) as e:  # a counter that vanished after the check
            m.reasons[r.name] = f"read failed: {e}"
    sampler = _Sampler([r for r, _ in started], interval, m) if started else None
    if sampler is not None:
        sampler.start()
    wall0, cpu0 = cpu_power.usage_now()
    try:
        yield m
    finally:
        wall1, cpu1 = cpu_power.usage_now()
        m.seconds, m.cpu_seconds = wall1 - wall0, cpu1 - cpu0
        if sampler is not None:
            sampler.stopped.set()
            sampler.join()
        for r, start in started:
            try:
                m.joules[r.name] = r.read_joules() - start
            except (OSError, ValueError) as e:
                m.reasons[r.name] = f"read failed: {e}"
