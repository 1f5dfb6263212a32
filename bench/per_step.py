"""Per-step static activation scales on a time-conditioned expert, end to end through the product.

    python bench/per_step.py [--seeds 0,1] [--layers 4]

Testbed (``bench/timecond.py``): transformers' Gemma expert with adaRMSNorm time conditioning,
openpi's 10-step flow loop and coupled outliers. For each case the float policy's checkpoint is
written with ``safetensors.torch.save_model``, a bundle of the expert's Linears is built (with
``--calib`` statistics captured on the instrumented float policy for the static cases), loaded
with ``load_bundle`` onto an instrumented copy, and measured on noise and context the
calibration never saw:

* the action chunk's error against the float policy's (same noise and context), relative to the
  float chunk's displacement from its noise ‖x₀ - x₁‖: the part the policy computes (the shared
  noise would otherwise dilute every error alike);
* what each head outside the expert (``action_in_proj``, ``action_out_proj``, ``time_mlp_*``) costs
  alone at RTN W4A4, the expert in float;
* per layer, the output SQNR on the layer's real inputs at every step (captured from the float
  policy), each input run at its own step; mean and worst over the layers.

Cases: plain RTN W4A8 with dynamic activations (``baselines.RTNLinear``, no transform); the
default transform at W4A8 (``dit_w4a8``) and W4A4 (``dit_w4a4``) with per-token dynamic, shared static
(``per_channel_static``) and per-step static activations. Prints a table and writes
artifacts/bench/per_step.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import RTNLinear
from cases import W4A4_CASES, recipes
from duquant_pipeline.build import build_bundle
from duquant_pipeline.quality import sqnr_db
from duquant_pipeline.recipe import statistics_needed
from duquant_runtime import DuQuantLinear, capture_stats, flow_step, instrument, load_bundle
from duquant_runtime.config import DuQuantConfig, matches, resolve
from timecond import TimeCondPolicy, build_timecond, flow_batch
from trained import swap

CALIB_SEEDS = tuple(range(100, 108))
EVAL_SEEDS = (0, 1)
MODES = ("per_token_dynamic", "per_channel_static", "per_step_static")
HEADS = (("action_in_proj",), ("action_out_proj",), ("time_mlp_in", "time_mlp_out"))


def case_configs(percentile: float | None = None, only_recipes: str = "") -> dict[str, DuQuantConfig]:
    """W4A8 cases from ``dit_w4a8``, W4A4 from ``dit_w4a4`` (its act_percentile 99), each activation mode;
    ``only_recipes``: bench/cases.py's data-free recipes of ``dit_w4a8`` (per-token dynamic) instead."""
    if only_recipes == "w4a4":  # the presets' quant and transform on dit_w4a8's selection
        expert = resolve("dit_w4a8")
        return {
            label: expert.replace(name=preset, quant=resolve(preset).quant, transform=resolve(preset).transform)
            for label, (preset, _) in W4A4_CASES.items()
        }
    if only_recipes:
        return {f"W4A8 dynamic, {k}": c for k, c in recipes(resolve("dit_w4a8"), only_recipes).items()}
    out = {}
    for bits, preset in ((8, "dit_w4a8"), (4, "dit_w4a4")):
        base = resolve(preset)
        pct = base.quant.act_percentile if percentile is None else percentile
        for mode in MODES:
            changes = {"act_bits": bits, "act_mode": mode, "calib_steps": len(CALIB_SEEDS), "act_percentile": pct}
            out[f"W4A{bits} {mode}"] = base.replace("quant", **changes)
    return out


def chunk(model: TimeCondPolicy, seed: int) -> torch.Tensor:
    return model.sample_actions(*flow_batch(seed=seed))


def chunk_error(got: torch.Tensor, want: torch.Tensor, seed: int) -> float:
    noise = flow_batch(seed=seed)[1]
    return float((got - want).norm() / (want - noise).norm())


def step_inputs(model: TimeCondPolicy, names: list[str], seeds: tuple[int, ...]) -> dict[str, list]:
    """Each layer's inputs on the float policy, with the flow time they ran at."""
    clock = instrument(model)
    modules = dict(model.named_modules())
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [
        modules[n].register_forward_pre_hook(lambda _m, a, n=n: seen[n].append((clock.value, a[0].detach())))
        for n in names
    ]
    for seed in seeds:
        chunk(model, seed)
    for h in hooks:
        h.remove()
    return seen


def layer_sqnr(quantized: nn.Module, float_model: nn.Module, inputs: dict[str, list]) -> dict[str, float]:
    qmods, fmods = dict(quantized.named_modules()), dict(float_model.named_modules())
    out = {}
    if not any(isinstance(qmods[n], DuQuantLinear | RTNLinear) for n in inputs):
        return {n: float("inf") for n in inputs}  # the expert is untouched (a head case)
    with torch.no_grad():
        for name, rows in inputs.items():
            ref, got = [], []
            for time, x in rows:
                ref.append(fmods[name](x).reshape(-1))
                with flow_step(quantized, time=time):
                    got.append(qmods[name](x).reshape(-1))
            out[name] = sqnr_db(torch.cat(ref), torch.cat(got))
    return out


