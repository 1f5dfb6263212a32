"""What a bundle holds, read from its metadata only (no dataset is read): the figures behind
`inspect` and the quality lines `build` ends with.

Quality is the SQNR build recorded per layer: the output's on captured rows when built with
--calib, else the effective weight's. Per component it is summarized as mean and worst,
beside plain round-to-nearest's when build measured RTN too (configs with a per-layer choice).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from duquant_runtime.bundle import BundleReader
from duquant_runtime.bundle_records import EMBEDDING
from duquant_runtime.config import component_of, from_dict
from duquant_runtime.schema import STATIC_ACT_MODES

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


def read_report(bundle: str | Path) -> dict[str, Any]:
    """Everything `inspect` shows (its --json document), from the bundle's metadata."""
    quality: dict[str, dict[str, Any]] = {}
    choices: dict[str, int] = {}
    promoted: list[str] = []
    embeddings: list[dict[str, Any]] = []
    with BundleReader(bundle, in_memory=False) as reader:
        h = reader.header
        source = {row[0]: row for row in h.fingerprint_doc.get("source", [])}
        prefix = h.fingerprint_doc.get("name_prefix", "")
        per: dict[str, dict[str, Any]] = {}
        counted: set[int] = set()
        quant = from_dict(h.config).quant
        for name in h.layer_names:
            meta = reader.layer_summary(name)
            choice = meta.get("choice")
            if meta.get("layer_kind") == EMBEDDING:  # a table: its own line, not among the Linears'
                group = int(meta.get("group_size", 0))
                embeddings.append({"layer": name, "bits": int(meta["weight_bits"]), "group_size": group})
                embeddings[-1].update(meta.get("quality", {}))
            else:
                if meta.get("quality"):
                    method = choice or h.config["transform"]["method"]
                    act = {"act_source": meta["act_source"]} if meta.get("act_source") else {}
                    quality[name] = {**meta["quality"], "choice": method, "bits": int(meta["weight_bits"]), **act}
                if choice:
                    choices[choice] = choices.get(choice, 0) + 1
                if int(meta["weight_bits"]) != quant.bits_for(name):
                    promoted.append(f"{name} (w{meta['weight_bits']})")
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
        "choices": choices,
        "min_sqnr_fallback": promoted,
        "quality": [{"layer": name, **q} for name, q in sorted(quality.items())],
        "quality_summary": quality_summary(quality),
        "embeddings": embeddings,
    }


