"""Plain W4A8 round-to-nearest, the baseline every method must beat (bench scripts and tests)."""

from __future__ import annotations

import torch
from torch import nn


class RTNLinear(nn.Module):
    """Plain W4A8 round-to-nearest: per-row absmax int4 weights, per-token int8 activations."""

    def __init__(self, linear: nn.Linear, weight_bits: int = 4, act_bits: int = 8) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        q = 2 ** (weight_bits - 1) - 1
        scale = (w.abs().amax(dim=1, keepdim=True) / q).clamp_min(1e-10)
        self.register_buffer("weight", (torch.clamp(torch.round(w / scale), -q - 1, q) * scale).to(linear.weight.dtype))
        self.bias = linear.bias
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = 2 ** (self.act_bits - 1) - 1
        s = (x.detach().float().abs().amax(-1, keepdim=True) / q).clamp_min(1e-8)
        xq = (torch.clamp(torch.round(x.float() / s), -q - 1, q) * s).to(x.dtype)
        return nn.functional.linear(xq, self.weight, self.bias)
