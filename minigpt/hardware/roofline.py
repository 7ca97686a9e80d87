"""The roofline: how long the ideal machine of a hardware profile would take for a set of records.

Each record (a row of minigpt.counting.tables: flops, bytes_read, bytes_written, dtype) is bound either
by arithmetic or by memory traffic, whichever takes longer:

    seconds = max(flops / peak FLOP/s of its dtype, (bytes_read + bytes_written) / memory bandwidth)

and a set of records takes the sum. Real kernels are slower (launch overhead, caches, imperfect
overlap), so this is a lower bound on time, and with a power figure a lower bound on energy at that
power. A record's dtype picks the peak: float32 -> fp32, float64 -> fp64, float16/bfloat16 -> fp16,
int8 or int32 (integer products) -> int8, and w8a32 (int8 weights widened into a float32 product,
minigpt.nn.quant) -> fp32.

    roofline_seconds(rows, profile)       total ideal seconds
    split(rows, profile)                  {"compute": s, "memory": s}: which bound each record hit
    decode_ceiling(bytes_per_token, bw)   tokens/s when every token streams bytes_per_token
"""

from collections.abc import Iterable
from dataclasses import dataclass

from minigpt.errors import ConfigError
from minigpt.hardware import profiles
from minigpt.hardware.profiles import Profile

# a record's dtype (the meter writes the result's dtype) -> the profile's peak table
PEAK_OF_DTYPE = {"float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "fp16",
                 "int8": "int8", "int32": "int8", "w8a32": "fp32"}


@dataclass(frozen=True)
class Bound:
    """One record on the roofline: its ideal seconds and whether arithmetic or memory set them."""

    seconds: float  # s
    compute_s: float  # flops / peak, s
    memory_s: float  # bytes / bandwidth, s

    @property
    def kind(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


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
    compute = row["flops"] / peak_for(profile, row["dtype"]) if row["flops"] else 0.0
    memory = nbytes / profiles.require(profile, "memory_bandwidth") if nbytes else 0.0
    return Bound(max(compute, memory), compute, memory)


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


def ridge_point(profile: Profile, dtype: str = "float32") -> float:
    """FLOPs per byte at which a record turns from memory-bound to compute-bound."""
    return peak_for(profile, dtype) / profiles.require(profile, "memory_bandwidth")


def decode_ceiling(bytes_per_token: float, bandwidth: float) -> float:
    """Tokens/s when each token streams bytes_per_token at `bandwidth` bytes/s (memory bound)."""
    if bytes_per_token <= 0 or bandwidth <= 0:
        raise ValueError("bytes per token and bandwidth must be positive")
    return bandwidth / bytes_per_token
