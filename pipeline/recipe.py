"""A config resolved once into what every layer's pack tries: the candidates (a pre-transform,
then a rotation), the weight's scale search, and the refinements after the choice (GPTQ,
the 8-bit fallback). Workers receive the recipe; nothing below it looks a handler up by name.

A candidate's transform is built on a :class:`~.basis.Basis`: the pre-transform's ``in_scale``
stage first (the statistics follow it into the scaled basis), then the rotation's stages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.stages import SCALE
from duquant_runtime.stats import LayerStats

from .basis import Basis, Transform
from .methods import NO_ROTATION, Method, handler
from .pretransforms import NONE, Equalize, PreTransform, pre_transform_groups, smoothing


@dataclass(frozen=True)
class Candidate:
    """One transform a build tries: a pre-transform, then a rotation (or none)."""

    rotation: Method
    pre: PreTransform = NONE

    def label(self) -> str:
        """The choice label recorded in the bundle, e.g. "hadamard+eq0.5", "rtn"."""
        return self.rotation.label + self.pre.suffix

    def transform(
        self, w: np.ndarray, t: TransformConfig, stats: LayerStats | None, rms: np.ndarray | None = None
    ) -> Transform:
        """The candidate's stages and ``w`` in their basis. ``rms``: ``w``'s column RMS, when known."""
        basis = Basis(torch.from_numpy(np.ascontiguousarray(w)).to(self.rotation.basis_dtype(w)))
        s = self.pre.factors(w, stats, rms)
        if s is not None:
            basis.add(SCALE, "in_scale", 1.0 / s)
            stats = None if stats is None else stats.scaled(1.0 / s)
        self.rotation.build(basis, t, stats)
        return basis.result()


def candidates(t: TransformConfig, calibrated: bool) -> list[Candidate]:
    """The transforms build tries for one layer, in a fixed order (ties keep the first): each
    group of pre-transforms with the method, then with no rotation (``rtn_candidate``)."""
    rotations = (handler(t.method), NO_ROTATION) if t.rtn_candidate else (handler(t.method),)
    groups = pre_transform_groups(t, calibrated)
    return [Candidate(rotation, pre) for group in groups for rotation in rotations for pre in group]


@dataclass(frozen=True)
class Recipe:
    """What a build does to every layer of one config: resolved once, sent to the workers."""

    config: DuQuantConfig
    candidates: tuple[Candidate, ...]
    calibrated: bool

    @property
    def rotation(self) -> Method:
        return self.candidates[0].rotation

    @property
    def records_choice(self) -> bool:
        """Does each pack record which candidate and refinements it kept?"""
        q = self.config.quant
        return self.config.per_layer_choice or q.gptq or q.min_sqnr_db > 0


def resolve(config: DuQuantConfig, calibrated: bool) -> Recipe:
    """``config``'s recipe; ``calibrated``: the build has calibration statistics."""
    return Recipe(config, tuple(candidates(config.transform, calibrated)), calibrated)


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
    """One transform named by its parts: an equalization (data-free strength ``equalize``, or
    SmoothQuant ``smooth``, default the config's smooth_alpha), then the config's method, or
    nothing when ``rotate`` is False."""
    smooth = t.smooth_alpha if smooth is None else smooth
    pre = smoothing(smooth) if smooth > 0 else (Equalize(equalize) if equalize > 0 else NONE)
    return Candidate(handler(t.method) if rotate else NO_ROTATION, pre).transform(w, t, stats, rms)
