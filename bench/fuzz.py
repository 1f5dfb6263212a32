"""Fuzz a real bundle: N damaged copies, each read in a child process with a deadline.

    python bench/fuzz.py --bundle artifacts/llm_w4a8/llm_w4a8-<fp12>.h5 --checkpoint artifacts/demo [--cases 1000]

Mutations (tests/fuzz_reader.py): zeroed runs of 1-4096 bytes, copied blocks, bit flips and
truncations, half of them aimed at HDF5 metadata (offsets outside every dataset's payload),
plus random files. Prints the count of each outcome per mutation kind; exits 1 on any
crash, hang or dead child. Writes artifacts/bench/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from duquant_pipeline.checkpoint import Checkpoint
from duquant_runtime.bundle import BundleReader
from fuzz_reader import make_cases, run_cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=20.0)
    ap.add_argument("--out", default="artifacts/bench/fuzz.json")
    args = ap.parse_args()
    with BundleReader(args.bundle) as reader:
        names = reader.header.layer_names
    ckpt = Checkpoint.open(args.checkpoint)
    tensors, layers = {}, {}
    for name in names:
        w = ckpt.read(f"{name}.weight", np.float32)
        tensors[f"{name}.weight"] = w
        has_bias = f"{name}.bias" in ckpt.tensors
        if has_bias:
            tensors[f"{name}.bias"] = ckpt.read(f"{name}.bias", np.float32)
        layers[name] = [w.shape[0], w.shape[1], has_bias]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="duquant-fuzz-") as tmp:
        np.savez(Path(tmp) / "tensors.npz", **tensors)
        spec = {"layers": layers, "tensors": str(Path(tmp) / "tensors.npz")}
        cases = make_cases(Path(args.bundle), Path(tmp) / "cases", args.cases, args.seed, random_files=args.cases // 50)
        results = run_cases(cases, spec, args.deadline)
    counts: dict[str, Counter] = {}
    for kind, outcome, _ in results:
        counts.setdefault(kind, Counter())[outcome.split(":")[0]] += 1
    print(f"{len(results)} cases on {args.bundle} in {time.perf_counter() - start:.0f} s")
    for kind, c in sorted(counts.items()):
        print(f"  {kind:<18} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    slowest = max(results, key=lambda r: r[2])
    print(f"slowest case {slowest[2]:.2f} s ({slowest[0]}, {slowest[1]})")
    bad = [r for r in results if not (r[1] == "ok" or r[1].startswith("refused"))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"counts": {k: dict(v) for k, v in counts.items()}, "bad": bad}, indent=2))
    print(f"wrote {out}")
    if bad:
        print(f"{len(bad)} case(s) crashed, hung or killed the reader: {bad[:5]}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
