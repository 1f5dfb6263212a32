"""W4A8 data-free, W4A8 --calib and W4A4 --calib on the demo checkpoint, per component, beside
RTN W4A8 and RTN W4A4: checkpoint -> demo-stats -> build -> load_bundle -> each component.

    python bench/w4a4_demo.py [--checkpoint artifacts/demo] [--eval-seeds 0,100]

The components run as ``duquant_pipeline.demo_stats.run_demo`` runs them: vision and LLM once,
the action expert once per denoising step (``flow_step``, ten steps, inputs drawn per step), so
``full_w4a4``'s per-step expert runs as it would in a denoising loop. Statistics are captured on
seeds 1-8 (``demo-stats``); the evaluation seeds are never seen by them. RTN (bench/baselines.py)
is swapped into the Linears the W4A4 bundle replaced, at the config's weight bits per layer
(the adaptive norms' 8) and per-token activations. Metric: each component's relative L2 error
against fp32, averaged over the evaluation seeds. Prints a table and writes
artifacts/bench/w4a4_demo.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import RTNLinear
from cases import W4A4_CASES
from duquant_pipeline.build import build_bundle
from duquant_pipeline.demo_model import load_demo_model
from duquant_pipeline.demo_stats import capture_demo_stats, run_demo
from duquant_runtime import attach_clock, load_bundle
from duquant_runtime.config import resolve

STEPS = 10


def errors(model: nn.Module, reference: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each component's relative L2 error, averaged over the evaluation seeds."""
    out: dict[str, list[float]] = {}
    for seed, ref in reference.items():
        got = run_demo(model, seed, STEPS)
        for c, r in ref.items():
            out.setdefault(c, []).append(float((got[c] - r).norm() / r.norm()))
    return {c: sum(v) / len(v) for c, v in out.items()}


def a4_summary(figures: dict[str, float | None]) -> str:
    """Where the layers' held-out A4 figures lie: the fallback threshold's evidence."""
    values = sorted(v for v in figures.values() if v is not None)
    under = sum(v < 15.0 for v in values)
    quartiles = [values[int(q * (len(values) - 1))] for q in (0.0, 0.25, 0.5, 0.75, 1.0)]
    return f"min/q1/median/q3/max {' / '.join(f'{v:.1f}' for v in quartiles)} dB, {under} under 15 dB"


def rtn(model: nn.Module, names: list[str], act_bits: int) -> nn.Module:
    quant = resolve("full_w4a4").quant
    out = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, RTNLinear(out.get_submodule(name), quant.bits_for(name), act_bits))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="artifacts/demo")
    ap.add_argument("--eval-seeds", default="0,100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="artifacts/bench/w4a4_demo.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_demo_model(args.checkpoint)
    attach_clock(model)
    reference = {int(s): run_demo(model, int(s), STEPS) for s in args.eval_seeds.split(",")}
    rows: dict[str, dict[str, float]] = {}
    detail: dict[str, dict] = {}
    names: list[str] = []
    with tempfile.TemporaryDirectory(prefix="duquant-w4a4-") as tmp:
        for label, (preset, calib) in W4A4_CASES.items():
            config = resolve(preset)
            stats = capture_demo_stats(args.checkpoint, config, Path(tmp) / f"{preset}.h5") if calib else None
            start = time.perf_counter()
            result = build_bundle(config, args.checkpoint, Path(tmp) / "bundles", calib=stats, jobs=1)
            seconds = time.perf_counter() - start
            loaded = copy.deepcopy(model)
            names = [n for n in load_bundle(loaded, result.path, config).replaced if "embed_tokens" not in n]
            rows[label] = errors(loaded, reference)
            kept = sum("a4_held_out_sqnr_db" in q for q in result.quality.values())
            detail[label] = {"build_seconds": seconds, "a8_fallback_layers": kept, "layers": result.layers}
            if config.quant.act_bits == 4:  # each layer's held-out figure at A4, what the fallback reads
                detail[label]["a4_held_out_sqnr_db"] = {
                    n: q.get("a4_held_out_sqnr_db", q.get("held_out_sqnr_db")) for n, q in result.quality.items()
                }
                print(f"  {label}: A4 held out {a4_summary(detail[label]['a4_held_out_sqnr_db'])}", file=sys.stderr)
            print(f"  {label}: built in {seconds:.0f} s, {kept} layers kept at A8", file=sys.stderr, flush=True)
    table = {f"RTN W4A{bits}": errors(rtn(model, names, bits), reference) for bits in (8, 4)}
    table.update(rows)
    base = table["RTN W4A8"]
    seeds = args.eval_seeds
    print(f"\ndemo ({args.checkpoint}): component relative L2 error vs fp32, seeds {seeds}; (ratio to RTN W4A8)")
    print(f"{'case':<16}" + "".join(f"{c:>18}" for c in base))
    for label, row in table.items():
        print(f"{label:<16}" + "".join(f"{f'{row[c]:.4f} ({row[c] / base[c]:.2f})':>18}" for c in base))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"errors": table, "cases": detail}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
