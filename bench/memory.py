"""Memory of a model before and after load_bundle (codes storage), in a fresh process.

    python bench/memory.py --checkpoint artifacts/demo-full --bundle artifacts/llm_w4a8/llm_w4a8-<fp12>.h5

Loads the demo tree in bf16, measures, swaps the bundle's layers in, frees the old weights
(gc + malloc_trim, so freed pages really go back to the OS), measures again. Two whole-model
figures, each against the bf16 model in the same run: the bytes of every parameter and buffer
(each storage once: a rotation shared by layers, a tied pair) and the process's RSS (all of it:
the interpreter and torch included). Prints a table and writes artifacts/bench/memory.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import time
from pathlib import Path

import torch
from duquant_pipeline.demo_model import load_demo_model
from duquant_runtime import load_bundle
from duquant_runtime.config import component_of


def rss_mib() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def storage_mib(model: torch.nn.Module) -> float:
    """Bytes of every parameter and buffer of ``model``, each storage once."""
    seen: dict[tuple[int, int], int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen[(t.untyped_storage().data_ptr(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values()) / 2**20


def process_rss_mib() -> float:
    rss_mib()  # collect and trim first
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--weight-storage", default="codes", choices=["codes", "dequant"])
    ap.add_argument("--out", default="artifacts/bench/memory.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rss_start = rss_mib()
    model = load_demo_model(args.checkpoint, torch.bfloat16)
    rss_model = rss_mib()
    storage_bf16, process_bf16 = storage_mib(model), process_rss_mib()
    start = time.perf_counter()
    report = load_bundle(model, args.bundle, weight_storage=args.weight_storage)
    load_s = time.perf_counter() - start
    rss_loaded = rss_mib()
    storage_loaded, process_loaded = storage_mib(model), process_rss_mib()
    per: dict[str, dict[str, float]] = {}
    seen: set[tuple[int, int]] = set()  # a rotation shared by layers of one width counts once
    for name in report.replaced:
        layer = model.get_submodule(name)
        comp = per.setdefault(component_of(name), {"layers": 0, "bf16_MiB": 0.0, "held_MiB": 0.0})
        comp["layers"] += 1
        comp["bf16_MiB"] += 2 * layer.weight.numel() / 2**20
        for buf in layer.buffers():
            key = (buf.untyped_storage().data_ptr(), buf.numel())
            if key not in seen:
                seen.add(key)
                comp["held_MiB"] += buf.numel() * buf.element_size() / 2**20
    result = {
        "checkpoint": args.checkpoint,
        "bundle": args.bundle,
        "weight_storage": args.weight_storage,
        "load_seconds": load_s,
        "rss_model_MiB": rss_model - rss_start,
        "rss_after_load_MiB": rss_loaded - rss_start,
        "rss_saved_MiB": rss_model - rss_loaded,
        "replaced_bf16_MiB": report.bytes_before / 2**20,
        "replaced_held_MiB": report.bytes_after / 2**20,
        "components": per,
        "model_storage_bf16_MiB": storage_bf16,
        "model_storage_loaded_MiB": storage_loaded,
        "process_rss_bf16_MiB": process_bf16,
        "process_rss_loaded_MiB": process_loaded,
    }
    print(f"{Path(args.bundle).name} on {args.checkpoint} (bf16 model, {args.weight_storage} storage)")
    print(f"{'component':<10}{'layers':>8}{'bf16 MiB':>12}{'held MiB':>12}{'ratio':>8}   (shared buffers once)")
    for comp, c in sorted(per.items()):
        ratio = c["held_MiB"] / c["bf16_MiB"]
        print(f"{comp:<10}{c['layers']:>8}{c['bf16_MiB']:>12.1f}{c['held_MiB']:>12.1f}{ratio:>8.3f}")
    total = sum(c["held_MiB"] for c in per.values()) / sum(c["bf16_MiB"] for c in per.values())
    print(f"{'all':<10}{len(report.replaced):>8}{'':>12}{'':>12}{total:>8.3f}")
    print(
        f"RSS of the model: {result['rss_model_MiB']:.0f} MiB -> {result['rss_after_load_MiB']:.0f} MiB after "
        f"load_bundle (saved {result['rss_saved_MiB']:.0f} MiB; the replaced weights were "
        f"{result['replaced_bf16_MiB']:.0f} MiB, their quantized buffers {result['replaced_held_MiB']:.0f} MiB); "
        f"load_bundle took {load_s:.2f} s"
    )
    print(
        f"whole model, parameters and buffers (each storage once): {storage_bf16:.0f} MiB bf16 -> "
        f"{storage_loaded:.0f} MiB ({storage_loaded / storage_bf16:.3f}x)"
    )
    print(
        f"whole process RSS: {process_bf16:.0f} MiB with the bf16 model -> {process_loaded:.0f} MiB "
        f"({process_loaded / process_bf16:.3f}x)"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
