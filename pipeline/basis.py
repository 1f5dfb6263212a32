"""A transform under construction: a :class:`Basis` starts from the weight W and adds stages
one at a time; after each it holds the weight in the new basis (``duquant_runtime.stages.
to_basis``: the same code the runtime's forward and ``.weight`` use), which is what the next
stage is computed from. :class:`Transform` is the finished list of stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from duquant_runtime import stages as st
from duquant_runtime.stages import Plan, StageKind, StageSpec


@dataclass
class Transform:
    """A layer's stages (values float64, permutations int64) and its weight in their basis."""

    stages: list[tuple[StageSpec, np.ndarray]] = field(default_factory=list)
    out_stages: list[tuple[StageSpec, np.ndarray]] = field(default_factory=list)
    w_t: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    def value(self, key: str) -> np.ndarray | None:
        return next((v for s, v in (*self.stages, *self.out_stages) if s.key == key), None)

    def plan(self, dtype: torch.dtype = torch.float64) -> Plan:
        """The input stages as a loaded layer runs them, float values in ``dtype``."""
        plan: Plan = []
        for s, v in self.stages:
            t = s.kind.exact(v)
            plan.append((s.kind, t.to(dtype) if t.is_floating_point() else t))
        return plan

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] in the transformed basis, exactly as the runtime computes it."""
        return st.forward(self.plan(), x)


class Basis:
    """A transform under construction: the stages so far and the weight in their basis."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.tr = Transform()

    def add(self, kind: StageKind, key: str, value: np.ndarray) -> None:
        """Append an input stage; the weight moves into its basis."""
        self.w = kind.to_basis(self.w, kind.exact(value))
        self.tr.stages.append((StageSpec(kind, key), value))

    def add_output(self, kind: StageKind, key: str, value: np.ndarray) -> None:
        """Append an output stage (it acts on the layer's output rows); the weight's rows move."""
        self.w = st.rows_to_basis([(kind, kind.exact(value))], self.w)
        self.tr.out_stages.append((StageSpec(kind, key), value))

    def result(self) -> Transform:
        self.tr.w_t = np.ascontiguousarray(self.w.numpy())
        return self.tr


def transformed_hessian(tr: Transform, hessian: np.ndarray) -> torch.Tensor:
    """Tᵀ H T for the input transform T (equalization included: it is a stage)."""
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    return tr.apply_input(tr.apply_input(h).t().contiguous())
