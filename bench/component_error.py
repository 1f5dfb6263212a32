"""Demo model, end to end: each component's output error against fp, (memory: bench/memory.py).

Cases, on the same layers (the bundle's): the bundle with per-token dynamic activations,
the bundle with calibrated static activations, and a plain round-to-nearest W4A8 baseline
(per-row absmax int4 weights, per-token int8 activations, no rotation or permutation).

    python bench/component_error.py --config full_w4a8 [--checkpoint artifacts/demo]

Prints a table and writes artifacts/bench/component_error.json. Calibration uses
batches drawn like the evaluation inputs but from other seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from duquant_pipeline.build import build_bundle
from duquant_pipeline.demo_model import component_inputs, load_demo_model
from duquant_runtime import calibrate, load_bundle
from duquant_runtime.config import resolve
from torch import nn


class RTNLinear(nn.Module):
    """Plain W4A8 round-to-nearest: the baseline every rotation method must beat."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 4, act_bits: int = 8) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        q = 2 ** (weight_bits - 1) - 1
        scale = (w.abs().amax(dim=1, keepdim=True) / q).clamp_min(1e-10)
        self.register_buffer("weight", (torch.clamp(torch.round(w / scale), -q - 1, q) * scale).to(linear.weight.dtype))
        self.bias = linear.bias
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = 2 ** (self.act_bits - 1) - 1
        s = (x.detach().float().abs().amax(-1, keepdim=True) / q).clamp_min(1e-8)
        xq = (torch.clamp(torch.round(x.float() / s), -q - 1, q) * s).to(x.dtype)
        return nn.functional.linear(xq, self.weight, self.bias)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def errors(model: nn.Module, inputs: dict, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    return {c: rel_error(o, reference[c]) for c, o in run_components(model, inputs).items()}


def run_components(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {c: getattr(model, c)(*args) for c, args in inputs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="full_w4a8")
    ap.add_argument("--checkpoint", default="artifacts/demo")
    ap.add_argument("--out", default="artifacts")
    ap.add_argument("--calib-batches", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)

    cfg = resolve(args.config)
    static_cfg = cfg.replace("quant", act_mode="per_channel_static", calib_steps=args.calib_batches)
    bundles = {
        mode: build_bundle(c, args.checkpoint, args.out).path for mode, c in (("dynamic", cfg), ("static", static_cfg))
    }

    base = load_demo_model(args.checkpoint, torch.float32)
    inputs = component_inputs(base.dims, seed=0)
    reference = run_components(base, inputs)
    results: dict[str, dict[str, float]] = {}

    dynamic = copy.deepcopy(base)
    report = load_bundle(dynamic, bundles["dynamic"], cfg)
    results["svd, per-token dynamic"] = errors(dynamic, inputs, reference)
    del dynamic

    static = copy.deepcopy(base)
    load_bundle(static, bundles["static"], static_cfg)
    with torch.no_grad(), calibrate(static):
        for seed in range(1, args.calib_batches + 1):
            run_components(static, component_inputs(base.dims, seed=seed))
    results["svd, calibrated static"] = errors(static, inputs, reference)
    del static

    rtn = copy.deepcopy(base)
    for name in report.replaced:
        parent, _, child = name.rpartition(".")
        setattr(rtn.get_submodule(parent), child, RTNLinear(rtn.get_submodule(name)))
    results["RTN W4A8 baseline"] = errors(rtn, inputs, reference)

    comps = list(inputs)
    print(f"{args.config} on {args.checkpoint}: relative L2 output error vs fp32, per component")
    print(f"{'case':<26}" + "".join(f"{c:>10}" for c in comps))
    for case, errs in results.items():
        print(f"{case:<26}" + "".join(f"{errs[c]:>10.4f}" for c in comps))
    out = Path(args.out) / "bench" / "component_error.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "checkpoint": args.checkpoint, "errors": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
