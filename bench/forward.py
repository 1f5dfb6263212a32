"""Forward time at pi0.5 shapes: DuQuantLinear vs nn.Linear vs the seed's naive per-block loop.

    python bench/forward.py [--quick] [--dtypes fp32,bf16] [--device cpu|cuda]

Variants are timed side by side in one run (interleaved, median of repeats), so the
ratios hold even when absolute times drift. Timing does not depend on the values of a
pack, so layers get random orthogonal blocks and random codes of the real shapes.
Token counts: LLM 816 (3 images x 256 + text), expert 50 (action chunk), SigLIP 768.
``codes``/``dequant`` use the default presets' layout (one 64x64 input rotation, no
permutation, no output rotation); the naive loop is the seed's layout and code (16x16
blocks, permutation, output rotation), as is ``seed-layout`` (our layer, seed layout).
Writes artifacts/bench/forward.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from duquant_pipeline.rotations.hadamard import hadamard_blocks
from duquant_runtime.bundle import LayerPack
from duquant_runtime.codes import pack_codes, storage_for_bits
from duquant_runtime.layer import DuQuantLinear, unpack_codes
from duquant_runtime.stages import StageSpec
from torch import nn

# (component, layer, out, in, tokens)
SHAPES = [
    ("llm", "q_proj", 2048, 2048, 816),
    ("llm", "k_proj", 256, 2048, 816),
    ("llm", "o_proj", 2048, 2048, 816),
    ("llm", "gate_proj", 16384, 2048, 816),
    ("llm", "down_proj", 2048, 16384, 816),
    ("expert", "q_proj", 2048, 1024, 50),
    ("expert", "gate_proj", 4096, 1024, 50),
    ("expert", "down_proj", 1024, 4096, 50),
    ("vision", "q_proj", 1152, 1152, 768),
    ("vision", "fc1", 4304, 1152, 768),
    ("vision", "fc2", 1152, 4304, 768),
]
QUICK = {("llm", "q_proj"), ("llm", "gate_proj"), ("expert", "gate_proj"), ("vision", "fc1")}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_pack(
    out: int, inp: int, block: int = 16, bits: int = 4, seed: int = 0, seed_layout: bool = True
) -> LayerPack:
    """Random values of a real layout: the seed's (perm, 16x16 blocks, output rotation) or
    the default presets' (one 64x64 input rotation)."""
    if not seed_layout:
        block = 64
    rng = np.random.default_rng(seed)
    nb, nbo = -(-inp // block), -(-out // block)
    if seed_layout:
        r_in = np.linalg.qr(rng.standard_normal((nb, block, block)))[0].astype(np.float32)
    else:  # the default: block Hadamard, the same matrix in every block
        r_in = hadamard_blocks(inp, block, signs=False, seed=0).astype(np.float32)
    r_out = np.linalg.qr(rng.standard_normal((nbo, block, block)))[0].astype(np.float32)
    codes = rng.integers(-8, 8, size=(out, inp))
    values = {"r_in": r_in}
    if seed_layout:
        values.update(perm=rng.permutation(inp).astype(np.int32), r_out=r_out)
    return LayerPack(
        name="bench",
        in_features=inp,
        out_features=out,
        weight_bits=bits,
        storage=storage_for_bits(bits),
        stages=((StageSpec("perm", "perm"),) if seed_layout else ()) + (StageSpec("rotate", "r_in"),),
        out_stages=(StageSpec("rotate", "r_out"),) if seed_layout else (),
        stage_values=values,
        qweight=pack_codes(codes, bits),
        w_scale=(rng.random(out) * 0.01 + 1e-3).astype(np.float32),
        bias=None,
        source_dtype="BF16",
        source_sum=0.0,
        source_sumsq=0.0,
    )


class NaiveBlockLoop(nn.Module):
    """The seed's original layer (seeds/002): a Python loop over blocks with clones, each
    rotation block converted from NumPy on every call, and the weight fake-quantized
    again on every call — the 'before' state the ratio is measured against."""

    def __init__(self, pack: LayerPack, dtype: torch.dtype) -> None:
        super().__init__()
        self.perm = torch.from_numpy(pack.array("perm").astype(np.int64))
        self.r_in = list(pack.array("r_in"))  # NumPy, as the seed kept them
        self.r_out = list(pack.array("r_out"))
        codes = unpack_codes(torch.from_numpy(pack.qweight), pack.in_features).float()
        self.w_t = (codes * torch.from_numpy(pack.w_scale)[:, None]).to(dtype)
        self.block = pack.array("r_in").shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = x[..., self.perm].clone()
        for i, r in enumerate(self.r_in):
            s = slice(i * self.block, min((i + 1) * self.block, x.shape[-1]))
            n = s.stop - s.start
            x_t[..., s] = x_t[..., s].clone() @ torch.from_numpy(r[:n, :n]).to(x_t)
        q = 127
        scale = (x_t.abs().amax(-1, keepdim=True) / q).clamp_min(1e-8)
        x_t = torch.clamp(torch.round(x_t / scale), -q - 1, q) * scale
        w_scale = self.w_t.abs().amax(1, keepdim=True) / 7
        w_q = torch.clamp(torch.round(self.w_t / w_scale), -8, 7) * w_scale  # re-quantized every call
        y = F.linear(x_t, w_q)
        y_out = y.clone()
        for i, r in enumerate(self.r_out):
            s = slice(i * self.block, min((i + 1) * self.block, y.shape[-1]))
            n = s.stop - s.start
            y_out[..., s] = y[..., s] @ torch.from_numpy(r[:n, :n]).to(y)
        return y_out


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, repeats: int, sync) -> dict[str, float]:
    """Median seconds per call, variants interleaved so drift hits all of them alike."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for module in variants.values():
            module(x)
        sync()
        for _ in range(repeats):
            for name, module in variants.items():
                start = time.perf_counter()
                module(x)
                sync()
                samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 representative shapes instead of 11")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-naive", action="store_true", help="skip the slow naive loop layer")
    ap.add_argument("--out", default="artifacts/bench/forward.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    header = (
        f"{'shape':<26}{'dtype':>6}{'linear ms':>11}{'codes ms':>10}{'dequant ms':>11}{'seed-lay ms':>12}"
        f"{'naive ms':>10}{'codes/lin':>10}{'deq/lin':>9}{'naive/deq':>10}"
    )
    print(f"forward on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    print(header)
    for comp, layer, out, inp, tokens in SHAPES:
        if args.quick and (comp, layer) not in QUICK:
            continue
        pack = random_pack(out, inp, seed_layout=False)
        seed_pack = random_pack(out, inp)
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            linear = nn.Linear(inp, out, bias=False).to(device=device, dtype=dtype)
            variants: dict[str, nn.Module] = {
                "linear": linear,
                "codes": DuQuantLinear.from_pack(
                    pack, act_bits=8, act_mode="per_token_dynamic", weight_storage="codes", dtype=dtype, device=device
                ),
                "dequant": DuQuantLinear.from_pack(
                    pack, act_bits=8, act_mode="per_token_dynamic", weight_storage="dequant", dtype=dtype, device=device
                ),
                "seed-layout": DuQuantLinear.from_pack(
                    seed_pack,
                    act_bits=8,
                    act_mode="per_token_dynamic",
                    weight_storage="dequant",
                    dtype=dtype,
                    device=device,
                ),
            }
            if not args.no_naive:
                variants["naive"] = NaiveBlockLoop(seed_pack, dtype)
            x = torch.randn(1, tokens, inp, dtype=dtype, device=device)
            t = time_variants(variants, x, args.repeats, sync)
            row = {
                "component": comp,
                "layer": layer,
                "out": out,
                "in": inp,
                "tokens": tokens,
                "dtype": dname,
                **{f"{k}_s": v for k, v in t.items()},
            }
            rows.append(row)
            naive = t.get("naive", float("nan"))
            print(
                f"{comp + '.' + layer + f' {out}x{inp}':<26}{dname:>6}{t['linear'] * 1e3:>11.2f}"
                f"{t['codes'] * 1e3:>10.2f}{t['dequant'] * 1e3:>11.2f}"
                f"{t['seed-layout'] * 1e3:>12.2f}{naive * 1e3:>10.2f}"
                f"{t['codes'] / t['linear']:>10.2f}{t['dequant'] / t['linear']:>9.2f}{naive / t['dequant']:>10.2f}"
            )
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
