"""Units in one place: energy (J, Wh, kWh, MWh, GWh), time (s, h, days) and SI-prefixed text.

Every conversion in the package goes through these names, so no bare 3600 or 3.6e6 stands in
the code for "joules per watt-hour" or "seconds per hour".
"""

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
DAYS_PER_YEAR = 365.0
J_PER_WH = SECONDS_PER_HOUR  # a watt for an hour
J_PER_KWH = 1e3 * J_PER_WH
J_PER_MWH = 1e6 * J_PER_WH
J_PER_GWH = 1e9 * J_PER_WH
PJ = 1e-12  # joules per picojoule


def wh(joules: float) -> float:
    return joules / J_PER_WH


def kwh(joules: float) -> float:
    return joules / J_PER_KWH


def mwh(joules: float) -> float:
    return joules / J_PER_MWH


def gwh(joules: float) -> float:
    return joules / J_PER_GWH


def joules(*, wh: float = 0.0, kwh: float = 0.0, mwh: float = 0.0, gwh: float = 0.0) -> float:
    """Joules of an energy given in any of the larger units (summed when several are given)."""
    return wh * J_PER_WH + kwh * J_PER_KWH + mwh * J_PER_MWH + gwh * J_PER_GWH


def watt_hours(watts: float, seconds: float) -> float:
    """Wh drawn by `watts` for `seconds`."""
    return watts * seconds / J_PER_WH


def megawatt_hours(watts: float, hours: float) -> float:
    """MWh drawn by `watts` for `hours` (chip-hours × W per chip, say)."""
    return watts * hours * SECONDS_PER_HOUR / J_PER_MWH


PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, ""),
            (1e-3, "m"), (1e-6, "µ"), (1e-9, "n"))


def si(x: float, unit: str = "", spec: str = ".3g", sep: str = " ", down_to: float = 1e-9,
       rest: str | None = None) -> str:
    """x with an SI prefix: si(12345, "J") -> '12.3 kJ'; si(3.2e9, sep="") -> '3.2G'.

    spec: the number's format; sep: between number and prefix; down_to: the smallest prefix's
    factor to use; rest: the format of a number below down_to (default spec), shown unprefixed."""
    if x == 0:
        return f"{0:{rest or spec}}{sep}{unit}".rstrip()
    for factor, prefix in PREFIXES:
        if factor >= down_to and abs(x) >= factor:
            return f"{x / factor:{spec}}{sep}{prefix}{unit}"
    return f"{x:{rest or spec}}{sep}{unit}".rstrip()


def rows_text(head: tuple[str, ...], rows: list[tuple[str, ...]], align: str = "",
              rule: bool = True) -> list[str]:
    """Lines of a fixed-width table whose columns fit their widest cell: the head, a rule of dashes
    (rule=True), then the rows. align: one '<' or '>' per column (default: the first column left,
    the rest right). Cells are strings; format numbers before."""
    align = align or "<" + ">" * (len(head) - 1)
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(r) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, align, widths)).rstrip()

    out = [line(head)]
    if rule:
        out.append("-" * len(out[0]))
    return out + [line(r) for r in rows]
