"""Small inline-SVG charts for report.html, drawn by our own code (no matplotlib, nothing fetched):
a line chart, a horizontal bar chart, and a log-log roofline chart. Each returns an <svg> string.

    line_chart([Series("train", xs, ys)], "loss", x_label="tokens", y_label="nats/token")
    bar_chart(["h0", "h1"], [3e9, 2e9], "FLOPs per layer", fmt=si)
    roofline_chart(points, peak, bandwidth, "ops against this machine's ceilings")
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from minigpt import units

COLORS = ("#1f6fb2", "#d9822b", "#2e9e5b", "#c23b3b", "#7a4fb5", "#8c6d31", "#d45fa0", "#5f6b7a",
          "#17becf", "#bcbd22", "#0b3d66", "#ff9da7", "#4d7c0f", "#9c1a1a", "#b07aa1", "#333333")
FONT = 'font-family="system-ui, sans-serif" font-size="12"'


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: str = ""


def si(x: float) -> str:
    """3.2G, 45k, 0.5, 2m: compact tick labels (units.si with no space)."""
    return units.si(x, sep="", rest=".2g")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:  # one value: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(math.ceil((hi - start) / step) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (lo, hi > 0)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0 ** e for e in range(a, max(b, a + 1) + 1)]


class _Frame:
    """Maps data to pixels inside a plot area, linear or log on each axis."""

    def __init__(self, x_range, y_range, width, height, logx=False, logy=False,
                 margin=(60, 20, 30, 45)):  # left, right, top, bottom
        self.w, self.h = width, height
        self.left, self.right, self.top, self.bottom = margin
        self.logx, self.logy = logx, logy
        self.x0, self.x1 = (math.log10(v) for v in x_range) if logx else x_range
        self.y0, self.y1 = (math.log10(v) for v in y_range) if logy else y_range

    def x(self, v: float) -> float:
        v = math.log10(v) if self.logx else v
        span = (self.x1 - self.x0) or 1.0
        return self.left + (v - self.x0) / span * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        v = math.log10(v) if self.logy else v
        span = (self.y1 - self.y0) or 1.0
        return self.h - self.bottom - (v - self.y0) / span * (self.h - self.top - self.bottom)

    def axes(self, xticks, yticks, title, x_label, y_label) -> list[str]:
        out = [(f'<text x="{self.w / 2}" y="16" text-anchor="middle" font-weight="bold">'
               f'{escape(title)}</text>')]
        for t in xticks:
            px = self.x(t)
            out.append(f'<line x1="{px:.1f}" y1="{self.top}" x2="{px:.1f}" '
                       f'y2="{self.h - self.bottom}" stroke="#e4e4e4"/>')
            out.append(f'<text x="{px:.1f}" y="{self.h - self.bottom + 15}" '
                       f'text-anchor="middle">{si(t)}</text>')
        for t in yticks:
            py = self.y(t)
            out.append(f'<line x1="{self.left}" y1="{py:.1f}" x2="{self.w - self.right}" '
                       f'y2="{py:.1f}" stroke="#e4e4e4"/>')
            out.append(f'<text x="{self.left - 6}" y="{py + 4:.1f}" text-anchor="end">{si(t)}</text>')
        out.append(f'<rect x="{self.left}" y="{self.top}" width="{self.w - self.left - self.right}" '
                   f'height="{self.h - self.top - self.bottom}" fill="none" stroke="#888"/>')
        out.append(f'<text x="{(self.left + self.w - self.right) / 2}" y="{self.h - 8}" '
                   f'text-anchor="middle">{escape(x_label)}</text>')
        out.append(f'<text transform="translate(14,{(self.top + self.h - self.bottom) / 2}) '
                   f'rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
        return out


def _svg(width: int, height: int, body: list[str]) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" {FONT}>' + "".join(body) + "</svg>")


def _legend(items: list[tuple[str, str]], x: float, y: float) -> list[str]:
    out = []
    for i, (label, color) in enumerate(items):
        yy = y + 16 * i
        out.append(f'<rect x="{x}" y="{yy - 9}" width="12" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="{yy}">{escape(label)}</text>')
    return out


def _finite(y) -> bool:
    return y is not None and math.isfinite(y)


def line_chart(series: list[Series], title: str, x_label: str = "", y_label: str = "",
               width: int = 640, height: int = 300) -> str:
    """Lines (with dots) for each series on shared linear axes; a None, NaN or infinite y (a
    diverged loss) is left out."""
    pts = [(x, y) for s in series for x, y in zip(s.xs, s.ys) if _finite(y)]
    if not pts:
        return _svg(width, 60, [f'<text x="10" y="30">{escape(title)}: no points</text>'])
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    f = _Frame((xt[0], xt[-1]), (yt[0], yt[-1]), width, height)
    body = f.axes(xt, yt, title, x_label, y_label)
    legend = []
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        xy = [(f.x(x), f.y(y)) for x, y in zip(s.xs, s.ys) if _finite(y)]
        if not xy:
            continue
        body.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                    + " ".join(f"{a:.1f},{b:.1f}" for a, b in xy) + '"/>')
        body += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>' for a, b in xy]
        legend.append((s.label, color))
    body += _legend(legend, width - f.right - 110, f.top + 16)
    return _svg(width, height, body)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str,
              fmt: Callable[[float], str] = si, color: str = COLORS[0], log: bool = False,
              width: int = 420, notes: Sequence[str] | None = None) -> str:
    """Horizontal bars, one per label, with the value (fmt) at the end of each; `log` spaces the
    bars' lengths by decades (for values that span orders of magnitude; zero or None: no bar)."""
    row, left, top = 22, max([60] + [int(7.5 * len(label)) + 16 for label in labels]), 28
    height = top + row * len(labels) + 10
    plot_w = width - left - 90
    shown = [v for v in values if v]
    lo = min(shown) / 10 if log and shown else 0.0
    hi = max(shown) if shown else 1.0

    def length(v: float) -> float:
        if not v:
            return 0.0
        if log:
            return plot_w * (math.log10(v / lo) / math.log10(hi / lo)) if hi > lo else plot_w
        return plot_w * v / hi

    body = [(f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">'
            f'{escape(title)}</text>')]
    for i, (label, v) in enumerate(zip(labels, values)):
        y = top + i * row
        body.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{escape(label)}</text>')
        lw = length(v) if v is not None else 0.0
        body.append(f'<rect x="{left}" y="{y + 3}" width="{lw:.1f}" height="{row - 6}" '
                    f'fill="{color}"/>')
        text = (notes[i] if notes else "") or (fmt(v) if v is not None else "n/a")
        body.append(f'<text x="{left + lw + 4:.1f}" y="{y + 14}">{escape(text)}</text>')
    return _svg(width, height, body)


