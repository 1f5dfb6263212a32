"""`inspect --plot`: where the quantization hurts, in one picture.

One panel per component (vision / llm / expert): each layer's recorded SQNR (output SQNR when
built with --calib, else weight SQNR) against its depth, marked by the candidate build kept
(hollow where the layer is packed at more bits than the fewest in the bundle, e.g. full_w4a8's
8-bit adaptive norms; ringed where the data-free choice found no activation estimate and ranked
on the unweighted weight error), with plain round-to-nearest's beside it in grey, and the component's
bytes in the title; then one panel for the embedding tables, if any. matplotlib (the
``[build]`` extra) draws it off screen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from duquant_runtime.config import component_of
from duquant_runtime.errors import DuQuantError

from .report import human, quality_key

DEPTH = re.compile(r"\.layers\.(\d+)\.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANEL_INCHES, DPI = (4.5, 3.6), 100
TABLES = "embedding"  # the tables' panel, after the components'


class PlotError(DuQuantError):
    """The plot cannot be written where asked (no such folder, a format matplotlib lacks)."""


def _depth(name: str) -> float | None:
    found = DEPTH.search(name)
    return float(found.group(1)) if found else None


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, dict[str, Any]]]:
    """(x, row) per layer: its depth, the layers of one depth spread across [depth, depth + 0.8)."""
    by_depth: dict[float, list[dict[str, Any]]] = {}
    loose = []
    for r in rows:
        d = _depth(r["layer"])
        (by_depth.setdefault(d, []) if d is not None else loose).append(r)
    out = []
    for d, group in sorted(by_depth.items()):
        for i, r in enumerate(sorted(group, key=lambda r: r["layer"])):
            out.append((d + 0.8 * i / len(group), r))
    top = max(by_depth, default=-1.0) + 1
    out += [(top + 0.8 * i / max(1, len(loose)), r) for i, r in enumerate(sorted(loose, key=lambda r: r["layer"]))]
    return out


def check_plot_path(path: str | Path) -> Path:
    """``path`` when a plot can be written there: its folder exists and matplotlib knows its
    format (by the suffix); a one-sentence ``PlotError`` before anything is drawn otherwise."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        what = f".{suffix} is not a picture format matplotlib writes" if suffix else "no suffix names its format"
        raise PlotError(f"--plot {path}: {what}; end the name with .png, .pdf or .svg")
    if not path.parent.is_dir():
        raise PlotError(f"--plot {path}: there is no folder {path.parent}; create it, or write the plot elsewhere")
    return path


def _draw_layers(ax: Any, rows: list[dict[str, Any]], key: str, kinds: list[str], low_bits: int) -> int:
    """One component's layers on ``ax``; returns how many."""
    points = _points(rows, key)
    rtn = [(x, r[f"rtn_{key}"]) for x, r in points if f"rtn_{key}" in r]
    if rtn:
        ax.scatter(*zip(*rtn, strict=True), s=10, c="0.7", marker=".", label="round-to-nearest", gid="baseline")
    for i, kind in enumerate(kinds):
        for bits in sorted({int(r.get("bits", low_bits)) for _, r in points}):
            mine = [
                (x, r[key])
                for x, r in points
                if str(r["choice"]).split("+")[0] == kind and int(r.get("bits", low_bits)) == bits
            ]
            if not mine:
                continue
            color = f"C{i % 10}"
            more = bits > low_bits  # hollow: packed at more bits than most
            face, label = ("none", f"{kind} (w{bits})") if more else (color, kind)
            marker = MARKERS[i % len(MARKERS)]
            xy = zip(*mine, strict=True)
            ax.scatter(*xy, s=14, marker=marker, facecolors=face, edgecolors=color, label=label, gid="chosen")
    kept = [(x, r[key]) for x, r in points if "a4_held_out_sqnr_db" in r]
    if kept:  # kept at 8-bit activations by quant.a4_min_sqnr_db: crossed
        xy = zip(*kept, strict=True)
        ax.scatter(*xy, s=50, marker="x", c="C3", linewidths=0.8, label="kept at A8 (a4_min_sqnr_db)", gid="a8")
    blind = [(x, r[key]) for x, r in points if r.get("act_source") == "none"]
    if blind:  # chosen without an activation estimate (no producer found): ringed
        ax.scatter(
            *zip(*blind, strict=True),
            s=60,
            marker="o",
            facecolors="none",
            edgecolors="0.3",
            linewidths=0.6,
            label="no activation estimate",
            gid="unweighted",
        )
    return len(points)


