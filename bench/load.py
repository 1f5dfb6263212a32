"""Load time: load_bundle vs a plain h5py read of the same datasets, side by side.

    python bench/load.py --checkpoint artifacts/demo --bundle artifacts/full_w4a8/full_w4a8-<fp12>.h5

Warm: the file is in the page cache (each variant runs once first). Cold: the page
cache is dropped before each run with /proc/sys/vm/drop_caches when allowed (root);
otherwise only warm figures are printed, and the JSON says so. Writes artifacts/bench/load.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import h5py
import torch
from duquant_pipeline.demo_model import load_demo_model
from duquant_runtime import load_bundle


def raw_read(path: str) -> int:
    """Every dataset of every layer into NumPy with plain h5py: the floor for any loader."""
    total = 0
    with h5py.File(path, "r") as f:
        for group in f["layers"].values():
            for ds in group.values():
                total += ds[()].nbytes
    return total


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="artifacts/bench/load.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_demo_model(args.checkpoint, torch.bfloat16)

    def run(name: str) -> float:
        target = copy.deepcopy(model) if name.startswith("load_bundle") else None
        start = time.perf_counter()
        if name == "raw h5py read":
            raw_read(args.bundle)
        else:
            load_bundle(target, args.bundle, verify="signature" if name.endswith("signature)") else "shapes")
        return time.perf_counter() - start

    names = ["raw h5py read", "load_bundle (verify=shapes)", "load_bundle (verify=signature)"]
    results: dict[str, dict[str, float]] = {}
    for mode in ("warm", "cold"):
        if mode == "cold" and not drop_caches():
            print("cold: skipped (cannot drop the page cache here: not allowed)")
            break
        samples: dict[str, list[float]] = {n: [] for n in names}
        if mode == "warm":
            for n in names:
                run(n)
        for _ in range(args.repeats):
            for n in names:  # interleaved: drift hits every variant alike
                if mode == "cold":
                    drop_caches()
                samples[n].append(run(n))
        results[mode] = {n: statistics.median(v) for n, v in samples.items()}
    size = os.path.getsize(args.bundle)
    print(f"{Path(args.bundle).name} ({size / 2**20:.1f} MiB), median of {args.repeats}")
    print(f"{'variant':<32}" + "".join(f"{m + ' s':>10}{m + ' ratio':>13}" for m in results))
    for n in names:
        cells = "".join(f"{results[m][n]:>10.3f}{results[m][n] / results[m][names[0]]:>13.2f}" for m in results)
        print(f"{n:<32}{cells}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": args.bundle, "bytes": size, "seconds": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
