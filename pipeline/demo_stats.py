"""Calibration statistics for the demo checkpoint: its components run on the demo's inputs,
the action expert once per denoising step (``flow_step``), so a ``--calib`` preset
(``full_w4a4``, ``full_w4a8_calib``, ``dit_w4a4``) builds on the demo from the command line.

The demo has no denoising loop of its own: step ``k`` runs the expert on inputs drawn for that
step (another seed), inside ``flow_step(model, index=k)``, which is what a per-step layer reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from duquant_runtime import attach_clock, capture_stats, flow_step
from duquant_runtime.config import DuQuantConfig, resolve

from .demo_model import DemoPi05, component_inputs, load_demo_model

CALIB_SEEDS = tuple(range(1, 9))  # the benchmarks evaluate on seed 0: statistics never see it
STEP_SEED = 1000  # step k of batch seed s draws the expert's inputs from seed s + STEP_SEED * (k + 1)


def run_demo(model: DemoPi05, seed: int, steps: int | None) -> dict[str, torch.Tensor]:
    """Each component's output on the inputs of ``seed``; with ``steps``, the expert's at each
    denoising step (concatenated on the batch), each inside ``flow_step``."""
    inputs = component_inputs(model.dims, seed=seed)
    with torch.no_grad():
        out = {"vision": model.vision(*inputs["vision"]), "llm": model.llm(*inputs["llm"])}
        if steps is None:
            out["expert"] = model.expert(*inputs["expert"])
            return out
        chunks = []
        for k in range(steps):
            args = component_inputs(model.dims, seed=seed + STEP_SEED * (k + 1))["expert"]
            with flow_step(model, index=k):
                chunks.append(model.expert(*args))
        out["expert"] = torch.cat(chunks)
    return out


def demo_steps(config: DuQuantConfig) -> int | None:
    """How many denoising steps the demo runs for ``config``: its flow steps where a layer is per step."""
    return config.quant.flow_steps if config.quant.per_step else None


def capture_demo_stats(
    checkpoint: str | Path, config: str | Path | DuQuantConfig, out: str | Path, seeds: Iterable[int] = CALIB_SEEDS
) -> Path:
    """Record ``config``'s statistics on the demo checkpoint at ``checkpoint`` into ``out``."""
    cfg = resolve(config)
    model = load_demo_model(checkpoint)
    attach_clock(model)  # capture_stats reads a per-step layer's step from the model's clock
    steps = demo_steps(cfg)
    with capture_stats(model, cfg) as capture:
        for seed in seeds:
            run_demo(model, seed, steps)
    return capture.save(out)
