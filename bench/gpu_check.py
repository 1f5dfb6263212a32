"""The GPU check: everything that needs CUDA, in one script of at most ~5 minutes on one GPU.

    python bench/gpu_check.py [--expert-layers 18] [--budget-s 270] [--out artifacts/bench/gpu_check.json]

Without CUDA it prints one line and exits 0 (``make gpu-check`` runs it anywhere). With CUDA:

1. the CUDA-marked tests (``pytest -m cuda``: ``tests/test_cuda.py``);
2. ``load_bundle(..., device="cuda")`` of the demo checkpoint's ``full_w4a8`` bundle (built here
   when absent), its time and the GPU memory it holds;
3. the forward at pi0.5's layer shapes (``bench/forward.py``'s, random packs of the default
   layout): bf16 ``nn.Linear`` against ``codes`` and ``dequant`` storage, eager and compiled,
   side by side;
4. one 10-step loop of an action expert at pi0.5's widths (Gemma-300M: width 1024, MLP 4096,
   adaRMS norms, openpi's loop): bf16 float against W4A8 (dynamic) and W4A4 (per-step scales)
   in ``codes`` storage, eager and under ``torch.compile(sample_actions)``;

with ``torch.cuda.max_memory_allocated`` for each, printed as one table. Times are the median
of ``--repeats`` calls after a warm-up, CUDA-synchronized. A compiled variant whose turn comes
after ``--budget-s`` is skipped with a line saying so. ``--device cpu --quick`` runs the same
code on the CPU at reduced widths (for developing this script; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from duquant_pipeline.demo import FULL, SIZES, Pi05Dims
from duquant_pipeline.demo_model import AdaRMSNorm, GemmaLayer
from duquant_runtime import DuQuantLinear, instrument
from duquant_runtime.flowsteps import step_table
from forward import QUICK, SHAPES, random_pack

ROOT = Path(__file__).resolve().parent.parent
STEPS, HORIZON = 10, 50


class Stopwatch:
    """Median seconds per call of a function, synchronized on the device; the run's budget."""

    def __init__(self, device: torch.device, repeats: int, budget_s: float) -> None:
        self.device, self.repeats = device, repeats
        self.start, self.budget_s = time.perf_counter(), budget_s

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.budget_s

    def measure(self, call: Callable[[], object]) -> tuple[float, float]:
        """(median seconds, peak MiB allocated) over the repeats, after one warm-up call."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            call()
            self.sync()
            samples = []
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                call()
                self.sync()
                samples.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else float("nan")
        return statistics.median(samples), peak


# ---------------------------------------------------------------- the action expert loop


def sinusoid(timestep: torch.Tensor, width: int) -> torch.Tensor:
    """openpi's create_sinusoidal_pos_embedding (periods 4e-3 .. 4)."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float32, device=timestep.device)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = timestep.float()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class ExpertLoop(nn.Module):
    """pi0.5's action expert alone: time MLP -> adaRMS Gemma layers -> action head, openpi's loop."""

    def __init__(self, d: Pi05Dims, layers: int) -> None:
        super().__init__()
        e = d.expert_width
        self.width = e
        self.time_mlp_in, self.time_mlp_out = nn.Linear(e, e), nn.Linear(e, e)
        self.action_in_proj, self.action_out_proj = nn.Linear(d.action_dim, e), nn.Linear(e, d.action_dim)
        dims = (e, d.expert_heads, d.expert_head_dim, d.expert_kv_heads, d.expert_mlp)
        self.layers = nn.ModuleList(GemmaLayer(*dims, True) for _ in range(layers))
        self.norm = AdaRMSNorm(e)

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        emb = sinusoid(timestep, self.width).to(x_t.dtype)
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))
        h = self.action_in_proj(x_t)
        for layer in self.layers:
            h = layer(h, cond)
        return self.action_out_proj(self.norm(h, cond))

    @torch.no_grad()
    def sample_actions(self, noise: torch.Tensor, num_steps: int = STEPS) -> torch.Tensor:
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32, device=noise.device)
        x_t, time_ = noise, torch.tensor(1.0, dtype=torch.float32, device=noise.device)
        while time_ >= -dt / 2:
            x_t = x_t + dt * self.denoise_step(None, None, None, x_t, time_.expand(noise.shape[0]))
            time_ += dt
        return x_t


