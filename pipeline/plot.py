"""`inspect --plot`: where the quantization hurts, in one picture.

One panel per component (vision / llm / expert): each layer's recorded SQNR (output SQNR when
built with --calib, else weight SQNR) against its depth, marked by the candidate build kept,
with plain round-to-nearest's beside it in grey, and the component's bytes in the title.
matplotlib (the ``[build]`` extra) draws it off screen.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from duquant_runtime.config import component_of

from .report import human, quality_key

DEPTH = re.compile(r"\.layers\.(\d+)\.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
PANEL_INCHES, DPI = (4.5, 3.6), 100


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


def plot_report(info: dict[str, Any], path: str | Path) -> Any:
    """Draw ``info`` (``report.read_report``) into ``path`` (PNG); returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in info["quality"] if quality_key({r["layer"]: r}) in r]
    key = quality_key({r["layer"]: r for r in rows})
    comps = sorted({component_of(r["layer"]) for r in rows}) or ["none"]
    kinds = sorted({str(r["choice"]).split("+")[0] for r in rows})
    fig, axes = plt.subplots(1, len(comps), figsize=(PANEL_INCHES[0] * len(comps), PANEL_INCHES[1]), dpi=DPI)
    axes = [axes] if len(comps) == 1 else list(axes)
    for ax, comp in zip(axes, comps, strict=True):
        points = _points([r for r in rows if component_of(r["layer"]) == comp], key)
        rtn = [(x, r[f"rtn_{key}"]) for x, r in points if f"rtn_{key}" in r]
        if rtn:
            ax.scatter(*zip(*rtn, strict=True), s=10, c="0.7", marker=".", label="round-to-nearest", gid="baseline")
        for i, kind in enumerate(kinds):
            mine = [(x, r[key]) for x, r in points if str(r["choice"]).split("+")[0] == kind]
            if mine:
                ax.scatter(*zip(*mine, strict=True), s=14, marker=MARKERS[i % len(MARKERS)], label=kind, gid="chosen")
        c = info["components"].get(comp, {})
        sizes = f"{human(c['bundle_bytes'])} of {human(c['source_bytes'])}" if c else ""
        ax.set_title(f"{comp}: {len(points)} layers, {sizes}", fontsize=9)
        ax.set_xlabel("depth (layer index)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{'output' if key == 'output_sqnr_db' else 'weight'} SQNR (dB)")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{info['config_name']} ({info['fingerprint'][:12]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), dpi=DPI)
    plt.close(fig)
    return fig
