"""Build benchmark: whole-model builds with --jobs 1 and --jobs N, and a per-layer
comparison against the straightforward reference, side by side in one run.

    python bench/build.py --checkpoint artifacts/demo-full [--configs full_w4a8,llm_w4a8] [--jobs 2]

1. Whole builds: ``duquant-packs build --force`` in a subprocess per (config, jobs);
   wall time, layers/s, GB/s of source weights, and peak RSS of the whole process tree
   (parent + workers, sampled every 0.25 s from /proc).
2. Reference: on a sample of layers, ``tests/reference.py``'s ``reference_pack`` (per
   layer, sequential, a float64 per-block loop with a full SVD per block: the shape of
   the seed's per-layer code) against this pipeline's ``pack_layer`` for the same layer,
   both single-threaded: with the seed's svd config (same algorithm, same numbers) and
   with the default config.

Prints tables, writes artifacts/bench/build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from duquant_pipeline.build import pack_layer  # noqa: E402
from duquant_pipeline.checkpoint import Checkpoint  # noqa: E402
from duquant_pipeline.select import select_layers  # noqa: E402
from duquant_runtime.config import resolve  # noqa: E402
from reference import reference_pack  # noqa: E402

# One of each kind the reference can do in reasonable time (its full SVD builds an
# in x in matrix per block): LLM k_proj, SigLIP q_proj, expert q_proj.
SAMPLE = (
    "paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.k_proj",
    "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj",
    "paligemma_with_expert.gemma_expert.model.layers.0.self_attn.q_proj",
)


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants, walking /proc/<pid>/task/*/children
    (cheap: listing all of /proc ten times a second cost the builds measurable CPU)."""
    total, stack = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack.extend(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            continue
    return total


def whole_build(config: str, checkpoint: str, jobs: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "duquant_pipeline.cli", "build", "-c", config, "--ckpt", checkpoint]
    cmd += ["--out", out, "--jobs", str(jobs), "--force", "-q"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.25)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"build failed: {stderr.strip()}")
    return {"wall_s": wall, "peak_rss_bytes": peak, "bundle": stdout.strip().splitlines()[-1], "log": stderr.strip()}


def per_layer(checkpoint: str, names: tuple[str, ...]) -> list[dict]:
    torch.set_num_threads(1)
    ckpt = Checkpoint.open(checkpoint)
    seed_cfg, default_cfg = resolve("full_w4a8_seed"), resolve("full_w4a8")
    layers = {la.name: la for la in select_layers(seed_cfg, ckpt)}
    rows = []
    for name in names:
        la = layers[name]
        w = ckpt.read(la.weight)
        t = seed_cfg.transform
        start = time.perf_counter()
        reference_pack(w, block=t.block_size, block_out=t.block_out_size, lam=t.lambda_smooth, bits=la.bits)
        ref = time.perf_counter() - start
        timings = {}
        for label, cfg in (("seed svd", seed_cfg), ("default", default_cfg)):
            start = time.perf_counter()
            pack_layer(w, None, la, la.dtype, cfg)
            timings[label] = time.perf_counter() - start
        rows.append({"layer": name, "shape": [la.out_features, la.in_features], "reference_s": ref, **timings})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="artifacts/demo-full")
    ap.add_argument("--configs", default="full_w4a8,llm_w4a8")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="N for the --jobs N runs")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--bundles", default=None, help="where the builds write (default: a temp dir, removed)")
    ap.add_argument("--out", default="artifacts/bench/build.json")
    args = ap.parse_args()

    ckpt = Checkpoint.open(args.checkpoint)
    results: dict = {"checkpoint": args.checkpoint, "builds": {}, "reference": []}
    print(f"whole builds of {args.checkpoint} ({os.cpu_count()} cores)")
    print(f"{'config':<14}{'jobs':>5}{'layers':>8}{'GB':>7}{'wall s':>9}{'layers/s':>10}{'GB/s':>7}{'peak RSS GB':>13}")
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        tmp = args.bundles or scratch
        for config in args.configs.split(","):
            layers = select_layers(resolve(config), ckpt)
            gb = sum(la.weight_bytes for la in layers) / 1e9
            runs = {}
            for jobs in sorted({1, args.jobs}):
                r = whole_build(config, args.checkpoint, jobs, tmp)
                r.update(layers=len(layers), weight_gb=gb)
                runs[jobs] = r
                print(
                    f"{config:<14}{jobs:>5}{len(layers):>8}{gb:>7.2f}{r['wall_s']:>9.1f}"
                    f"{len(layers) / r['wall_s']:>10.2f}{gb / r['wall_s']:>7.3f}{r['peak_rss_bytes'] / 1e9:>13.2f}"
                )
            if len(runs) == 2:
                speedup = runs[1]["wall_s"] / runs[args.jobs]["wall_s"]
                print(f"{'':<14}--jobs {args.jobs} speedup over --jobs 1: {speedup:.2f}x")
            results["builds"][config] = {str(k): v for k, v in runs.items()}
    if not args.skip_reference:
        print("\nper layer, single thread: reference (seed-style float64 loop) vs this pipeline")
        print(f"{'layer':<44}{'shape':>12}{'reference s':>13}{'seed svd s':>12}{'x':>7}{'default s':>11}{'x':>7}")
        for row in per_layer(args.checkpoint, SAMPLE):
            results["reference"].append(row)
            short = ".".join(row["layer"].split(".")[-4:])
            shape = "x".join(map(str, row["shape"]))
            print(
                f"{short:<44}{shape:>12}{row['reference_s']:>13.2f}{row['seed svd']:>12.2f}"
                f"{row['reference_s'] / row['seed svd']:>7.1f}{row['default']:>11.2f}"
                f"{row['reference_s'] / row['default']:>7.1f}"
            )
        ref = sum(r["reference_s"] for r in results["reference"])
        ours = sum(r["seed svd"] for r in results["reference"])
        print(f"sample total: reference {ref:.1f} s, pipeline (same svd algorithm) {ours:.2f} s: {ref / ours:.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
