"""What a bundle holds, read from its metadata only (no dataset is read): the figures behind
`inspect` and the quality lines `build` ends with.

Quality is the SQNR build recorded per layer: the output's on captured rows when built with
--calib, else the effective weight's. Per component it is summarized as mean and worst,
beside plain round-to-nearest's when build measured RTN too (configs with a per-layer choice).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duquant_runtime.bundle import BundleReader
from duquant_runtime.bundle_records import EMBEDDING
from duquant_runtime.config import QuantConfig, component_of, from_dict
from duquant_runtime.config_sections import STATIC_ACT_MODES

from .checkpoint import ITEMSIZE

Echo = Callable[[str], None]


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


def quality_key(quality: dict[str, dict[str, Any]]) -> str:
    return "output_sqnr_db" if any("output_sqnr_db" in q for q in quality.values()) else "weight_sqnr_db"


def quality_summary(quality: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per component: how many layers, mean and worst SQNR (dB), and RTN's where recorded."""
    key = quality_key(quality)
    by_comp: dict[str, list[dict[str, Any]]] = {}
    for name, q in quality.items():
        if key in q:
            by_comp.setdefault(component_of(name), []).append(q)
    summary: dict[str, dict[str, Any]] = {}
    for comp, rows in sorted(by_comp.items()):
        values = [r[key] for r in rows]
        entry: dict[str, Any] = {"by": key, "layers": len(rows), "mean_db": _mean(values), "worst_db": min(values)}
        rtn = [r[f"rtn_{key}"] for r in rows if f"rtn_{key}" in r]
        if len(rtn) == len(rows):
            entry.update(rtn_mean_db=_mean(rtn), rtn_worst_db=min(rtn))
        summary[comp] = entry
    return summary


def _mean(values: list[float]) -> float:
    return round(sum(values) / len(values), 3)


def summary_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """One line per component, e.g. `llm  216 layers  weight SQNR mean 21.3 dB, worst 18.2 (RTN 17.9 / 12.0)`."""
    lines = []
    for comp, s in summary.items():
        what = "output" if s["by"] == "output_sqnr_db" else "weight"
        line = f"{comp:<12} {s['layers']:>4} layers  {what} SQNR mean {s['mean_db']:.2f} dB, worst {s['worst_db']:.2f}"
        if "rtn_mean_db" in s:
            line += f"  (RTN: mean {s['rtn_mean_db']:.2f}, worst {s['rtn_worst_db']:.2f})"
        lines.append(line)
    return lines


def calibration_needed(config: dict[str, Any], calib: str | None) -> str | None:
    """Why and how a bundle's static activation scales must be calibrated before its first
    forward (built without --calib), or None when it needs no calibration."""
    q = config["quant"]
    if q["act_mode"] not in STATIC_ACT_MODES or not q["act_bits"] or calib:
        return None
    if q["act_mode"] == "per_step_static":
        how = "over the denoising loop (after instrument(model) and load_bundle)"
    else:
        how = "on a few batches (after load_bundle)"
    return (
        f"no activation scales (quant.act_mode = '{q['act_mode']}', built without --calib): call "
        f"duquant_runtime.calibrate(model) {how} before the first forward, or build with --calib STATS.h5"
    )


@dataclass
class LinearTally:
    """What `inspect` reports of the bundle's Linears, layer by layer."""

    quant: QuantConfig
    method: str
    quality: dict[str, dict[str, Any]] = field(default_factory=dict)
    choices: dict[str, int] = field(default_factory=dict)
    promoted: list[str] = field(default_factory=list)  # packed at more weight bits (min_sqnr_db)
    acts: dict[str, int] = field(default_factory=dict)  # "a4 static" -> layers
    kept_a8: list[str] = field(default_factory=list)  # kept at 8-bit activations by a4_min_sqnr_db

    def add(self, name: str, meta: dict[str, Any]) -> None:
        choice, act = meta.get("choice"), layer_act(meta, self.quant, name)
        if meta.get("quality"):
            source = {"act_source": meta["act_source"]} if meta.get("act_source") else {}
            row = {"choice": choice or self.method, "bits": int(meta["weight_bits"]), "act": act, **source}
            self.quality[name] = {**meta["quality"], **row}
        if choice:
            self.choices[choice] = self.choices.get(choice, 0) + 1
        if int(meta["weight_bits"]) != self.quant.bits_for(name):
            self.promoted.append(f"{name} (w{meta['weight_bits']})")
        self.acts[act] = self.acts.get(act, 0) + 1
        if "act_bits" in meta and int(meta["act_bits"]) != self.quant.act_bits:
            held = meta.get("quality", {}).get("a4_held_out_sqnr_db")
            figure = "" if held is None else f"{held:.2f} dB at A{self.quant.act_bits}, "
            self.kept_a8.append(f"{name} ({figure}{act})")


