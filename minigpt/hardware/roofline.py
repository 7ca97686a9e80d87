"""The roofline: how long the ideal machine of a hardware profile would take for a set of records.

Each record (a row of minigpt.counting.tables: flops, bytes_read, bytes_written, dtype) is bound either
by arithmetic or by memory traffic, whichever takes longer:

    seconds = max(flops / peak FLOP/s of its dtype, (bytes_read + bytes_written) / its bandwidth)

and a set of records takes the sum. Real kernels are slower (launch overhead, caches, imperfect
overlap), so this is a lower bound on time, and with a power figure a lower bound on energy at that
power. A record's dtype picks the peak: float32 -> fp32, float64 -> fp64, float16/bfloat16 -> fp16,
int8 or int32 (integer products) -> int8, and w8a32 (int8 weights widened into a float32 product,
minigpt.nn.quant) -> fp32.

A record's bandwidth is the ceiling that fits its traffic (`memory_ceiling`, the one function every
figure of the package goes through): the measured STREAM kind (minigpt.hardware.bandwidth) whose
share of bytes written is nearest the record's own, bytes_written / (bytes_read + bytes_written):

    read 0 (a decode step's weight stream)   triad 1/3   copy 1/2   write 1

so a matrix-vector product over weights is held against the read bandwidth, an elementwise pass
that reads one array and writes one against the copy bandwidth, one that reads two against the
triad. Each kind's figure is the better of one thread and all cores. A profile without measured
kinds (the packaged, published ones) has one figure, memory_bandwidth, and every record uses it;
the Ceiling says which was used and how it was measured.

    memory_ceiling(profile, read, written)  the bandwidth a record's bytes are held against
    roofline_seconds(rows, profile)         total ideal seconds
    split(rows, profile)                    {"compute": s, "memory": s}: which bound each record hit
    by_ceiling(rows, profile)               ideal seconds by the ceiling that set them
    decode_ceiling(bytes_per_token, bw)     tokens/s when every token streams bytes_per_token
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.hardware.profiles import Profile
from minigpt.units import si

# a record's dtype (the meter writes the result's dtype) -> the profile's peak table
PEAK_OF_DTYPE = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "fp16",
                 "int8": "int8", "int32": "int8", "w8a32": "fp32"}


# the share of a STREAM kind's bytes that are written (minigpt.hardware.bandwidth)
WRITE_SHARE = {"read": 0.0, "triad": 1 / 3, "copy": 1 / 2, "write": 1.0}


class Ceiling(NamedTuple):
    """A ceiling a record is held against: its name, its rate and how that rate was found."""

    name: str  # "read bandwidth", "memory_bandwidth", "fp32 peak"
    value: float  # bytes/s for a bandwidth, FLOP/s for a peak
    how: str  # the profile's note or source for the figure

    def label(self) -> str:
        """The name and the rate, as in: read bandwidth 33 GB/s; fp32 peak 301 GFLOP/s."""
        unit = "FLOP/s" if self.name.endswith("peak") else "B/s"
        return f"{self.name} {si(self.value, unit)}"


@dataclass(frozen=True)
class Bound:
    """One record on the roofline: its ideal seconds and whether arithmetic or memory set them."""

    seconds: float  # s
    compute_s: float  # flops / peak, s
    memory_s: float  # bytes / bandwidth, s
    compute_ceiling: Ceiling | None = None  # None when the record has no FLOPs
    memory_ceiling: Ceiling | None = None  # None when it moves no bytes

    @property
    def kind(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def ceiling(self) -> Ceiling | None:
        """The ceiling that set the time."""
        return self.compute_ceiling if self.kind == "compute" else self.memory_ceiling


def stream_kind(bytes_read: float, bytes_written: float) -> str:
    """The STREAM kind whose read/write mix is nearest the given bytes' (ties: the first of read,
    triad, copy, write)."""
    total = bytes_read + bytes_written
    if total <= 0:
        raise ValueError("a record that moves no bytes has no memory ceiling")
    share = bytes_written / total
    return min(WRITE_SHARE, key=lambda k: abs(WRITE_SHARE[k] - share))


def memory_ceiling(profile: Profile, bytes_read: float, bytes_written: float) -> Ceiling:
    """The bandwidth for traffic of this read/write mix: the profile's measured figure of the
    nearest STREAM kind, else its memory_bandwidth; ConfigError when it has neither."""
    kind = stream_kind(bytes_read, bytes_written)
    best = profiles.stream_bandwidth(profile, kind)
    if best is not None:
        threads = best.key.split(".")[1].replace("_", " ")
        return Ceiling(f"{kind} bandwidth", best.value, best.note or f"measured, {threads}")
    value = profiles.require(profile, "memory_bandwidth")
    how = profile.notes.get("memory_bandwidth") or profile.sources.get("memory_bandwidth", "")
    return Ceiling("memory_bandwidth", value, f"no {kind} figure in the profile; {how}".rstrip("; "))


def compute_ceiling(profile: Profile, dtype: str) -> Ceiling:
    """The dense peak for a record's dtype, as a Ceiling; ConfigError when unknown."""
    key = PEAK_OF_DTYPE.get(dtype, dtype)
    how = profile.notes.get(f"peak_flops.{key}") or profile.sources.get(f"peak_flops.{key}", "")
    return Ceiling(f"{key} peak", peak_for(profile, dtype), how)


