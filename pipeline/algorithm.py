"""A layer's transform, built stage by stage with the runtime's own stage functions.

A method (``methods.py``) is a recipe of stages added to a :class:`~.basis.Basis`;
``compute_transform`` is one candidate a build tries: an optional per-input-channel
equalization, then the method or nothing.

Equalization x/s, W·s (stored as the ``in_scale`` stage 1/s, applied first): from the weights
alone (``equalization_factors``) or, with calibration statistics, SmoothQuant's
(``smoothing_factors``). In trained networks the largest activation channels feed the
smallest weight columns; a rotation that mixes such a channel with ordinary ones multiplies
the large activation by full-size 4-bit errors. Equalizing first makes the product
x_j·W[:, j], which is what matters, the thing the rotation spreads.
"""

from __future__ import annotations

import numpy as np
import torch
from duquant_runtime.config import TransformConfig
from duquant_runtime.stats import LayerStats

from . import kernels
from .basis import Basis, Transform
from .methods import handler

# ---------------------------------------------------------------- equalization


# Factors are clipped to this range (geometric mean 1): a dead channel cannot blow up the other side.
FACTOR_RANGE = (1e-4, 1e4)


def _normalized(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, *FACTOR_RANGE)
    return np.clip(s / np.exp(np.mean(np.log(s))), *FACTOR_RANGE)  # geometric mean 1: no scale drift


def smoothing_factors(act_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant: s_j = max|x_j|^α / max|W_:,j|^(1-α); x/s and W·s leave x·Wᵀ unchanged."""
    a = np.maximum(act_absmax.astype(np.float64), 1e-5)
    wmax = np.maximum(np.abs(w).max(axis=0), 1e-5)
    return _normalized(a**alpha / wmax ** (1.0 - alpha))


def column_rms(w: np.ndarray) -> np.ndarray:
    """rms(W[:, j]) per input column, float64 (what equalization is computed from)."""
    return np.sqrt(kernels.column_sum_squares(np.ascontiguousarray(w)) / max(1, w.shape[0]))


def equalization_factors(w: np.ndarray, beta: float, rms: np.ndarray | None = None) -> np.ndarray:
    """Data-free equalization: s_j = rms(W[:, j])^-β, so W·s has columns of equal size at β = 1.

    In trained networks a tiny weight column usually meets a large activation channel (the
    consumer compensates its producer), so x/s shrinks exactly the channels that a rotation
    must not spread; with independent outliers β = 0.5 is the choice that balances weight and
    activation error (Cauchy-Schwarz on ‖x/s‖·‖W·s‖). Build measures which β each layer wants.
    ``rms``: ``column_rms(w)`` when already known (a build computes it once per layer, and
    ranks candidates on a sample of rows with the whole weight's factors).
    """
    rms = column_rms(w) if rms is None else rms
    floor = max(float(rms.max()) * 1e-6, 1e-30)  # all-zero columns keep factor ~1
    return _normalized(np.maximum(rms, floor) ** -beta)


def compute_transform(
    w: np.ndarray,
    t: TransformConfig,
    stats: LayerStats | None = None,
    *,
    rotate: bool = True,
    equalize: float = 0.0,
    smooth: float | None = None,
    rms: np.ndarray | None = None,
) -> Transform:
    """One candidate transform and the weight in its basis: an equalization (data-free
    strength ``equalize``, or SmoothQuant ``smooth``, default the config's smooth_alpha)
    followed by the config's method, or by nothing when ``rotate`` is False. ``rms``: the
    column RMS equalization uses (default: ``w``'s own)."""
    method = handler(t.method)
    dtype = method.dtype if rotate else torch.from_numpy(w[:0]).dtype
    basis = Basis(torch.from_numpy(np.ascontiguousarray(w)).to(dtype))
    smooth = t.smooth_alpha if smooth is None else smooth
    s = None
    if smooth > 0:
        if stats is None:
            raise ValueError("SmoothQuant smoothing needs calibration statistics (--calib)")
        s = smoothing_factors(stats.absmax, w, smooth)
    elif equalize > 0:
        s = equalization_factors(w, equalize, rms)
    if s is not None:
        basis.add("scale", "in_scale", 1.0 / s)
        stats = None if stats is None else stats.scaled(1.0 / s)
    if rotate:
        method.build(basis, t, stats)
    return basis.result()


def transformed_hessian(tr: Transform, hessian: np.ndarray) -> torch.Tensor:
    """Tᵀ H T for the input transform T (equalization included: it is a stage)."""
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    return tr.apply_input(tr.apply_input(h).t().contiguous())
