"""Bundles under openpi's compiled ``sample_actions``: graphs, graph breaks, recompiles, time.

    python bench/compile_steps.py [--layers 4] [--backends eager,inductor] [--mode max-autotune]

Testbed (``bench/timecond.py``): transformers' Gemma expert with adaRMSNorm and openpi's
``sample_actions`` loop (``while time >= -dt / 2`` on float32 tensors). Each case is built as
openpi builds its policy: ``sample_actions`` wrapped in ``torch.compile`` first, then
``instrument`` and ``load_bundle``. Cases: the float policy, the expert at ``dit_w4a8``
(per-token dynamic activations, no step state) and at ``dit_w4a4`` (per-step static scales
from ``--calib``). Per backend, measured side by side in one process, one thread:

* dynamo's counters after the first call and after the second (unique graphs, graph breaks):
  a second call that compiles nothing leaves them unchanged;
* the first call's wall time (compiling included) and the second's, against the same case eager;
* the compiled actions' relative difference from the same case run eagerly.

Prints a table and writes artifacts/bench/compile_steps.json.
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
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).parent))
from duquant_pipeline.build import build_bundle
from duquant_runtime import capture_stats, instrument, load_bundle
from duquant_runtime.config import resolve
from timecond import TimeCondPolicy, build_timecond, flow_batch

CASES = {"float": None, "dit_w4a8 (dynamic)": "dit_w4a8", "dit_w4a4 (per-step)": "dit_w4a4"}
CALIB_SEEDS = tuple(range(100, 104))
EVAL_SEED = 0


def bundles(float_model: TimeCondPolicy, work: Path) -> dict[str, Path]:
    """Each quantized case's bundle, the per-step one calibrated on the instrumented float policy."""
    from safetensors.torch import save_model

    ckpt = work / "model.safetensors"
    save_model(float_model, str(ckpt))
    out = {}
    for label, preset in CASES.items():
        if preset is None:
            continue
        config = resolve(preset)
        calib = None
        if config.quant.per_step:
            captured = copy.deepcopy(float_model)
            instrument(captured)
            with capture_stats(captured, config) as stats:
                for seed in CALIB_SEEDS:
                    captured.sample_actions(*flow_batch(seed=seed))
            calib = stats.save(work / f"{preset}.h5")
        out[label] = build_bundle(config, ckpt, work / "bundles", jobs=1, calib=calib).path
    return out


def policy(float_model: TimeCondPolicy, bundle: Path | None, compile_kw: dict | None) -> TimeCondPolicy:
    """openpi's order: compile sample_actions at construction, then instrument and load."""
    model = copy.deepcopy(float_model)
    if compile_kw is not None:
        model.sample_actions = torch.compile(model.sample_actions, **compile_kw)
    if bundle is not None:
        instrument(model)
        load_bundle(model, bundle)
    return model


def timed(model: TimeCondPolicy) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    actions = model.sample_actions(*flow_batch(seed=EVAL_SEED))
    return time.perf_counter() - start, actions


def counts() -> tuple[int, int]:
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def measure(float_model: TimeCondPolicy, bundle: Path | None, compile_kw: dict) -> dict:
    eager = policy(float_model, bundle, None)
    timed(eager)  # warm
    eager_s, want = timed(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = policy(float_model, bundle, compile_kw)
    first_s, _ = timed(compiled)
    after_first = counts()
    second_s, got = timed(compiled)
    after_second = counts()
    return {
        "graphs": after_first[0],
        "graph_breaks": after_first[1],
        "recompiled_on_second_call": after_second != after_first,
        "first_call_s": first_s,
        "second_call_s": second_s,
        "eager_s": eager_s,
        "diff_vs_eager": float((got - want).norm() / want.norm()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--backends", default="eager,inductor")
    parser.add_argument("--mode", default=None, help="inductor's mode (openpi's default: max-autotune)")
    parser.add_argument("--out", default="artifacts/bench/compile_steps.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    float_model = build_timecond(layers=args.layers)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = bundles(float_model, Path(tmp))
        for backend in args.backends.split(","):
            kw = {"backend": backend, **({"mode": args.mode} if args.mode and backend == "inductor" else {})}
            for label in CASES:
                r = measure(float_model, paths.get(label), kw)
                results[f"{backend} {label}"] = r
                again = "yes" if r["recompiled_on_second_call"] else "no"
                print(
                    f"{backend:<9}{label:<22} graphs {r['graphs']:>2}  breaks {r['graph_breaks']:>2}  "
                    f"recompiled {again:<3}  first {r['first_call_s']:6.1f} s"
                    f"  second {r['second_call_s']:.3f} s = {r['second_call_s'] / r['eager_s']:.2f}x eager"
                    f"  diff vs eager {r['diff_vs_eager']:.1e}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"layers": args.layers, "mode": args.mode, "torch": torch.__version__}
    out.write_text(json.dumps({**meta, **results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
