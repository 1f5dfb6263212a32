"""A transform under construction: a :class:`Basis` starts from the weight W and adds stages
one at a time; after each it holds the weight in the new basis (``duquant_runtime.stages.
to_basis``: the same code the runtime's forward and ``.weight`` use), which is what the next
stage is computed from. :class:`Transform` is the finished list of stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from duquant_runtime import stages as st
from duquant_runtime.stages import StageSpec

Plan = list[tuple[str, torch.Tensor, bool]]


def _as_tensor(kind: str, value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64 if kind == "perm" else np.float64))


@dataclass
class Transform:
    """A layer's stages (values float64, permutations int64) and its weight in their basis."""

    stages: list[tuple[StageSpec, np.ndarray]] = field(default_factory=list)
    out_stages: list[tuple[StageSpec, np.ndarray]] = field(default_factory=list)
    w_t: np.ndarray = field(default_factory=lambda: np.empty((0, 0)))

    def value(self, key: str) -> np.ndarray | None:
        return next((v for s, v in (*self.stages, *self.out_stages) if s.key == key), None)

    def plan(self, dtype: torch.dtype = torch.float64) -> Plan:
        """The input stages as a loaded layer runs them: values in ``dtype``, uniform rotations
        flagged for the one-GEMM path."""
        width = self.w_t.shape[1]
        plan: Plan = []
        for s, v in self.stages:
            t = _as_tensor(s.kind, v)
            t = t if s.kind == "perm" else t.to(dtype)
            plan.append((s.kind, t, s.kind == "rotate" and st.is_uniform(t, width)))
        return plan

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] in the transformed basis, exactly as the runtime computes it."""
        return st.forward(self.plan(), x)


class Basis:
    """A transform under construction: the stages so far and the weight in their basis."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w
        self.tr = Transform()

    def add(self, kind: str, key: str, value: np.ndarray) -> None:
        """Append an input stage; the weight moves into its basis (one GEMM for a uniform rotation)."""
        t = _as_tensor(kind, value)
        uniform = kind == "rotate" and st.is_uniform(t, self.w.shape[1])
        self.w = st.to_basis(kind, self.w, t, uniform)
        self.tr.stages.append((StageSpec(kind, key), value))

    def add_output_rotation(self, key: str, blocks: np.ndarray) -> None:
        self.w = st.rows_to_basis([("rotate", _as_tensor("rotate", blocks), False)], self.w)
        self.tr.out_stages.append((StageSpec("rotate", key), blocks))

    def result(self) -> Transform:
        self.tr.w_t = np.ascontiguousarray(self.w.numpy())
        return self.tr


def transformed_hessian(tr: Transform, hessian: np.ndarray) -> torch.Tensor:
    """Tᵀ H T for the input transform T (equalization included: it is a stage)."""
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    return tr.apply_input(tr.apply_input(h).t().contiguous())
