"""QuantEmbedding's forward against nn.Embedding's, side by side: PaliGemma's table
(257,152 x 2,048) and an 816-token prefix (openpi's pi0.5 prompt and image tokens), per dtype
and per storage (int8 per row, int4 in groups of 64).

    python bench/embed_speed.py [--tokens 816] [--repeats 200] [--threads 2]

Each round times every case once in turn, so drift hits all of them alike; the figure is the
median over rounds. Prints ms per forward and the ratio to nn.Embedding of the same dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from duquant_runtime import QuantEmbedding
from torch import nn

ROWS, DIM = 257_152, 2_048


def quantized(table: torch.Tensor, bits: int, group: int) -> QuantEmbedding:
    """The layer holding ``table``'s codes (round-to-nearest: speed does not depend on the scales)."""
    groups = DIM // group if group else 1
    grouped = table.float().view(ROWS, groups, -1)
    scales = grouped.abs().amax(-1).clamp_min(1e-8) / (2 ** (bits - 1) - 1)
    codes = (grouped / scales[..., None]).round().clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1).view(ROWS, DIM)
    if bits <= 4:
        nibbles = (codes + 8).to(torch.uint8)
        stored = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    else:
        stored = codes.to(torch.int8)
    buffers = {"qweight": stored, "w_scale": scales.float()}
    return QuantEmbedding(ROWS, DIM, bits=bits, group_size=group, dtype=table.dtype, buffers=buffers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=816)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, ROWS, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    cases: dict[str, nn.Module] = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        table = nn.Embedding(ROWS, DIM, dtype=dtype).requires_grad_(False)
        cases[f"{name} nn.Embedding"] = table
        cases[f"{name} int8"] = quantized(table.weight, 8, 0)
        cases[f"{name} int4 g64"] = quantized(table.weight, 4, 64)
    times: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for module in cases.values():
            module(ids)  # warm
        for _ in range(args.repeats):
            for label, module in cases.items():
                start = time.perf_counter()
                module(ids)
                times[label].append(time.perf_counter() - start)
    print(f"{args.tokens} tokens from a {ROWS} x {DIM} table, {args.threads} threads, median of {args.repeats}")
    for label, samples in times.items():
        ms = statistics.median(samples) * 1e3
        base = statistics.median(times[label.split()[0] + " nn.Embedding"]) * 1e3
        print(f"  {label:<22} {ms:7.3f} ms   {ms / base:5.2f}x nn.Embedding")


if __name__ == "__main__":
    main()
