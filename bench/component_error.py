"""Demo model, end to end: each component's output error against fp32, per method.

Cases, all on the layers ``--config`` selects (default full_w4a8):
  * RTN W4A8 baseline (per-row absmax int4 weights, per-token int8 activations, no transform);
  * the seed's svd method (``*_seed`` settings), block Hadamard alone (the previous
    default), the default (per-layer choice among equalized / rotated / plain candidates);
  * the default with calibrated static activations (runtime ``calibrate``);
  * ``--calib`` builds from statistics captured with ``capture_stats`` (the calib preset:
    per-layer choice with SmoothQuant candidates + GPTQ, per-token and with the bundle's
    own static scales).

    python bench/component_error.py [--config full_w4a8] [--checkpoint artifacts/demo]

Prints a table and writes artifacts/bench/component_error.json. Calibration and
statistics use batches drawn like the evaluation inputs but from other seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baselines import RTNLinear
from cases import recipes
from duquant_pipeline.build import build_bundle
from duquant_pipeline.demo_model import component_inputs, load_demo_model
from duquant_runtime import calibrate, capture_stats, load_bundle
from duquant_runtime.config import DuQuantConfig, resolve
from torch import nn


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def errors(model: nn.Module, inputs: dict, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {c: rel_error(o, reference[c]) for c, o in run_components(model, inputs).items()}


def run_components(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {c: getattr(model, c)(*args) for c, args in inputs.items()}


def capture(base: nn.Module, cfg: DuQuantConfig, batches: int, path: Path) -> Path:
    with torch.no_grad(), capture_stats(base, cfg) as stats:
        for seed in range(1, batches + 1):
            run_components(base, component_inputs(base.dims, seed=seed))
    return stats.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full_w4a8")
    ap.add_argument("--checkpoint", default="artifacts/demo")
    ap.add_argument("--out", default="artifacts")
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument(
        "--recipes",
        default="",
        help="compare only these data-free recipes (bench/cases.py), e.g. unweighted,default,simple",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)

    cfg = resolve(args.config)
    seed, calib = resolve("full_w4a8_seed"), resolve("full_w4a8_calib")
    cases: dict[str, tuple[DuQuantConfig, bool]] = {  # label -> (config, built with --calib)
        "svd (seed method)": (cfg.replace(transform=seed.transform, quant=seed.quant), False),
        "hadamard 64 only (prev. default)": (cfg.replace("transform", equalize=(), rtn_candidate=False), False),
        "default (per-layer choice)": (cfg, False),
        "default, calibrated static": (cfg.replace("quant", act_mode="per_channel_static"), False),
        "calib preset": (cfg.replace(transform=calib.transform, quant=calib.quant), True),
        "calib preset, static": (
            cfg.replace(transform=calib.transform, quant=calib.quant).replace("quant", act_mode="per_channel_static"),
            True,
        ),
    }
    if args.recipes:
        cases = {label: (c, False) for label, c in recipes(cfg, args.recipes).items()}
    base = load_demo_model(args.checkpoint, torch.float32)
    stats_path = capture(base, cfg, args.calib_batches, Path(args.out) / "bench" / f"stats-{args.config}.h5")
    inputs = component_inputs(base.dims, seed=0)
    reference = run_components(base, inputs)
    results: dict[str, dict[str, float]] = {}
    replaced: list[str] = []
    for label, (c, calib) in cases.items():
        c = c.replace(name=f"{args.config}_bench_{len(results)}")
        bundle = build_bundle(c, args.checkpoint, Path(args.out) / "bench", calib=stats_path if calib else None)
        model = copy.deepcopy(base)
        replaced = load_bundle(model, bundle.path, c).replaced
        if c.quant.act_mode == "per_channel_static" and not calib:
            with torch.no_grad(), calibrate(model):
                for seed in range(1, args.calib_batches + 1):
                    run_components(model, component_inputs(base.dims, seed=seed))
        results[label] = errors(model, inputs, reference)
        del model

    rtn = copy.deepcopy(base)
    for name in replaced:
        if not isinstance(rtn.get_submodule(name), nn.Linear):  # a quantized table: RTN is for Linears
            continue
        parent, _, child = name.rpartition(".")
        setattr(rtn.get_submodule(parent), child, RTNLinear(rtn.get_submodule(name)))
    results = {"RTN W4A8 baseline": errors(rtn, inputs, reference), **results}

    comps = list(inputs)
    print(f"{args.config} on {args.checkpoint}: relative L2 output error vs fp32, per component (lower is better)")
    rtn = results["RTN W4A8 baseline"]
    print(f"{'case':<34}" + "".join(f"{c:>17}" for c in comps))
    for case, errs in results.items():
        print(f"{case:<34}" + "".join(f"{errs[c]:>9.4f} ({errs[c] / rtn[c]:.2f})" for c in comps))
    print("(in parentheses: the ratio to RTN's error)")
    out = Path(args.out) / "bench" / "component_error.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "checkpoint": args.checkpoint, "errors": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
