"""Per-layer output SQNR of every method and option on synthetic pi0.5-shaped layers.

    python bench/quality.py [--full] [--seeds 2]

Each case packs the layer with the pipeline's own code (compute_transform, weight
quantization) and runs it in float64 exactly as the runtime does (bench/synthetic.py
documents the layer generator). Output SQNR = 10·log10(‖XWᵀ‖² / ‖XWᵀ - layer(X)‖²) on
evaluation tokens that calibration never saw, with per-token dynamic int8 activations
and with static per-channel int8 scales calibrated on the calibration tokens.

Baselines: RTN (no transform, per-row absmax int4, as plain W4A8) and RTN with the MSE
clip search; the seed's svd and its permutation-free / rotation-free variants.
Calibrated cases ("+calib") use statistics of the calibration tokens.
Without --full the 16384-wide LLM down_proj is skipped (GPTQ's 16384² Cholesky alone
takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from duquant_pipeline.algorithm import Transform, compute_transform, transformed_hessian
from duquant_pipeline.quality import simulate, sqnr_db, static_scales
from duquant_pipeline.weightquant import quantize_weight
from duquant_runtime.config import TransformConfig
from duquant_runtime.stats import LayerStats
from synthetic import PI05_SHAPES, SyntheticLayer, make_layer

HAD = {"method": "hadamard", "row_rot": "0", "permute": False}
DUQ = {"method": "duquant", "row_rot": "0"}


@dataclass(frozen=True)
class Case:
    label: str
    transform: dict | None  # None: no transform (RTN)
    search: str = "alpha"
    calib: bool = False  # statistics used (activation-aware search, smoothing, duquant peaks)
    gptq: bool = False
    rotation: bool = True  # False: keep the permutation, drop svd's rotations
    extra: dict = field(default_factory=dict)


CASES = (
    Case("RTN (absmax)", None, search="absmax"),
    Case("RTN (mse)", None, search="mse"),
    Case("svd (seed)", {"method": "svd"}),
    Case("svd, permutation-free", {"method": "svd", "permute": False}),
    Case("svd, no row rotation", {"method": "svd", "row_rot": "0"}),
    Case("svd, rotation-free (perm only)", {"method": "svd", "row_rot": "0"}, rotation=False),
    Case("hadamard 16", {**HAD, "block_size": 16}, search="mse"),
    Case("hadamard 32", {**HAD, "block_size": 32}, search="mse"),
    Case("hadamard 64 (default)", {**HAD, "block_size": 64}, search="mse"),
    Case("hadamard 128", {**HAD, "block_size": 128}, search="mse"),
    Case("hadamard 64 + signs", {**HAD, "block_size": 64, "hadamard_signs": True}, search="mse"),
    Case("hadamard 64, alpha search", {**HAD, "block_size": 64}),
    Case("duquant 16", {**DUQ, "block_size": 16}, search="mse"),
    Case("duquant 64", {**DUQ, "block_size": 64}, search="mse"),
    Case("duquant 128", {**DUQ, "block_size": 128}, search="mse"),
    Case("RTN + calib + gptq", None, search="mse", calib=True, gptq=True),
    Case("hadamard 64 + calib", {**HAD, "block_size": 64}, search="mse", calib=True),
    Case("hadamard 64 + calib + smooth 0.5", {**HAD, "block_size": 64, "smooth_alpha": 0.5}, "mse", calib=True),
    Case("hadamard 64 + calib + gptq", {**HAD, "block_size": 64}, search="mse", calib=True, gptq=True),
    Case(
        "hadamard 64 + calib + smooth + gptq (calib preset)",
        {**HAD, "block_size": 64, "smooth_alpha": 0.5},
        "mse",
        calib=True,
        gptq=True,
    ),
    Case("duquant 64 + calib", {**DUQ, "block_size": 64}, search="mse", calib=True),
    Case("duquant 64 + calib + gptq", {**DUQ, "block_size": 64}, search="mse", calib=True, gptq=True),
)


def stats_of(x: np.ndarray) -> LayerStats:
    xd = x.astype(np.float64)
    return LayerStats(
        absmax=np.abs(x).max(axis=0),
        percentile=np.percentile(np.abs(x), 99.9, axis=0).astype(np.float32),
        gram=(xd.T @ xd / x.shape[0])[None].astype(np.float32),
        sample=x,
        tokens=x.shape[0],
    )


def identity_transform(w: np.ndarray, block: int = 16) -> Transform:
    return Transform(None, np.tile(np.eye(block), (-(-w.shape[1] // block), 1, 1)), None, w)


def pack_case(layer: SyntheticLayer, case: Case, stats: LayerStats) -> tuple[Transform, np.ndarray, np.ndarray]:
    w = layer.weight
    if case.transform is None:
        tr = identity_transform(w)
    else:
        tcfg = TransformConfig(**{"block_size": 16, **case.transform})
        tr = compute_transform(w, tcfg, stats if case.calib else None)
        if not case.rotation:  # the permutation alone
            tr = Transform(tr.perm, np.tile(np.eye(16), (tr.r_in.shape[0], 1, 1)), None, w[:, tr.perm])
    hessian = transformed_hessian(tr, stats.hessian()) if case.calib else None
    if case.search == "absmax":
        q = 7
        scales = np.maximum(np.abs(tr.w_t).max(axis=1) / q, 1e-10).astype(np.float32)
        codes = np.clip(np.round(tr.w_t / scales[:, None].astype(np.float64)), -q - 1, q).astype(np.int8)
        return tr, codes, scales
    codes, scales, _ = quantize_weight(torch.from_numpy(tr.w_t), 4, search=case.search, hessian=hessian, gptq=case.gptq)
    return tr, codes, scales


def evaluate(layer: SyntheticLayer, case: Case) -> dict[str, float]:
    stats = stats_of(layer.calib)
    tr, codes, scales = pack_case(layer, case, stats)
    x = torch.from_numpy(layer.evaluation).double()
    y = x @ torch.from_numpy(layer.weight).t()
    act_static = static_scales(tr, layer.calib, 8, 99.9)
    return {
        "per_token": sqnr_db(y, simulate(tr, codes, scales, x, 8)),
        "static": sqnr_db(y, simulate(tr, codes, scales, x, 8, act_static)),
        "weights_only": sqnr_db(y, simulate(tr, codes, scales, x, 0)),
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
    for case in CASES:
        results[case.label] = {la.name: evaluate(la, case) for la in layers}
        print(f"  {case.label}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    base = {mode: np.mean([r[mode] for r in results["RTN (absmax)"].values()]) for mode in ("per_token", "static")}
    base_worst = {mode: min(r[mode] for r in results["RTN (absmax)"].values()) for mode in ("per_token", "static")}
    print(f"output SQNR (dB) over {len(layers)} synthetic pi0.5-shaped layers, W4A8")
    header = f"{'case':<52}{'per-token mean':>15}{'worst':>8}{'vs RTN':>8}{'static mean':>13}{'worst':>8}{'W only':>8}"
    print(header)
    summary = {}
    for label, per_layer in results.items():
        row = {}
        for mode in ("per_token", "static", "weights_only"):
            vals = [r[mode] for r in per_layer.values()]
            row[mode] = {"mean": float(np.mean(vals)), "worst": float(np.min(vals))}
        row["gain_vs_rtn_db"] = row["per_token"]["mean"] - base["per_token"]
        summary[label] = row
        print(
            f"{label:<52}{row['per_token']['mean']:>15.2f}{row['per_token']['worst']:>8.2f}"
            f"{row['gain_vs_rtn_db']:>+8.2f}{row['static']['mean']:>13.2f}{row['static']['worst']:>8.2f}"
            f"{row['weights_only']['mean']:>8.2f}"
        )
    print(f"RTN (absmax) worst layer: per-token {base_worst['per_token']:.2f} dB, static {base_worst['static']:.2f} dB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"layers": [la.name for la in layers], "summary": summary, "per_layer": results}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