def worst_layers(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The n lowest by the recorded key; n = 0 means every layer."""
    key = quality_key({r["layer"]: r for r in rows})
    ranked = sorted((r for r in rows if key in r), key=lambda r: r[key])
    return ranked if n <= 0 else ranked[:n]


def print_report(info: dict[str, Any], worst: int | None, echo: Echo) -> None:
    from .weightquant import describe as describe_weights  # numba: not for every CLI start

    h = info
    echo(f"bundle       {h['path']}")
    echo(f"config       {h['config_name']}")
    echo(f"fingerprint  {h['fingerprint']}")
    echo(f"format       {h['format_version']} (written by duquant-packs {h['tool_version']}, {h['created_at']})")
    echo(f"checkpoint   {h['provenance'].get('checkpoint')}")
    echo(f"layers       {h['layers']}    file {human(h['file_bytes'])}")
    t, q = h["config"]["transform"], h["config"]["quant"]
    echo(
        f"method       {t['method']}  block {t['block_size']}/{t['block_out_size']}  permute {t['permute']}  "
        f"row_rot {t['row_rot']}  w{q['weight_bits']}a{q['act_bits']} ({q['act_mode']})  "
        f"weights {describe_weights(from_dict(h['config']).quant)}"
    )
    if h["calib"]:
        echo(f"calibration  statistics {str(h['calib'])[:12]}")
    elif needed := calibration_needed(h["config"], None):
        echo(f"calibration  {needed}")
    echo(f"scope        {h['config']['select']['scope']!r}")
    if h["choices"]:
        echo(f"choices      {counted(h['choices'])}")
    if line := act_source_line(h["quality"]):
        echo(f"act sizes    {line}")
    _print_fallback(h, echo)
    _print_components(h["components"], echo)
    for line in summary_lines(h["quality_summary"]):
        echo(f"quality      {line}")
    for e in h.get("embeddings", []):
        echo(table_line(e))
    include = h["config"].get("embed", {}).get("include")
    if include and not h.get("embeddings"):  # a preset's table rule that found no table: say so
        echo(f"embedding    none: embed.include '{include}' matched no table in the checkpoint")
    if worst is not None:
        _print_worst(worst_layers(h["quality"], worst), len(h["quality"]), echo)


def table_line(e: dict[str, Any]) -> str:
    """`embedding    <table>  int8 (per row)  weight SQNR 43.15 dB (RTN 43.15)`: a table's own line."""
    group = f"group {e['group_size']}" if e["group_size"] else "per row"
    rtn = f" (RTN {e['rtn_weight_sqnr_db']:.2f})" if "rtn_weight_sqnr_db" in e else ""
    sqnr = f"weight SQNR {e['weight_sqnr_db']:.2f} dB{rtn}" if "weight_sqnr_db" in e else "no quality record"
    return f"embedding    {e['layer']}  int{e['bits']} ({group})  {sqnr}"


def _print_fallback(h: dict[str, Any], echo: Echo) -> None:
    min_sqnr = h["config"]["quant"].get("min_sqnr_db", 0.0)
    if not min_sqnr:
        return
    promoted = h["min_sqnr_fallback"]
    echo(f"min SQNR     {min_sqnr:g} dB: {len(promoted)} layer(s) packed at 8 bits")
    for line in promoted[:20]:
        echo(f"  {line}")
    if len(promoted) > 20:
        echo(f"  ... and {len(promoted) - 20} more (--json lists all)")


def _print_components(per: dict[str, dict[str, Any]], echo: Echo) -> None:
    dtypes = sorted({d for c in per.values() for d in c["source_dtypes"]})
    source = f"{dtypes[0]} weights" if len(dtypes) == 1 else "source weights"
    echo(f"component    layers   {source:>14}   bundle     ratio")
    for comp, c in sorted(per.items()):
        ratio = c["bundle_bytes"] / c["source_bytes"]
        echo(
            f"{comp:<12} {c['layers']:>6}   {human(c['source_bytes']):>14}   {human(c['bundle_bytes']):>9}"
            f"   {ratio:.3f}x"
        )


def _print_worst(rows: list[dict[str, Any]], recorded: int, echo: Echo) -> None:
    if recorded == 0:
        echo("quality      not recorded (bundle built before quality reports existed): rebuild to get them")
        return
    has_out = "output_sqnr_db" in rows[0]
    key = "output_sqnr_db" if has_out else "weight_sqnr_db"
    which = "all" if len(rows) == recorded else f"worst {len(rows)} of"
    echo(f"{which} {recorded} layers by {'output' if has_out else 'weight'} SQNR (dB), worst first:")
    echo(f"  {'weight':>7} {'output':>7} {'RTN':>7}  {'choice':<22} {'act sizes':<13} layer")
    for r in rows:
        out = f"{r['output_sqnr_db']:7.2f}" if has_out else f"{'-':>7}"
        rtn = r.get(f"rtn_{key}")
        rtn_text = f"{rtn:7.2f}" if rtn is not None else f"{'-':>7}"
        source = r.get("act_source", "-")
        echo(f"  {r['weight_sqnr_db']:7.2f} {out} {rtn_text}  {r['choice']:<22} {source:<13} {r['layer']}")
    echo('  raise their bits with [quant] per_layer_weight_bits = { "<layer>" = 8 }, or exclude them')


def act_source_line(quality: list[dict[str, Any]]) -> str:
    """How many layers' data-free choice read their activation sizes from a norm, from producer
    rows, or from none (ranked on the unweighted weight error); "" when the build used none."""
    counts: dict[str, int] = {}
    for r in quality:
        if "act_source" in r:
            counts[r["act_source"]] = counts.get(r["act_source"], 0) + 1
    if not counts:
        return ""
    return f"{counted(counts)} (where the data-free choice read each layer's activation sizes; none: unweighted)"


def counted(counts: dict[str, int]) -> str:
    """ "a 3, b 1": most first, ties by name."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
