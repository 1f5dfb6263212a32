"""What reading ``.weight`` costs inside an openpi-style forward, before and after LazyWeight.

    python bench/weight_read.py [--repeats 20] [--tokens 50]

One transformers ``GemmaDecoderLayer`` at the pi0.5 action expert's size (1024 wide, MLP
4096, 8 heads x 256, 1 KV head), its 7 Linears swapped for int4 ``DuQuantLinear`` layers
(the default preset's packs). Each step does what openpi's Gemma code does per layer per
denoising step: reads ``self_attn.o_proj.weight.dtype`` and ``mlp.up_proj.weight.dtype``
around the layer's forward. "before" materializes the dense weight on each read (what
``.weight`` did until LazyWeight); "after" reads the metadata only. Steps alternate between
the two variants; the table gives the median step time and, from one profiled step each
(torch.profiler with profile_memory), the bytes allocated and the peak of live allocations
during the step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from duquant_pipeline.pack import pack_layer
from duquant_pipeline.select import SelectedLayer
from duquant_runtime import DuQuantLinear
from duquant_runtime.config import resolve
from torch import nn


def allocations(fn: Callable[[], object]) -> tuple[int, int]:
    """(bytes allocated, peak bytes live) during one call, from the profiler's memory events."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are booked on the op that made them (self memory), frees on "[memory]" events
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = total = 0
    for e in events:
        live += e.self_cpu_memory_usage
        total += max(e.self_cpu_memory_usage, 0)
        peak = max(peak, live)
    return total, peak


def quantize(layer: nn.Module) -> None:
    config = resolve("dit_w4a8")
    for name, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear):
            w = module.weight.detach().float().numpy()
            sel = SelectedLayer(name, f"{name}.weight", None, *w.shape, "F32", 4)
            pack = pack_layer(w, None, sel, "F32", config)
            q = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_token_dynamic", dtype=module.weight.dtype)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, child, q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import GemmaConfig
    from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRotaryEmbedding

    cfg = GemmaConfig(
        hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_key_value_heads=1, head_dim=256
    )
    layer = GemmaDecoderLayer(cfg, layer_idx=0).eval()
    quantize(layer)
    x = torch.randn(1, args.tokens, 1024)
    pos = torch.arange(args.tokens)[None]
    rope = GemmaRotaryEmbedding(cfg)(x, pos)

    def read(weight: object, materialize: bool) -> torch.dtype:
        return weight.materialize().dtype if materialize else weight.dtype  # type: ignore[attr-defined]

    def step(materialize: bool) -> torch.Tensor:
        dtype = read(layer.self_attn.o_proj.weight, materialize)
        out = layer(x.to(dtype), attention_mask=None, position_embeddings=rope)
        out = out[0] if isinstance(out, tuple) else out
        return out.to(read(layer.mlp.up_proj.weight, materialize))

    variants: dict[str, Callable[[], torch.Tensor]] = {"before": lambda: step(True), "after": lambda: step(False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        memory = {name: allocations(fn) for name, fn in variants.items()}  # also the warm-up
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    print(f"GemmaDecoderLayer 1024/4096, {args.tokens} tokens, int4 DuQuantLinear, CPU, median of {args.repeats}")
    print(f"{'variant':<8}{'step ms':>10}{'allocated':>14}{'peak live':>14}")
    for name in variants:
        total, peak = memory[name]
        ms = 1000 * statistics.median(times[name])
        print(f"{name:<8}{ms:>10.2f}{total / 2**20:>10.1f} MiB{peak / 2**20:>10.1f} MiB")
    ratio = statistics.median(times["before"]) / statistics.median(times["after"])
    print(f"before / after: {ratio:.2f}x time")


if __name__ == "__main__":
    main()