def evaluate(
    seed: int,
    layers: int,
    work: Path,
    percentile: float | None = None,
    only: str = "",
    step_rows: int = 256,
    only_recipes: str = "",
) -> dict[str, dict]:
    from safetensors.torch import save_model

    float_model = build_timecond(seed=seed, layers=layers)
    cases = {k: v for k, v in case_configs(percentile, only_recipes).items() if only in k}
    names = matches(
        next(iter(cases.values())).select, [n for n, m in float_model.named_modules() if isinstance(m, nn.Linear)]
    )
    ckpt = work / f"seed{seed}" / "model.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_model(float_model, str(ckpt))
    reference = {s: chunk(float_model, s) for s in EVAL_SEEDS}
    inputs = step_inputs(copy.deepcopy(float_model), names, EVAL_SEEDS[:1])
    results: dict[str, dict] = {}

    def record(label: str, model: nn.Module) -> None:
        errors = [chunk_error(chunk(model, s), reference[s], s) for s in EVAL_SEEDS]
        sqnr = layer_sqnr(model, float_model, inputs)
        results[label] = {
            "action_error": sum(errors) / len(errors),
            "layer_sqnr_mean": sum(sqnr.values()) / len(sqnr),
            "layer_sqnr_min": min(sqnr.values()),
            "worst_layer": min(sqnr, key=sqnr.get),
        }
        r = results[label]
        print(
            f"  seed {seed} {label:<32} action error {r['action_error']:.4f}  "
            f"worst {r['worst_layer']} {r['layer_sqnr_min']:.2f} dB",
            flush=True,
        )

    rtn = swap(float_model, names, RTNLinear)
    instrument(rtn)
    record("RTN W4A8 dynamic", rtn)
    rtn4 = swap(float_model, names, lambda lin: RTNLinear(lin, act_bits=4))
    instrument(rtn4)
    record("RTN W4A4 dynamic", rtn4)
    for heads in HEADS:  # outside the expert, left in float by dit_w4a4: what one costs at W4A4 alone
        record(f"head {'+'.join(heads)} RTN W4A4", swap(float_model, list(heads), lambda x: RTNLinear(x, act_bits=4)))
    for label, config in cases.items():
        calib = None
        if config.quant.act_mode != "per_token_dynamic" or statistics_needed(config):
            calib = work / f"seed{seed}" / f"{config.name}-{config.quant.act_mode}.h5"
            if not calib.exists():
                captured = copy.deepcopy(float_model)
                instrument(captured)
                with capture_stats(captured, config, step_rows=step_rows) as stats:
                    for s in CALIB_SEEDS:
                        chunk(captured, s)
                stats.save(calib)
        bundle = build_bundle(config, ckpt, work / f"seed{seed}" / "bundles", jobs=1, calib=calib).path
        model = copy.deepcopy(float_model)
        instrument(model)
        load_bundle(model, bundle, expect_config=config)
        record(label, model)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--act-percentile", type=float, default=None, help="override the preset's act_percentile")
    parser.add_argument("--cases", default="", help="only the cases whose label contains this")
    parser.add_argument(
        "--recipes",
        default="",
        help="compare only these data-free recipes (bench/cases.py), or 'w4a4': W4A8 data-free / --calib, W4A4 --calib",
    )
    parser.add_argument("--step-rows", type=int, default=256, help="capture_stats' rows kept per denoising step")
    parser.add_argument("--out", default="artifacts/bench/per_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        per_seed = {
            seed: evaluate(seed, args.layers, Path(tmp), args.act_percentile, args.cases, args.step_rows, args.recipes)
            for seed in seeds
        }
    labels = list(per_seed[seeds[0]])
    mean = {
        label: {
            k: sum(per_seed[s][label][k] for s in seeds) / len(seeds)
            for k in ("action_error", "layer_sqnr_mean", "layer_sqnr_min")
        }
        for label in labels
    }
    print(f"\ntime-conditioned expert, {args.layers} layers, seeds {args.seeds}: mean over seeds")
    print(f"{'case':<34}{'action err':>11}{'vs RTN A8':>10}{'SQNR mean':>10}{'SQNR min':>9}")
    dyn = mean["RTN W4A8 dynamic"]["action_error"]
    for label in labels:
        m = mean[label]
        print(
            f"{label:<34}{m['action_error']:>11.4f}{m['action_error'] / dyn:>9.2f}x"
            f"{m['layer_sqnr_mean']:>10.2f}{m['layer_sqnr_min']:>9.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"seeds": seeds, "layers": args.layers, "per_seed": per_seed, "mean": mean}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
