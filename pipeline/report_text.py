"""`inspect`'s text: the report ``report.read_report`` reads, printed line by line."""

from __future__ import annotations

from typing import Any

from duquant_runtime.config import from_dict

from .report import Echo, calibration_needed, counted, human, summary_lines, worst_layers


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
    if h.get("activations"):
        echo(f"activations  {counted(h['activations'])}")
    _print_fallback(h, echo)
    _print_act_fallback(h, echo)
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


def _print_act_fallback(h: dict[str, Any], echo: Echo) -> None:
    threshold = h["config"]["quant"].get("a4_min_sqnr_db", 0.0)
    if not threshold:
        return
    kept, q = h.get("act_fallback", []), h["config"]["quant"]
    margin = q.get("a4_rtn_margin_db", 0.0)
    rtn = f" or within {margin:g} dB of RTN W4A8" if margin else " or under RTN W4A8"
    rtn = rtn if q.get("a4_vs_rtn_w4a8") else ""
    echo(f"A8 fallback  {threshold:g} dB{rtn} held out: {len(kept)} layer(s) kept at 8-bit activations")
    for line in kept[:20]:
        echo(f"  {line}")
    if len(kept) > 20:
        echo(f"  ... and {len(kept) - 20} more (--json lists all)")


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
    echo(f"  {'weight':>7} {'output':>7} {'RTN':>7}  {'choice':<30} {'act':<9} {'act sizes':<13} layer")
    for r in rows:
        out = f"{r['output_sqnr_db']:7.2f}" if has_out else f"{'-':>7}"
        rtn = r.get(f"rtn_{key}")
        rtn_text = f"{rtn:7.2f}" if rtn is not None else f"{'-':>7}"
        source, act = r.get("act_source", "-"), r.get("act", "-")
        echo(f"  {r['weight_sqnr_db']:7.2f} {out} {rtn_text}  {r['choice']:<30} {act:<9} {source:<13} {r['layer']}")
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
