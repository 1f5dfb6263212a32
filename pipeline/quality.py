"""Quality numbers for one layer's pack: SQNR of the weight and of the layer's output.

``simulate`` runs the packed layer in float64 exactly as the runtime does (transform,
activation fake-quant, dequantized weight, output rotation), so the output SQNR is the
error the user will see for those inputs, not an approximation of it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from duquant_runtime.packing import qmax

from .algorithm import Transform, rotate_column_blocks

ACT_EPS = 1e-8


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref - approx‖²); +inf for an exact match."""
    signal = float(reference.double().square().sum())
    noise = float((reference.double() - approx.double()).square().sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def quantize_acts(x_t: torch.Tensor, bits: int, static_scale: torch.Tensor | None) -> torch.Tensor:
    """The runtime's activation fake-quant: per-token dynamic, or static per-channel."""
    if bits <= 0:
        return x_t
    q = qmax(bits)
    if static_scale is None:
        scale = (x_t.abs().amax(dim=-1, keepdim=True) / q).clamp_min(ACT_EPS)
    else:
        scale = static_scale.double().clamp_min(ACT_EPS)
    return (x_t / scale).round().clamp(-q - 1, q) * scale


def static_scales(tr: Transform, sample: np.ndarray, bits: int, percentile: float) -> np.ndarray:
    """Static per-channel scales in the transformed basis from calibration rows (seed rule:
    the percentile of |x_t| / qmax), float32 [in]."""
    x_t = tr.apply_input(torch.from_numpy(sample).double()).abs()
    p = torch.quantile(x_t, percentile / 100.0, dim=0) if x_t.shape[0] > 1 else x_t[0]
    return (p / qmax(bits)).clamp_min(ACT_EPS).float().numpy()


def simulate(
    tr: Transform,
    codes: np.ndarray,
    scales: np.ndarray,
    x: torch.Tensor,
    act_bits: int,
    act_scale: np.ndarray | None = None,
) -> torch.Tensor:
    """The packed layer's output (no bias) for inputs x [rows, in], in float64."""
    x_t = quantize_acts(
        tr.apply_input(x.double()), act_bits, None if act_scale is None else torch.from_numpy(act_scale)
    )
    w_hat = torch.from_numpy(codes).double() * torch.from_numpy(scales).double()[:, None]
    y = x_t @ w_hat.t()
    return y if tr.r_out is None else rotate_column_blocks(y, tr.r_out)