def roofline_chart(points: list[tuple[str, float, float]], peak: float,
                   bandwidth: float | Sequence[tuple[str, float]], title: str, width: int = 760,
                   height: int = 360) -> str:
    """Log-log: FLOP per byte against achieved FLOP/s for each (label, intensity, rate), under the
    ceilings min(peak, intensity × bandwidth). `bandwidth` may be several (name, bytes/s), one
    slope each (the first drawn solid, the rest dashed), e.g. the read and copy bandwidths."""
    slopes = [("", bandwidth)] if isinstance(bandwidth, (int, float)) else list(bandwidth)
    pts = [(n, i, r) for n, i, r in points if i > 0 and r > 0]
    xs = [i for _, i, _ in pts] + [peak / bw for _, bw in slopes]
    ys = [r for _, _, r in pts] + [peak]
    xt, yt = log_ticks(min(xs) / 2, max(xs) * 2), log_ticks(min(ys) / 2, peak * 2)
    f = _Frame((xt[0], xt[-1]), (yt[0], yt[-1]), width, height, logx=True, logy=True,
               margin=(60, 150, 30, 45))  # the legend goes in the right margin
    body = f.axes(xt, yt, title, "FLOP per byte moved", "FLOP/s")
    for k, (_, bw) in enumerate(slopes):
        ridge = peak / bw
        roof = [(xt[0], min(peak, xt[0] * bw)), (ridge, peak), (xt[-1], peak)]
        if roof[0][1] < yt[0]:  # the bandwidth slope enters through the bottom edge
            roof[0] = (yt[0] / bw, yt[0])
        dash = ' stroke-dasharray="6,4"' if k else ""
        body.append(f'<polyline fill="none" stroke="#333" stroke-width="{1 if k else 2}"{dash} '
                    'points="' + " ".join(f"{f.x(a):.1f},{f.y(b):.1f}" for a, b in roof) + '"/>')
    named = ", ".join(f"{name + ' ' if name else ''}{si(bw)}B/s" for name, bw in slopes)
    ridge = peak / slopes[0][1]
    body.append(f'<text x="{width - f.right - 6}" y="{height - f.bottom - 8}" text-anchor="end">'
                f'ceilings: peak {si(peak)}FLOP/s, {escape(named)} (ridge {ridge:.3g} FLOP/B)'
                f'</text>')
    for k, (name, i, r) in enumerate(pts):
        color = COLORS[k % len(COLORS)]
        body.append(f'<circle cx="{f.x(i):.1f}" cy="{f.y(r):.1f}" r="5" fill="{color}" '
                    f'fill-opacity="0.8"><title>{escape(name)}: {i:.3g} FLOP/B, '
                    f'{si(r)}FLOP/s</title></circle>')
    body += _legend([(n, COLORS[k % len(COLORS)]) for k, (n, _, _) in enumerate(pts)][:16],
                    width - f.right + 12, f.top + 10)
    return _svg(width, height, body)