def _draw_tables(ax: Any, tables: list[dict[str, Any]]) -> None:
    """The embedding tables' weight SQNR, RTN's beside it, one column each."""
    for x, e in enumerate(tables):
        if "rtn_weight_sqnr_db" in e:
            ax.scatter([x], [e["rtn_weight_sqnr_db"]], s=10, c="0.7", marker=".", gid="baseline")
        ax.scatter([x], [e["weight_sqnr_db"]], s=24, marker="D", c="C3", label=f"int{e['bits']}", gid="table")
    values = [v for e in tables for v in (e["weight_sqnr_db"], e.get("rtn_weight_sqnr_db", e["weight_sqnr_db"]))]
    ax.set_ylim(min(values) - 1, max(values) + 1)  # dB, not an offset axis of thousandths
    ax.set_xticks(range(len(tables)), [e["layer"].rsplit(".", 1)[-1] for e in tables], fontsize=8)
    ax.set_xlim(-0.5, len(tables) - 0.5)
    ax.set_title(f"{TABLES}: {len(tables)} table(s)", fontsize=9)
    ax.set_ylabel("weight SQNR (dB)")
    ax.legend(fontsize=7, loc="lower right")


def _legend(ax: Any, panels: Any) -> None:
    """One legend for the layer panels, on ``ax``: every label any of them drew, once."""
    entries: dict[str, Any] = {}
    for panel in panels:
        for handle, label in zip(*panel.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    ax.legend(list(entries.values()), list(entries), fontsize=7, loc="lower right")


def plot_report(info: dict[str, Any], path: str | Path) -> Any:
    """Draw ``info`` (``report.read_report``) into ``path`` (its format by the suffix, PNG
    most often); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = check_plot_path(path)
    rows = [r for r in info["quality"] if quality_key({r["layer"]: r}) in r]
    key = quality_key({r["layer"]: r for r in rows})
    tables = [e for e in info.get("embeddings", []) if "weight_sqnr_db" in e]
    comps = sorted({component_of(r["layer"]) for r in rows}) or ([] if tables else ["none"])
    kinds = sorted({str(r["choice"]).split("+")[0] for r in rows})
    low_bits = min((int(r.get("bits", 4)) for r in rows), default=4)
    panels = len(comps) + bool(tables)
    fig, axes = plt.subplots(1, panels, figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), dpi=DPI, squeeze=False)
    for ax, comp in zip(axes[0], comps, strict=False):
        count = _draw_layers(ax, [r for r in rows if component_of(r["layer"]) == comp], key, kinds, low_bits)
        c = info["components"].get(comp, {})
        sizes = f"{human(c['bundle_bytes'])} of {human(c['source_bytes'])}" if c else ""
        ax.set_title(f"{comp}: {count} layers, {sizes}", fontsize=9)
        ax.set_xlabel("depth (layer index)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # depths are whole layers
        ax.grid(alpha=0.3)
    if comps:
        axes[0][0].set_ylabel(f"{'output' if key == 'output_sqnr_db' else 'weight'} SQNR (dB)")
        _legend(axes[0][len(comps) - 1], axes[0][: len(comps)])
    if tables:
        _draw_tables(axes[0][-1], tables)
    fig.suptitle(f"{info['config_name']} ({info['fingerprint'][:12]})", fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(str(path), dpi=DPI)
    except OSError as exc:  # a folder we may not write, a full disk
        raise PlotError(f"--plot {path}: cannot write it ({exc.strerror or exc}); write the plot elsewhere") from None
    finally:
        plt.close(fig)
    return fig
