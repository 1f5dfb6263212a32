"""Pre-transforms: a per-input-channel scale s applied before the rotation (x/s, W·s), stored
as the ``in_scale`` stage 1/s and applied first. One small frozen strategy each; a build's
candidates pair each pre-transform with a rotation (``recipe.py``).

In trained networks the largest activation channels feed the smallest weight columns; a
rotation that mixes such a channel with ordinary ones multiplies the large activation by
full-size 4-bit errors. Equalizing first makes the product x_j·W[:, j], which is what
matters, the thing the rotation spreads: from the weights alone (``Equalize``) or, with
calibration statistics, SmoothQuant's (``Smooth``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from duquant_runtime.config import TransformConfig
from duquant_runtime.stages import SCALE
from duquant_runtime.stats import LayerStats

from . import kernels
from .basis import Basis

# Factors are clipped to this range (geometric mean 1): a dead channel cannot blow up the other side.
FACTOR_RANGE = (1e-4, 1e4)
Act = np.ndarray | None  # a layer's data-free activation RMS estimate [in], when it has one
Factors = np.ndarray | None


def _normalized(s: np.ndarray) -> np.ndarray:
    s = np.clip(s, *FACTOR_RANGE)
    return np.clip(s / np.exp(np.mean(np.log(s))), *FACTOR_RANGE)  # geometric mean 1: no scale drift


def _floored(rms: np.ndarray) -> np.ndarray:
    """Column RMS with all-zero columns raised to a millionth of the largest (their factor stays ~1)."""
    return np.maximum(rms, max(float(rms.max()) * 1e-6, 1e-30))


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
    return _normalized(_floored(rms) ** -beta)


@dataclass(frozen=True)
class PreTransform:
    """No pre-transform: the weight goes to the rotation as it is."""

    uses_rms: ClassVar[bool] = False  # does ``factors`` read the weight's column RMS?

    @property
    def suffix(self) -> str:
        """What the pre-transform adds to a choice label ("" for none)."""
        return ""

    def factors(self, w: np.ndarray, stats: LayerStats | None, rms: np.ndarray | None, act: Act = None) -> Factors:
        """s per input column, or None for no stage. ``rms``: ``column_rms(w)`` when known; ``act``:
        the data-free activation RMS estimate, when the layer has one."""
        return None

    def build(
        self, basis: Basis, w: np.ndarray, stats: LayerStats | None, rms: np.ndarray | None, act: Act = None
    ) -> LayerStats | None:
        """Add the ``in_scale`` stage 1/s to ``basis`` (nothing for none); the statistics in its basis."""
        s = self.factors(w, stats, rms, act)
        if s is None:
            return stats
        basis.add(SCALE, "in_scale", 1.0 / s)
        return None if stats is None else stats.scaled(1.0 / s)


@dataclass(frozen=True)
class Equalize(PreTransform):
    """Data-free equalization of strength ``beta`` (``equalization_factors``)."""

    beta: float
    uses_rms: ClassVar[bool] = True

    @property
    def suffix(self) -> str:
        return f"+eq{self.beta:g}"

    def factors(self, w: np.ndarray, stats: LayerStats | None, rms: np.ndarray | None, act: Act = None) -> Factors:
        return equalization_factors(w, self.beta, rms)


@dataclass(frozen=True)
class Smooth(PreTransform):
    """SmoothQuant of strength ``alpha`` from the captured activation maxima."""

    alpha: float

    @property
    def suffix(self) -> str:
        return f"+smooth{self.alpha:g}"

    def factors(self, w: np.ndarray, stats: LayerStats | None, rms: np.ndarray | None, act: Act = None) -> Factors:
        if stats is None:
            raise ValueError("SmoothQuant smoothing needs calibration statistics (--calib)")
        return smoothing_factors(stats.absmax, w, self.alpha)


@dataclass(frozen=True)
class ProxySmooth(PreTransform):
    """SmoothQuant of strength ``alpha`` on the data-free activation estimate: s_j = a_j^α / rms(W_:,j)^(1-α).
    Column RMS rather than SmoothQuant's maxima: the estimate is an RMS too."""

    alpha: float
    uses_rms: ClassVar[bool] = True

    @property
    def suffix(self) -> str:
        return f"+proxy{self.alpha:g}"

    def factors(self, w: np.ndarray, stats: LayerStats | None, rms: np.ndarray | None, act: Act = None) -> Factors:
        if act is None:
            raise ValueError("proxy smoothing needs the layer's activation estimate")
        rms = column_rms(w) if rms is None else rms
        return _normalized(act**self.alpha / _floored(rms) ** (1.0 - self.alpha))


NONE = PreTransform()


def equalizing(beta: float) -> PreTransform:
    return Equalize(beta) if beta > 0 else NONE  # strength 0 is no stage


def smoothing(alpha: float) -> PreTransform:
    return Smooth(alpha) if alpha > 0 else NONE


def fixed_pre_transform(t: TransformConfig) -> PreTransform:
    """The pre-transform a config names outright (``smooth_alpha``), else none."""
    return smoothing(t.smooth_alpha)


def uses_estimate(t: TransformConfig) -> bool:
    """Does a data-free choice among equalizations also try smoothing on each layer's activation
    estimate (``act_proxy`` on, no fixed SmoothQuant strength)?"""
    return t.act_proxy and bool(t.equalize) and t.smooth_alpha == 0


def pre_transform_groups(t: TransformConfig, calibrated: bool, proxy: bool = False) -> list[list[PreTransform]]:
    """The pre-transforms a build tries, in groups it pairs with every rotation in turn: the
    data-free strengths (a fixed SmoothQuant strength, smooth_alpha, stands in for them) with,
    for a layer that has an activation estimate (``proxy``), smoothing on it; then, with
    statistics, the smooth_search strengths."""
    if t.smooth_alpha > 0:
        return [[Smooth(t.smooth_alpha)]]
    extra = [ProxySmooth(a) for a in t.proxy_smooth if a > 0] if proxy and uses_estimate(t) else []
    groups = [[equalizing(beta) for beta in t.equalize or (0.0,)] + extra]
    if calibrated and t.smooth_search:
        groups.append([smoothing(alpha) for alpha in t.smooth_search])
    return groups


def statistics_needed(t: TransformConfig) -> list[str]:
    """The fields of ``t`` that ask for a pre-transform needing calibration statistics."""
    return ["transform.smooth_alpha"] if t.smooth_alpha > 0 else []


def describe(t: TransformConfig) -> str:
    """The pre-transforms' part of a config's one-line summary ("" for none)."""
    fixed = f" smooth={t.smooth_alpha}" if t.smooth_alpha else ""
    searched = f" per-layer: eq={list(t.equalize)}" if t.equalize else ""
    if t.equalize and uses_estimate(t) and t.proxy_smooth:  # data-free, on the activation estimate
        searched += f" act-estimate smooth={list(t.proxy_smooth)}"
    return fixed + searched + (f" smooth={list(t.smooth_search)}" if t.smooth_search else "")
