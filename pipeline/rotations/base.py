"""What every rotation (``transform.method``) is: a :class:`Method` with a name, a version and
its stages, registered by :func:`register`. One file per method beside this one; the package
finds them, so a new method is one more file (its version enters the fingerprint).

A method adds its stages to a :class:`~..basis.Basis` (which keeps the weight in the current
basis); codes and scales are then searched on the final weight by ``pack.py``, the same for
every method. ``NO_ROTATION`` is the per-layer choice's round-to-nearest candidate: no stage.
The seed's zigzag permutation lives here because more than one method may start with it.
"""

from __future__ import annotations

from typing import ClassVar, TypeVar

import numpy as np
import torch
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.errors import ConfigError
from duquant_runtime.stats import LayerStats

from ..basis import Basis


class Method:
    """A pack method. ``dtype`` is the precision its stages are computed in."""

    name: ClassVar[str]
    version: ClassVar[int]
    dtype: ClassVar[torch.dtype] = torch.float32
    row_rotation: ClassVar[bool] = False  # does it define transform.row_rot = 'restore'?
    block_searchable: ClassVar[bool] = False  # may a per-layer choice try it at other block sizes?

    @property
    def label(self) -> str:
        """The rotation's part of a choice label."""
        return self.name

    def basis_dtype(self, w: np.ndarray) -> torch.dtype:
        """The precision the weight is carried in while the stages are built."""
        return self.dtype

    def validate(self, t: TransformConfig) -> None:
        if t.row_rot != "0" and not self.row_rotation:
            with_rows = " or ".join(repr(m.name) for m in HANDLERS.values() if m.row_rotation)
            raise ConfigError(
                f"transform.row_rot = {t.row_rot!r} is only defined for method {with_rows} (its output-row "
                f"rotation); set row_rot = '0' for method {self.name!r}, or method = {with_rows}"
            )

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        raise NotImplementedError


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
HANDLERS: dict[str, Method] = {}  # filled once, at import, by each method's module

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator: one instance of ``cls`` serves every build under its name."""
    HANDLERS[cls.name] = cls()
    return cls


def handler(name: str) -> Method:
    method = HANDLERS.get(name)
    if method is None:
        raise ConfigError(f"transform.method must be one of {', '.join(sorted(HANDLERS))}, got {name!r}")
    return method


def rotations(t: TransformConfig) -> tuple[Method, ...]:
    """The rotations a build pairs with every pre-transform: the config's method, then (with
    ``rtn_candidate``) no rotation at all."""
    return (handler(t.method), NO_ROTATION) if t.rtn_candidate else (handler(t.method),)


def describe(t: TransformConfig) -> str:
    """The rotations' part of a config's one-line summary, beyond ``method``."""
    blocks = [b for b in t.block_search if b != t.block_size] if handler(t.method).block_searchable else []
    shown = "/".join("full width" if b == 0 else str(b) for b in blocks)
    lead = f" +block {shown} where it leads" if blocks else ""
    return lead + (" +no-rotation" if t.rtn_candidate else "")


def check(config: DuQuantConfig) -> DuQuantConfig:
    """The method-specific checks of a config (the schema's own run when it is made)."""
    handler(config.transform.method).validate(config.transform)
    return config


def smoothed_energy(w: torch.Tensor, lam: float) -> torch.Tensor:
    energy = (w * w).mean(dim=0)
    return (1.0 - lam) * energy + lam * energy.mean()


def zigzag(order: np.ndarray) -> np.ndarray:
    """Take alternately from the front and the back: o0, o[n-1], o1, o[n-2], ..."""
    n = order.shape[0]
    out = np.empty_like(order)
    out[0::2] = order[: (n + 1) // 2]
    out[1::2] = order[::-1][: n // 2]
    return out


def zigzag_permutation(w: torch.Tensor, lam: float) -> np.ndarray:
    """The seed's permutation: columns by smoothed energy, dealt front and back in turn."""
    energy = smoothed_energy(w, lam).numpy()
    return zigzag(np.argsort(-energy, kind="stable"))
