"""Minimal stand-ins for the denoising loops per-step scales must follow, with their real call
signatures: openpi's ``PI0Pytorch`` (``sample_actions`` accumulating ``time += dt`` in float32
and calling ``denoise_step(state, prefix_pad_masks, past_key_values, x_t, timestep)``
positionally) and LeRobot's ``PI05Pytorch`` (``time = 1.0 + step * dt``, keyword call of
``denoise_step(prefix_pad_masks, past_key_values, x_t, timestep)``, held as ``policy.model``).

The expert is two Linears under ``gemma_expert.``, its input modulated by the flow time as
adaRMSNorm does (scale and shift from a time embedding), so its activations change per step.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WIDTH, HIDDEN, ACTION_DIM, HORIZON = 32, 64, 8, 10


def time_embedding(timestep: torch.Tensor, width: int) -> torch.Tensor:
    """Sine-cosine embedding of the flow time, periods 4e-3 .. 4 (openpi's)."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = timestep.double()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


class FlowCore(nn.Module):
    """The layers both stand-ins share; ``velocity`` is one denoising step's network."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.action_in_proj = nn.Linear(ACTION_DIM, WIDTH)
        self.time_mlp = nn.Linear(WIDTH, 2 * WIDTH)
        self.gemma_expert = nn.Module()
        self.gemma_expert.fc1 = nn.Linear(WIDTH, HIDDEN)
        self.gemma_expert.fc2 = nn.Linear(HIDDEN, WIDTH)
        self.action_out_proj = nn.Linear(WIDTH, ACTION_DIM)
        with torch.no_grad():  # a few channels whose size swings with the flow time
            self.time_mlp.weight[:4] *= 12.0

    def velocity(self, context: torch.Tensor, x_t: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time_mlp(time_embedding(timestep, WIDTH)).chunk(2, dim=-1)
        h = (self.action_in_proj(x_t) + context) * (1 + scale[:, None]) + shift[:, None]
        h = h + self.gemma_expert.fc2(F.gelu(self.gemma_expert.fc1(h)))
        return self.action_out_proj(h)


class OpenpiStandIn(FlowCore):
    """openpi's loop and ``denoise_step`` signature (models_pytorch/pi0_pytorch.py)."""

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        return self.velocity(past_key_values, x_t, timestep)

    @torch.no_grad()
    def sample_actions(self, context: torch.Tensor, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        bsize, device = noise.shape[0], noise.device
        state, prefix_pad_masks = None, None
        dt = -1.0 / num_steps
        dt = torch.tensor(dt, dtype=torch.float32, device=device)
        x_t = noise
        time = torch.tensor(1.0, dtype=torch.float32, device=device)
        while time >= -dt / 2:
            expanded_time = time.expand(bsize)
            v_t = self.denoise_step(state, prefix_pad_masks, context, x_t, expanded_time)
            x_t = x_t + dt * v_t
            time += dt
        return x_t


class LeRobotFlow(FlowCore):
    """LeRobot's PI05Pytorch loop and ``denoise_step`` signature (policies/pi05/modeling_pi05.py)."""

    def denoise_step(self, prefix_pad_masks, past_key_values, x_t, timestep):
        return self.velocity(past_key_values, x_t, timestep)

    @torch.no_grad()
    def sample_actions(self, context: torch.Tensor, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        bsize, device = noise.shape[0], noise.device
        dt = -1.0 / num_steps
        x_t = noise
        for step in range(num_steps):
            time = 1.0 + step * dt
            time_tensor = torch.tensor(time, dtype=torch.float32, device=device).expand(bsize)
            v_t = self.denoise_step(prefix_pad_masks=None, past_key_values=context, x_t=x_t, timestep=time_tensor)
            x_t = x_t + dt * v_t
        return x_t


class LeRobotPolicy(nn.Module):
    """LeRobot's policy holds the flow model as ``model``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = LeRobotFlow(seed)


def flow_inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 1, WIDTH], noise [B, HORIZON, ACTION_DIM])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, WIDTH, generator=g), torch.randn(batch, HORIZON, ACTION_DIM, generator=g)


PER_STEP_CONFIG = """name = "per_step"
[select]
scope = "gemma_expert."
[quant]
act_mode = "per_step_static"
flow_steps = 10
calib_steps = 4
act_percentile = 99.0
[transform]
block_size = 16
"""
DYNAMIC_CONFIG = PER_STEP_CONFIG.replace('name = "per_step"', 'name = "dynamic"').replace(
    'act_mode = "per_step_static"', 'act_mode = "per_token_dynamic"'
)


def standin_bundles(out: Path) -> dict:
    """The openpi stand-in's float model and checkpoint in ``out``, statistics captured on an
    instrumented copy over 4 loops, and two bundles of its expert: per-step static (built with
    --calib) and per-token dynamic. {"float", "configs", "paths", "checkpoint"}."""
    from duquant_pipeline.build import build_bundle
    from duquant_runtime import capture_stats, instrument
    from duquant_runtime.config import load_toml
    from safetensors.torch import save_model

    float_model = OpenpiStandIn().eval()
    checkpoint = out / "model.safetensors"
    save_model(float_model, str(checkpoint))
    configs = {}
    for name, text in (("per_step", PER_STEP_CONFIG), ("dynamic", DYNAMIC_CONFIG)):
        (out / f"{name}.toml").write_text(text)
        configs[name] = load_toml(out / f"{name}.toml")
    capturing = copy.deepcopy(float_model)
    instrument(capturing)
    with capture_stats(capturing, configs["per_step"]) as stats:
        for seed in range(4):
            capturing.sample_actions(*flow_inputs(seed=seed))
    calib = stats.save(out / "stats.h5")
    paths = {
        "per_step": build_bundle(configs["per_step"], checkpoint, out, jobs=1, calib=calib).path,
        "dynamic": build_bundle(configs["dynamic"], checkpoint, out, jobs=1).path,
    }
    return {"float": float_model, "configs": configs, "paths": paths, "checkpoint": checkpoint}