def read_report(bundle: str | Path) -> dict[str, Any]:
    """Everything `inspect` shows (its --json document), from the bundle's metadata."""
    embeddings: list[dict[str, Any]] = []
    with BundleReader(bundle, in_memory=False) as reader:
        h = reader.header
        source = {row[0]: row for row in h.fingerprint_doc.get("source", [])}
        prefix = h.fingerprint_doc.get("name_prefix", "")
        per: dict[str, dict[str, Any]] = {}
        counted: set[int] = set()
        linears = LinearTally(from_dict(h.config).quant, h.config["transform"]["method"])
        for name in h.layer_names:
            meta = reader.layer_summary(name)
            if meta.get("layer_kind") == EMBEDDING:  # a table: its own line, not among the Linears'
                group = int(meta.get("group_size", 0))
                embeddings.append({"layer": name, "bits": int(meta["weight_bits"]), "group_size": group})
                embeddings[-1].update(meta.get("quality", {}))
            else:
                linears.add(name, meta)
            comp = per.setdefault(component_of(name), {"layers": 0, "source_bytes": 0, "bundle_bytes": 0})
            comp["layers"] += 1
            row = source.get(f"{prefix}{name}.weight")
            dtype = row[1] if row else "BF16"  # bundles record their sources; BF16 is openpi's
            comp.setdefault("source_dtypes", set()).add(dtype)
            comp["source_bytes"] += ITEMSIZE.get(dtype, 2) * int(meta["in_features"]) * int(meta["out_features"])
            for nbytes, address in meta["datasets"].values():
                if address not in counted:  # a dataset shared by layers counts once
                    counted.add(address)
                    comp["bundle_bytes"] += nbytes
    for comp in per.values():
        comp["source_dtypes"] = sorted(comp["source_dtypes"])
    return {
        "path": str(reader.path),
        "config_name": h.name,
        "fingerprint": h.fingerprint,
        "format_version": h.format_version,
        "tool_version": h.tool_version,
        "created_at": h.created_at,
        "layers": len(h.layer_names),
        "file_bytes": os.path.getsize(reader.path),
        "components": per,
        "config": h.config,
        "provenance": h.provenance,
        "calib": h.fingerprint_doc.get("calib"),
        "choices": linears.choices,
        "min_sqnr_fallback": linears.promoted,
        "activations": linears.acts,
        "act_fallback": linears.kept_a8,
        "quality": [{"layer": name, **q} for name, q in sorted(linears.quality.items())],
        "quality_summary": quality_summary(linears.quality),
        "embeddings": embeddings,
    }


ACT_SHORT = {"per_token_dynamic": "token", "per_channel_static": "static", "per_step_static": "step"}


def layer_act(meta: dict[str, Any], quant: QuantConfig, name: str) -> str:
    """A layer's activation quantization in short ("a4 step", "a8 token", "a16 none" for off): as
    its meta records it (0.10), else as its config gives it."""
    bits = int(meta.get("act_bits", quant.act_bits))
    if not bits:
        return "float"
    return f"a{bits} {ACT_SHORT[str(meta.get('act_mode') or quant.mode_for(name))]}"


def worst_layers(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The n lowest by the recorded key; n = 0 means every layer."""
    key = quality_key({r["layer"]: r for r in rows})
    ranked = sorted((r for r in rows if key in r), key=lambda r: r[key])
    return ranked if n <= 0 else ranked[:n]


def counted(counts: dict[str, int]) -> str:
    """ "a 3, b 1": most first, ties by name."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
