"""PNG charts of a run's costs (matplotlib, the optional `plot` extra).

- layers.png: per layer, stacked by kind (matmul, softmax, gelu, ...), three panels: FLOPs, bytes
  moved and measured seconds: where the arithmetic is, and where the time actually goes.
- roofline.png: every (scope, op) of the training phases as a point, arithmetic intensity
  (FLOP/byte) against achieved FLOP/s, under this machine's measured ceilings: the matmul peak
  and the memory bandwidth from `minigpt calibrate` (or a quick measurement).
"""

from pathlib import Path

from minigpt.counting import scopes, tables

TRAINING = ("forward", "backward", "optimizer")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from minigpt.errors import ConfigError

        raise ConfigError('--plot needs matplotlib: pip install -e ".[plot]"') from None
    return plt


def layers_chart(rows, path: Path, title: str) -> Path:
    plt = _pyplot()
    rows = [r for r in rows if r["phase"] in TRAINING]
    layers = [g["name"] for g in tables.group(rows, "layer")]
    kinds = [g["name"] for g in tables.group(rows, "kind")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(layers) + 2.5), sharey=True)
    panels = (("flops", "FLOPs", 1e9, "GFLOP"), ("bytes", "bytes moved", 1e9, "GB"),
              ("seconds", "measured time", 1.0, "s"))
    cmap = plt.get_cmap("tab20")
    for ax, (field, label, scale, unit) in zip(axes, panels):
        left = [0.0] * len(layers)
        for k, kind in enumerate(kinds):
            vals = []
            for layer in layers:
                sel = [r for r in rows if r["kind"] == kind and tables.layer_of(r["scope"]) == layer]
                v = sum(r["bytes_read"] + r["bytes_written"] if field == "bytes" else r[field] for r in sel)
                vals.append(v / scale)
            ax.barh(layers, vals, left=left, color=cmap(k % 20), label=kind)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_title(label)
        ax.set_xlabel(unit)
        ax.invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roofline_chart(rows, path: Path, peak_flops: float,
                   bandwidth: float | list[tuple[str, float]], title: str) -> Path:
    """Each training op's achieved FLOP/s against its intensity, under the peak and one slope per
    bandwidth (a number, or (name, bytes/s) pairs: the read, copy... ceilings the ops used)."""
    plt = _pyplot()
    rows = [r for r in rows if r["phase"] in TRAINING and r["seconds"] > 0]
    points = {}
    for r in rows:
        kind = r["kind"]
        if kind == "matmul":
            attention = r["scope"].endswith((f".{scopes.SCORES}", f".{scopes.MIX}"))
            kind = "matmul: attention (QK^T, att V)" if attention else "matmul: weights"
        key = (r["scope"].split(".", 1)[-1] if r["scope"][:1] == "h" else r["scope"], r["op"], kind)
        p = points.setdefault(key, {"flops": 0, "bytes": 0, "seconds": 0.0})
        p["flops"] += r["flops"]
        p["bytes"] += r["bytes_read"] + r["bytes_written"]
        p["seconds"] += r["seconds"]
    fig, ax = plt.subplots(figsize=(9, 6))
    lo, hi = 0.05, 1e3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    slopes = [("", bandwidth)] if isinstance(bandwidth, (int, float)) else bandwidth
    for k, (name, bw) in enumerate(slopes):
        ax.plot(xs, [min(peak_flops, x * bw) / 1e9 for x in xs], "k-" if k == 0 else "k--",
                lw=2 if k == 0 else 1, label=f"ceilings: {peak_flops / 1e9:,.0f} GFLOP/s, "
                f"{name + ' ' if name else ''}{bw / 1e9:,.1f} GB/s")
    kinds = sorted({kind for _, _, kind in points})  # points: {(layer, op, kind): sums}
    cmap = plt.get_cmap("tab10")
    for i, kind in enumerate(kinds):
        sel = [(k, p) for k, p in points.items() if k[-1] == kind and p["flops"] > 0 and p["bytes"] > 0]
        ax.scatter([p["flops"] / p["bytes"] for _, p in sel], [p["flops"] / p["seconds"] / 1e9 for _, p in sel],
                   color=cmap(i % 10), label=kind, s=25)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