def peak_for(profile: Profile, dtype: str) -> float:
    """The profile's dense peak FLOP/s for a record's dtype; ConfigError when unknown."""
    key = PEAK_OF_DTYPE.get(dtype)
    if key is None:
        raise ConfigError(f"{profile.name}: no roofline peak for records of dtype {dtype!r} "
                          f"(known: {', '.join(PEAK_OF_DTYPE)})")
    return profiles.peak(profile, key)


def bound(row: dict, profile: Profile) -> Bound:
    """One row -> its roofline time; ConfigError when the profile lacks a needed figure."""
    nbytes = row["bytes_read"] + row["bytes_written"]  # bytes
    peak = compute_ceiling(profile, row["dtype"]) if row["flops"] else None
    bw = memory_ceiling(profile, row["bytes_read"], row["bytes_written"]) if nbytes else None
    compute = row["flops"] / peak.value if peak else 0.0
    memory = nbytes / bw.value if bw else 0.0
    return Bound(max(compute, memory), compute, memory, peak, bw)


def roofline_seconds(rows: Iterable[dict], profile: Profile) -> float:
    """Σ over rows of max(FLOPs / peak, bytes / bandwidth), in seconds."""
    return sum(bound(r, profile).seconds for r in rows)


def split(rows: Iterable[dict], profile: Profile) -> dict[str, float]:
    """Ideal seconds by the bound that set them: {"compute": s, "memory": s}."""
    out = {"compute": 0.0, "memory": 0.0}
    for r in rows:
        b = bound(r, profile)
        out[b.kind] += b.seconds
    return out


def by_ceiling(rows: Iterable[dict], profile: Profile) -> dict[Ceiling, float]:
    """Ideal seconds by the ceiling that set them, largest first."""
    out: dict[Ceiling, float] = {}
    for r in rows:
        b = bound(r, profile)
        if b.ceiling is not None:
            out[b.ceiling] = out.get(b.ceiling, 0.0) + b.seconds
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def ceilings_used(rows: list[dict], profile: Profile, values: bool = True) -> str:
    """The ceilings that set the ideal seconds and each one's share of them, as in: fp32 peak 224
    GFLOP/s 84%, copy bandwidth 43 GB/s 9% (values=False: names and shares only)."""
    used = by_ceiling(rows, profile)
    total = sum(used.values()) or 1.0
    return ", ".join(f"{c.label() if values else c.name} {100 * s / total:.0f}%"
                     for c, s in used.items()) or "none (no FLOPs, no bytes)"


def ceilings_line(rows: list[dict], profile: Profile) -> str:
    """One line saying which ceilings the roofline used and for what share of its ideal seconds."""
    return (f"roofline ceilings on {profile.name} (share of the ideal seconds): "
            f"{ceilings_used(rows, profile)}; matmuls' FLOPs against the peak, each op's bytes "
            "against the bandwidth its read/write mix fits (docs/costs.md)")


def ridge_point(profile: Profile, dtype: str = "float32", kind: str = "read") -> float:
    """FLOPs per byte at which a record of this STREAM kind's mix turns from memory-bound to
    compute-bound."""
    share = WRITE_SHARE[kind]
    return peak_for(profile, dtype) / memory_ceiling(profile, 1 - share, share).value


def decode_ceiling(bytes_per_token: float, bandwidth: float) -> float:
    """Tokens/s when each token streams bytes_per_token at `bandwidth` bytes/s (memory bound)."""
    if bytes_per_token <= 0 or bandwidth <= 0:
        raise ValueError("bytes per token and bandwidth must be positive")
    return bandwidth / bytes_per_token