def quantized_expert(base: ExpertLoop, act_bits: int, per_step: bool) -> ExpertLoop:
    """The layers' Linears swapped for DuQuantLinear of random packs (timing does not depend on
    the values), ``codes`` storage; per-step: a [10, in] scale table read by the step clock."""
    model = copy.deepcopy(base)
    table = None
    if per_step:
        instrument(model)
        table = step_table(model, STEPS, "gpu_check")
    ref = next(base.parameters())
    for name, module in list(model.layers.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        pack = random_pack(module.out_features, module.in_features, seed_layout=False)
        if per_step:
            scales = np.random.default_rng(0).uniform(0.01, 0.1, (STEPS, module.in_features)).astype(np.float32)
            pack = dataclasses.replace(pack, act_scale=scales)
        layer = DuQuantLinear.from_pack(
            pack,
            act_bits=act_bits,
            act_mode="per_step_static" if per_step else "per_token_dynamic",
            dtype=ref.dtype,
            device=ref.device,
            step_table=table,
        )
        parent, _, leaf = name.rpartition(".")
        setattr(model.layers.get_submodule(parent), leaf, layer)
    return model


# ---------------------------------------------------------------- the checks


def cuda_tests() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return (done.stdout.strip().splitlines() or ["(no output)"])[-1] + ("" if done.returncode == 0 else "  FAILED")


def demo_load(device: torch.device, watch: Stopwatch) -> dict:
    """Build (when absent) and load the demo's full_w4a8 bundle onto the demo model on ``device``."""
    import os

    from duquant_pipeline.build import build_bundle
    from duquant_pipeline.demo import write_demo_checkpoint
    from duquant_pipeline.demo_model import load_demo_model
    from duquant_runtime import load_bundle
    from duquant_runtime.config import resolve

    ckpt = write_demo_checkpoint(ROOT / "artifacts" / "demo")
    bundle = build_bundle(resolve("full_w4a8"), ckpt, ROOT / "artifacts", jobs=os.cpu_count() or 1).path
    model = load_demo_model(ckpt, dtype=torch.bfloat16).to(device)
    watch.sync()
    t0 = time.perf_counter()
    report = load_bundle(model, bundle, device=device)
    watch.sync()
    held = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    seconds = time.perf_counter() - t0
    return {"load_s": seconds, "layers": len(report.replaced), "held_mib": held, "bytes_ratio": report.ratio}


def layer_rows(device: torch.device, watch: Stopwatch, quick: bool) -> list[dict]:
    rows = []
    shrink = 8 if device.type == "cpu" and quick else 1  # the CPU dev run: the same code, smaller
    for comp, name, *shape in SHAPES:
        if quick and (comp, name) not in QUICK:
            continue
        out, inp, tokens = (n // shrink for n in shape)
        pack = random_pack(out, inp, seed_layout=False)
        x = torch.randn(1, tokens, inp, dtype=torch.bfloat16, device=device)
        variants = {
            "bf16 nn.Linear": nn.Linear(inp, out, bias=False).to(device, torch.bfloat16),
            **{
                f"W4A8 {storage}": DuQuantLinear.from_pack(
                    pack,
                    act_bits=8,
                    act_mode="per_token_dynamic",
                    weight_storage=storage,
                    dtype=torch.bfloat16,
                    device=device,
                )
                for storage in ("codes", "dequant")
            },
        }
        rows += run_variants(f"{comp}.{name} {out}x{inp}", variants, lambda m, x=x: m(x), watch)
    return rows


def loop_rows(device: torch.device, watch: Stopwatch, dims: Pi05Dims, layers: int) -> list[dict]:
    base = ExpertLoop(dims, layers).to(device, torch.bfloat16).eval()
    noise = torch.randn(1, HORIZON, dims.action_dim, device=device, dtype=torch.bfloat16)
    variants = {
        "bf16 float": base,
        "W4A8 codes (dynamic)": quantized_expert(base, 8, per_step=False),
        "W4A4 codes (per-step)": quantized_expert(base, 4, per_step=True),
    }
    return run_variants(
        f"expert loop ({layers} layers, {STEPS} steps)", variants, lambda m: m.sample_actions(noise), watch
    )


def run_variants(what: str, variants: dict[str, nn.Module], call: Callable, watch: Stopwatch) -> list[dict]:
    """Each variant eager, then compiled (openpi wraps the loop, here the module's call)."""
    rows = []
    for mode in ("eager", "compiled"):
        baseline = None
        for label, module in variants.items():
            if mode == "compiled" and watch.over_budget():
                print(f"  skipped: {what} {label} compiled (past the {watch.budget_s:.0f} s budget)", flush=True)
                continue
            target = module
            if mode == "compiled":
                target = copy.copy(module)
                if hasattr(module, "sample_actions"):
                    target.sample_actions = torch.compile(module.sample_actions)
                else:
                    target = torch.compile(module)
            seconds, peak = watch.measure(lambda target=target: call(target))
            baseline = baseline or seconds  # the first variant, the bf16 float one, in the same mode
            row = {"what": what, "variant": label, "mode": mode, "ms": seconds * 1e3, "peak_mib": peak}
            rows.append({**row, "vs_bf16": seconds / baseline})
            print(
                f"  {what:<38}{label:<24}{mode:<9}{seconds * 1e3:>9.3f} ms{seconds / baseline:>7.2f}x{peak:>10.1f} MiB",
                flush=True,
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="4 layer shapes; with --device cpu, small widths")
    ap.add_argument("--expert-layers", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--out", default="artifacts/bench/gpu_check.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if shutil.which("nvidia-smi"):  # a GPU, but this torch cannot use it (the dev venv's CPU wheel)
            print(f"gpu-check: torch {torch.__version__} here has no CUDA: make gpu-check GPU_PYTHON=<a CUDA torch>")
            return 1
        print(f"gpu-check: no CUDA device here (torch {torch.__version__}): nothing to check")
        return 0
    watch = Stopwatch(device, args.repeats, args.budget_s)
    dims = SIZES["small"] if device.type == "cpu" and args.quick else FULL
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"gpu-check on {name}, torch {torch.__version__}")
    result: dict = {"device": name, "torch": torch.__version__}
    if device.type == "cuda":
        result["cuda_tests"] = cuda_tests()
        print(f"CUDA-marked tests: {result['cuda_tests']}", flush=True)
    result["demo_load"] = demo_load(device, watch)
    load = result["demo_load"]
    print(
        f"demo full_w4a8 load_bundle(device={device.type!r}): {load['layers']} layers in {load['load_s']:.2f} s, "
        f"{load['held_mib']:.0f} MiB allocated after, layer bytes {load['bytes_ratio']:.3f}x bf16",
        flush=True,
    )
    print(f"  {'what':<38}{'variant':<24}{'mode':<9}{'median':>12}{'vs bf16':>8}{'peak alloc':>14}")
    result["rows"] = layer_rows(device, watch, args.quick) + loop_rows(device, watch, dims, args.expert_layers)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} ({time.perf_counter() - watch.start:.0f} s)")
    return 1 if result.get("cuda_tests", "").endswith("FAILED") else 0


if __name__ == "__main__":
    raise SystemExit(main())
