"""The rotations (``transform.method``): one handler each — name, version, validation, and
its stages.

A handler adds its stages to a :class:`~.basis.Basis` (which keeps the weight in the
current basis); codes and scales are then searched on the final weight by ``pack.py``, the
same for every method. A new method made of existing stage kinds (``duquant_runtime.stages``) is one
more class here, registered in ``HANDLERS``; its version enters the fingerprint.
``NO_ROTATION`` is the per-layer choice's round-to-nearest candidate: no stage at all.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.errors import ConfigError
from duquant_runtime.stages import PERM, ROTATE, TILED_ROTATE
from duquant_runtime.stats import LayerStats

from .basis import Basis
from .rotations import balanced_zigzag, column_block_bases, greedy_rotation, hadamard_blocks, zigzag_permutation

PEAK_ROWS = 1024  # weight rows (evenly spaced) duquant's greedy rotation looks at: bounds its cost


class Method:
    """A pack method. ``dtype`` is the precision its stages are computed in."""

    name: ClassVar[str]
    version: ClassVar[int]
    dtype: ClassVar[torch.dtype] = torch.float32
    row_rotation: ClassVar[bool] = False  # does it define transform.row_rot = 'restore'?

    @property
    def label(self) -> str:
        """The rotation's part of a choice label."""
        return self.name

    def basis_dtype(self, w: np.ndarray) -> torch.dtype:
        """The precision the weight is carried in while the stages are built."""
        return self.dtype

    def validate(self, t: TransformConfig) -> None:
        if t.row_rot != "0" and not self.row_rotation:
            raise ConfigError(
                f"transform.row_rot = {t.row_rot!r} is only defined for method 'svd' (its output-row rotation); "
                f"set row_rot = '0' for method {self.name!r}, or method = 'svd'"
            )

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        raise NotImplementedError


class Svd(Method):
    """The seed's method (the openpi DuQuant prototype this tool replaces): zigzag permutation
    by smoothed column energy, then per block the left singular vectors of W_bᵀ; optionally
    the same on the output rows.
    float64, so the seed's numbers are reproduced."""

    name, version, dtype, row_rotation = "svd", 1, torch.float64, True

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        w = basis.w
        if t.permute:
            basis.add(PERM, "perm", zigzag_permutation(w, t.lambda_smooth))
        basis.add(ROTATE, "r_in", column_block_bases(basis.w, t.block_size))
        if t.row_rot == "restore":  # rows of W are columns of Wᵀ
            basis.add_output_rotation("r_out", column_block_bases(w.t(), t.block_out_size))


class Hadamard(Method):
    """Block Hadamard (optionally with seeded random signs), the seed's zigzag first if
    permute. float32: a Hadamard rotation is exact to ~1e-7, far below 4-bit steps, and it
    halves the memory traffic of the largest layers."""

    name, version = "hadamard", 1

    def validate(self, t: TransformConfig) -> None:
        super().validate(t)
        if t.block_size & (t.block_size - 1):
            raise ConfigError(
                f"transform.block_size must be a power of two for method 'hadamard' (16, 32, 64, 128), "
                f"got {t.block_size}"
            )

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        if t.permute:
            basis.add(PERM, "perm", zigzag_permutation(basis.w, t.lambda_smooth))
        width = basis.w.shape[1]
        blocks = hadamard_blocks(width, t.block_size, signs=t.hadamard_signs, seed=t.seed)
        if t.hadamard_signs or width % t.block_size:  # the blocks differ (signs, a short tail)
            basis.add(ROTATE, "r_in", blocks)
        else:  # one matrix tiles the width: stored once, one GEMM per forward
            basis.add(TILED_ROTATE, "r_in", blocks[0])


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit RMS: per-row (per-token) quantization cares about max / RMS."""
    rms = x.square().mean(dim=1, keepdim=True).sqrt()
    return x / torch.where(rms > 0, rms, torch.ones_like(rms))


def peak_rows(w: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """The rows whose block maxima the greedy rotation flattens: evenly spaced weight rows,
    plus the calibration sample's activation rows when given, each at unit RMS."""
    step = max(1, w.shape[0] // PEAK_ROWS)
    rows = [_unit_rows(w[::step])]
    if stats is not None and stats.sample.shape[0]:
        rows.append(_unit_rows(torch.from_numpy(stats.sample).double()))
    return torch.cat(rows)


class DuQuant(Method):
    """DuQuant: greedy rotation, zigzag permutation balancing block maxima, greedy rotation."""

    name, version, dtype = "duquant", 1, torch.float64

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        peaks = Basis(peak_rows(basis.w, stats))  # the peak rows follow the weight through the stages
        r1 = greedy_rotation(peaks.w, t.block_size, t.max_rotation_step, t.seed)
        basis.add(ROTATE, "r_in", r1)
        peaks.add(ROTATE, "r_in", r1)
        if t.permute:
            perm2 = balanced_zigzag(peaks.w.abs().amax(dim=0).numpy(), t.block_size)
            basis.add(PERM, "perm2", perm2)
            peaks.add(PERM, "perm2", perm2)
        basis.add(ROTATE, "r_in2", greedy_rotation(peaks.w, t.block_size, t.max_rotation_step, t.seed + 1))


class NoRotation(Method):
    """No rotation (the candidate labelled "rtn"): the weight keeps its own precision."""

    name, version = "none", 1

    @property
    def label(self) -> str:
        return "rtn"

    def basis_dtype(self, w: np.ndarray) -> torch.dtype:
        return torch.from_numpy(w[:0]).dtype

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        return None


NO_ROTATION = NoRotation()  # not a transform.method: only the per-layer choice pairs it in
HANDLERS: dict[str, Method] = {m.name: m for m in (Svd(), Hadamard(), DuQuant())}


def handler(name: str) -> Method:
    method = HANDLERS.get(name)
    if method is None:
        raise ConfigError(f"transform.method must be one of {', '.join(HANDLERS)}, got {name!r}")
    return method


def check(config: DuQuantConfig) -> DuQuantConfig:
    """The method-specific checks of a config (the schema's own run when it is made)."""
    handler(config.transform.method).validate(config.transform)
    return config
