"""A config resolved once into what every layer's pack tries: the candidates (a pre-transform,
then a rotation), the weight's scale search, and the code refinements after the choice.
Workers receive the recipe; nothing below it looks a handler up by name.

A candidate's transform is built on a :class:`~.basis.Basis`: the pre-transform's ``in_scale``
stage first (the statistics follow it into the scaled basis), then the rotation's stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.stats import LayerStats

from . import pretransforms, rotations, weightquant
from .basis import Basis, Transform
from .pretransforms import NONE, PreTransform, fixed_pre_transform, pre_transform_groups
from .rotations import Method, handler

# block_search's 0 (the full width) stops here: the rotation is one [n, n] matrix, shared by the
# layers of that width, and its product costs n² per row, as much as a square layer of that width.
FULL_WIDTH_MAX = 4096


@dataclass(frozen=True)
class Candidate:
    """One transform a build tries: a pre-transform, then a rotation (or none)."""

    rotation: Method
    pre: PreTransform = NONE
    block: int | None = None  # the rotation's block size when not the config's (block_search)

    def label(self) -> str:
        """The choice label recorded in the bundle: the rotation's (with its block when searched),
        then the pre-transform's."""
        return self.rotation.label + ("" if self.block is None else str(self.block)) + self.pre.suffix

    def transform(
        self,
        w: np.ndarray,
        t: TransformConfig,
        stats: LayerStats | None,
        rms: np.ndarray | None = None,
        act: np.ndarray | None = None,
    ) -> Transform:
        """The candidate's stages and ``w`` in their basis. ``rms``: ``w``'s column RMS, when known;
        ``act``: the layer's data-free activation estimate, when it has one."""
        basis = Basis(torch.from_numpy(np.ascontiguousarray(w)).to(self.rotation.basis_dtype(w)))
        stats = self.pre.build(basis, w, stats, rms, act)
        self.rotation.build(basis, t if self.block is None else dataclasses.replace(t, block_size=self.block), stats)
        return basis.result()


def candidates(t: TransformConfig, calibrated: bool, proxy: bool = False) -> list[Candidate]:
    """The transforms build tries for one layer, in a fixed order (ties keep the first): each
    group of pre-transforms with every rotation in turn. ``proxy``: the layer has a data-free
    activation estimate (its candidates include smoothing on it)."""
    groups = pre_transform_groups(t, calibrated, proxy)
    return [Candidate(rotation, pre) for group in groups for rotation in rotations.rotations(t) for pre in group]


@dataclass(frozen=True)
class Recipe:
    """What a build does to every layer of one config: resolved once, sent to the workers."""

    config: DuQuantConfig
    candidates: tuple[Candidate, ...]
    calibrated: bool
    refinements: tuple[weightquant.Refinement, ...] = ()
    proxy_candidates: tuple[Candidate, ...] = ()  # for a layer with an activation estimate

    def block_variants(self, leader: Candidate, width: int) -> list[Candidate]:
        """``leader`` at the other ``block_search`` sizes, when its rotation takes a block size
        (0: the layer's ``width``, where it is a power of two up to FULL_WIDTH_MAX)."""
        t = self.config.transform
        if leader.block is not None or not leader.rotation.block_searchable:
            return []
        full = width if width <= FULL_WIDTH_MAX and not width & (width - 1) else None
        sizes = dict.fromkeys(full if b == 0 else b for b in t.block_search)
        return [Candidate(leader.rotation, leader.pre, b) for b in sizes if b and b != t.block_size and b <= width]

    def options(self, has_proxy: bool) -> tuple[Candidate, ...]:
        """The candidates one layer tries."""
        return self.proxy_candidates if has_proxy and self.proxy_candidates else self.candidates

    @property
    def rotation(self) -> Method:
        return self.candidates[0].rotation

    @property
    def records_choice(self) -> bool:
        """Does each pack record which candidate and refinements it kept?"""
        return self.config.per_layer_choice or bool(self.refinements) or self.config.quant.min_sqnr_db > 0


def resolve(config: DuQuantConfig, calibrated: bool) -> Recipe:
    """``config``'s recipe; ``calibrated``: the build has calibration statistics."""
    found = tuple(candidates(config.transform, calibrated))
    with_proxy = () if calibrated else tuple(candidates(config.transform, calibrated, proxy=True))
    return Recipe(config, found, calibrated, weightquant.refinements(config.quant), with_proxy)


def statistics_needed(config: DuQuantConfig) -> list[str]:
    """The config fields set in ``config`` that need calibration statistics."""
    switches = [r.switch for r in weightquant.refinements(config.quant)]
    if config.quant.a4_min_sqnr_db > 0:  # measured on the held-out half of the captured sample
        switches.append("quant.a4_min_sqnr_db")
    return switches + pretransforms.statistics_needed(config.transform)


def describe(config: DuQuantConfig) -> str:
    """What a build of ``config`` does, in one line: method, weights, pre-transforms, candidates."""
    t = config.transform
    return (
        f"method={t.method} weights={weightquant.describe(config.quant)}"
        f"{pretransforms.describe(t)}{rotations.describe(t)}"
    )


def compute_transform(
    w: np.ndarray,
    t: TransformConfig,
    stats: LayerStats | None = None,
    *,
    rotation: Method | None = None,
    pre: PreTransform | None = None,
    rms: np.ndarray | None = None,
) -> Transform:
    """One transform named by its parts: the pre-transform ``pre`` (default the config's fixed
    one, if any), then ``rotation`` (default the config's method)."""
    pre = fixed_pre_transform(t) if pre is None else pre
    return Candidate(handler(t.method) if rotation is None else rotation, pre).transform(w, t, stats, rms)
