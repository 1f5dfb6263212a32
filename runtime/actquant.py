"""Activation quantization: the fake-quant every forward uses, and the one rule for static scales.

Static per-channel scales (the seed's rule): per channel of the transformed basis, the
``act_percentile`` of |x_t| (linear interpolation, as ``torch.quantile``) over the rows of a
batch, averaged over batches, divided by qmax. Runtime calibration feeds its batches to a
:class:`StaticScaleObserver`; a build with ``--calib`` feeds the captured sample as one batch.
"""

from __future__ import annotations

import torch

from .codes import qmax

ACT_EPS = 1e-8  # scale floor: an all-zero channel or token never divides by zero


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization with a straight-through gradient (identity backward)."""
    q = qmax(bits)
    quantized = torch.clamp(torch.round(x.float() / scale), -q - 1, q) * scale
    return x + (quantized.to(x.dtype) - x).detach()


def per_token_scale(x_t: torch.Tensor, bits: int) -> torch.Tensor:
    """Dynamic per-token scales: each row's max |x| / qmax."""
    return (x_t.detach().float().abs().amax(dim=-1, keepdim=True) / qmax(bits)).clamp_min(ACT_EPS)


def percentile_per_channel(x2d: torch.Tensor, pct: float) -> torch.Tensor:
    """torch.quantile(x2d, pct/100, dim=0) with linear interpolation, for any size."""
    values = x2d.sort(dim=0).values
    pos = (pct / 100.0) * (values.shape[0] - 1)
    lo, hi = int(pos), min(int(pos) + 1, values.shape[0] - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


class StaticScaleObserver:
    """Accumulates the static-scale rule over batches of transformed inputs x_t."""

    def __init__(self, percentile: float, bits: int) -> None:
        self.percentile, self.bits = percentile, bits
        self.total: torch.Tensor | None = None
        self.batches = 0

    def observe(self, x_t: torch.Tensor) -> torch.Tensor:
        """Take a batch in; returns its per-channel percentile."""
        p = percentile_per_channel(x_t.detach().float().abs().reshape(-1, x_t.shape[-1]), self.percentile)
        # The largest batch's percentile, not their mean: batches whose channels differ in size
        # (another conditioning, a few rows each) made a mean clip every larger one.
        self.total = p if self.total is None else torch.maximum(self.total, p)
        self.batches += 1
        return p

    def scales(self) -> torch.Tensor | None:
        """float32 [in] scales, None before any batch."""
        if self.total is None:
            return None
        return (self.total / qmax(self.bits)).clamp_min(ACT_EPS).float()
