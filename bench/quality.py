"""Per-layer output SQNR on synthetic pi0.5-shaped layers with *independent* outliers.

    python bench/quality.py [--full] [--seeds 2] [--rows 128]

The independent-outlier testbed (bench/synthetic.py documents the generator: activation
outlier channels drawn independently of heavy weight columns). It rewards rotation; the
trained-like testbeds, where large activations meet small weight columns, are in
bench/trained.py. Every case packs the layer with the pipeline's own ``pack_layer`` and runs
it as the runtime's ``DuQuantLinear`` (one forward: the numbers describe what users run).
Output SQNR = 10·log10(‖XWᵀ‖² / ‖XWᵀ - layer(X)‖²) on evaluation tokens that calibration
never saw, with per-token dynamic int8 activations, with static per-channel int8 scales
(percentile of the calibration tokens), and with weights only.

Baseline: RTN (no transform, per-row absmax int4, as plain W4A8). Calibrated cases use
statistics of the calibration tokens. Without --full the 16384-wide LLM down_proj is
skipped (GPTQ's 16384² Cholesky alone takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from duquant_pipeline.basis import Transform
from duquant_pipeline.pack import LayerQuantizer, pack_layer
from duquant_pipeline.quality import output_sqnr_db, runtime_layer, static_scales
from duquant_pipeline.rotations import handler
from duquant_pipeline.select import SelectedLayer
from duquant_runtime.bundle import LayerPack
from duquant_runtime.config import DuQuantConfig, resolve
from duquant_runtime.signature import weight_signature
from duquant_runtime.stats import LayerStats
from synthetic import PI05_SHAPES, SyntheticLayer, make_layer

DEFAULT = resolve("full_w4a8")
CALIB = resolve("full_w4a8_calib")
HAD_ONLY = DEFAULT.replace("transform", equalize=(), rtn_candidate=False)
# label -> (config, built with statistics); None: plain RTN
CASES: dict[str, tuple[DuQuantConfig | None, bool]] = {
    "RTN (absmax)": (None, False),
    "svd (seed)": (resolve("full_w4a8_seed"), False),
    "hadamard 64 only (previous default)": (HAD_ONLY, False),
    "duquant 64": (HAD_ONLY.replace("transform", method="duquant"), False),
    "default (per-layer choice)": (DEFAULT, False),
    "hadamard 64 + smooth 0.5 + gptq (previous calib preset)": (
        HAD_ONLY.replace("transform", smooth_alpha=0.5).replace("quant", gptq=True),
        True,
    ),
    "calib preset (per-layer choice + gptq)": (CALIB, True),
}


def stats_of(x: np.ndarray) -> LayerStats:
    xd = x.astype(np.float64)
    return LayerStats(
        absmax=np.abs(x).max(axis=0),
        gram=(xd.T @ xd / x.shape[0])[None].astype(np.float32),
        sample=x,
        tokens=x.shape[0],
    )


def pack_case(layer: SyntheticLayer, config: DuQuantConfig | None, calib: bool) -> LayerPack:
    exact64 = config is not None and handler(config.transform.method).dtype == torch.float64
    w = layer.weight.astype(np.float64 if exact64 else np.float32)
    sel = SelectedLayer(layer.name, f"{layer.name}.weight", None, w.shape[0], w.shape[1], "F32", 4)
    stats = stats_of(layer.calib) if calib else None
    if config is None:
        packer = LayerQuantizer(w, None, sel, "F32", DEFAULT, None, weight_signature(torch.from_numpy(w)))
        q = 7
        scales = np.maximum(np.abs(w).max(axis=1) / q, 1e-10).astype(np.float32)
        codes = np.clip(np.round(w / scales[:, None].astype(np.float64)), -q - 1, q).astype(np.int8)
        return packer.measure(Transform(w_t=w), codes, scales, 4).pack
    return pack_layer(w, None, sel, "F32", config, stats)


def evaluate(layer: SyntheticLayer, config: DuQuantConfig | None, calib: bool) -> dict[str, float]:
    pack = pack_case(layer, config, calib)
    x = torch.from_numpy(layer.evaluation).double()
    w = torch.from_numpy(layer.weight)
    per_token = runtime_layer(pack, 8, "per_token_dynamic", torch.float64)
    static = runtime_layer(pack, 8, "per_channel_static", torch.float64)
    static.set_act_scale(torch.from_numpy(static_scales(static, layer.calib, 8, 99.9)))
    weights_only = runtime_layer(pack, 0, "per_token_dynamic", torch.float64)
    return {
        "per_token": output_sqnr_db(per_token, x, w),
        "static": output_sqnr_db(static, x, w),
        "weights_only": output_sqnr_db(weights_only, x, w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="include the 16384-wide LLM down_proj")
    ap.add_argument("--seeds", type=int, default=1, help="layers per shape (different draws)")
    ap.add_argument("--rows", type=int, default=256, help="output rows per layer")
    ap.add_argument("--out", default="artifacts/bench/quality.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    shapes = [s for s in PI05_SHAPES if args.full or s[1] <= 8192]
    layers = [
        make_layer(f"{name}#{seed}", n_in, n_out, kind, seed=1000 * seed + i, max_rows=args.rows)
        for seed in range(args.seeds)
        for i, (name, n_in, n_out, kind) in enumerate(shapes)
    ]
    results: dict[str, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for label, (config, calib) in CASES.items():
        results[label] = {la.name: evaluate(la, config, calib) for la in layers}
        print(f"  {label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    rtn = results["RTN (absmax)"]
    print(f"output SQNR (dB) over {len(layers)} synthetic pi0.5-shaped layers (independent outliers), W4A8")
    header = f"{'case':<58}{'per-token mean':>15}{'worst':>8}{'vs RTN':>8}{'static mean':>13}{'worst':>8}{'W only':>8}"
    print(header)
    summary = {}
    for label, per_layer in results.items():
        row = {}
        for mode in ("per_token", "static", "weights_only"):
            vals = [r[mode] for r in per_layer.values()]
            row[mode] = {"mean": float(np.mean(vals)), "worst": float(np.min(vals))}
        row["gain_vs_rtn_db"] = row["per_token"]["mean"] - float(np.mean([r["per_token"] for r in rtn.values()]))
        summary[label] = row
        print(
            f"{label:<58}{row['per_token']['mean']:>15.2f}{row['per_token']['worst']:>8.2f}"
            f"{row['gain_vs_rtn_db']:>+8.2f}{row['static']['mean']:>13.2f}{row['static']['worst']:>8.2f}"
            f"{row['weights_only']['mean']:>8.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"layers": [la.name for la in layers], "summary": summary, "per_layer": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
