"""A layer's transform as an ordered list of stages, and each stage kind as one object.

The input transform T maps an input row to the basis the codes live in: x_t = x·T with
T = S_1·S_2·…·S_n, the stages applied left to right. Four kinds of stage::

    scale         x·diag(v)                     v float32 [in]          (equalization, smoothing)
    perm          x[..., v]                     v int32 [in]
    rotate        x·blockdiag(v_0, …, v_nb-1)   v float32 [nb, B, B]    (last block identity-padded)
    tiled_rotate  x·blockdiag(v, …, v)          v float32 [B, B]        (one block tiling the width)

The weight goes the other way: x·Wᵀ = x_t·W_tᵀ for W_t = W·T⁻ᵀ (``to_basis``: the pipeline
computes the codes' basis with it), and the effective weight W_t·Tᵀ walks the stages
backwards (``from_basis``). Output stages (svd's row rotation) act on the layer's output:
y = y_t·blockdiag(v), so W_t = blockdiag(v)·W for an orthogonal v.

A kind knows its math, its stored dtype and shape, its value checks, whether one array may
serve many layers and whether it keeps norms; nothing else switches on a kind's name. The
runtime's forward, ``.weight``, calibration and every build-time figure go through these
objects: there is no second copy of the forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

# Stage keys name buffers and bundle datasets: any identifier but the layer's own fields.
KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
RESERVED_KEYS = frozenset({"qweight", "w_scale", "w_t", "bias", "act_scale", "dtype_ref", "weight"})
F32 = (np.dtype(np.float32),)
MAX_BLOCK = 1 << 12


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x[..., n] · blockdiag(blocks) with ``blocks`` [nb, B, B] identity-padded past n.

    One batched matmul over all blocks (the short last block included, via zero padding).
    """
    nb, b, _ = blocks.shape
    n = x.shape[-1]
    pad = nb * b - n
    if pad:
        x = F.pad(x, (0, pad))
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, b).transpose(0, 1)  # [nb, tokens, B]
    y = torch.bmm(xb, blocks).transpose(0, 1).reshape(*lead, nb * b)
    return y[..., :n] if pad else y


def same_block_rotate(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x · blockdiag(block, ..., block) for a width that is a multiple of B: one GEMM over
    [tokens·nb, B] rows, no transposed copies."""
    return (x.reshape(-1, block.shape[0]) @ block).view(x.shape)


class StageKind:
    """One kind of stage. Instances are singletons, found by ``name`` (pickling keeps them so)."""

    name: ClassVar[str]
    shareable: ClassVar[bool] = False  # may one stored array serve many layers (/shared)?
    preserves_norm: ClassVar[bool] = False  # ‖x·S‖ = ‖x‖, so an error keeps its size through S
    at_output: ClassVar[bool] = False  # defined on a layer's output rows (orthogonal)
    stored_dtypes: ClassVar[tuple[np.dtype, ...]] = F32

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return kind_named, (self.name,)

    def __repr__(self) -> str:
        return self.name

    # --------------------------------------------------------------- storage
    def shape(self, width: int, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a stored array must have for a layer ``width`` wide (``stored``: what
        the file says, for a block size only the array itself gives)."""
        return (width,)

    def problem(self, value: np.ndarray) -> str | None:
        """What is wrong with a stored value that its shape cannot vouch for, None when sound."""
        return None if np.isfinite(value).all() else "holds NaN/Inf"

    def stored(self, value: np.ndarray) -> np.ndarray:
        """The array as a bundle stores it (from the build's float64 / int64)."""
        return value.astype(np.float32)

    def exact(self, value: np.ndarray) -> torch.Tensor:
        """The value in the build's precision (float64; permutations int64)."""
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))

    def tensor(self, value: np.ndarray, dtype: torch.dtype, device: torch.device | str | None) -> torch.Tensor:
        """The layer's buffer from a stored array, in the compute ``dtype``."""
        return torch.from_numpy(value).to(dtype=dtype, device=device)

    def placeholder(self, width: int, block: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.zeros(width, dtype=dtype, device=device)

    def block(self, value: np.ndarray | torch.Tensor) -> int:
        """The rotation block size of a stored value (0 for a kind without blocks)."""
        return 0

    # --------------------------------------------------------------- math
    def apply(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """x·S (x [..., width])."""
        raise NotImplementedError

    def to_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """w·S⁻ᵀ (w [out, width]); for an orthogonal S that is w·S, as on the inputs."""
        return self.apply(w, value)

    def from_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """w·Sᵀ (w [out, width])."""
        raise NotImplementedError


class Scale(StageKind):
    name = "scale"

    def problem(self, value: np.ndarray) -> str | None:
        return super().problem(value) or (None if (value > 0).all() else "is not positive")

    def tensor(self, value: np.ndarray, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.from_numpy(value).to(dtype=torch.float32, device=device)  # float32 at any compute dtype

    def placeholder(self, width: int, block: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.ones(width, dtype=torch.float32, device=device)

    def apply(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return x * value.to(x.dtype)

    def to_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return w / value.to(w.dtype)

    def from_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return w * value.to(w.dtype)


class Perm(StageKind):
    name = "perm"
    shareable = preserves_norm = True
    stored_dtypes = (np.dtype(np.int32), np.dtype(np.int64))

    def problem(self, value: np.ndarray) -> str | None:
        ok = np.array_equal(np.sort(value), np.arange(value.shape[0]))
        return None if ok else "is not a permutation of the input channels"

    def stored(self, value: np.ndarray) -> np.ndarray:
        return value.astype(np.int32)

    def exact(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))

    def tensor(self, value: np.ndarray, dtype: torch.dtype, device: Any) -> torch.Tensor:
        # int32 indices: half the bytes of int64, and index_select accepts them
        return torch.from_numpy(value.astype(np.int32, copy=False)).to(device=device)

    def placeholder(self, width: int, block: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.zeros(width, dtype=torch.int32, device=device)

    def apply(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return x.index_select(-1, value)

    def from_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(w).index_copy_(-1, value.long(), w)


class Rotate(StageKind):
    """Orthogonal blocks along the diagonal, one matrix per block."""

    name = "rotate"
    shareable = preserves_norm = at_output = True
    ndim: ClassVar[int] = 3

    def shape(self, width: int, stored: tuple[int, ...]) -> tuple[int, ...]:
        b = self._stored_block(stored)
        return (-(-width // b), b, b)

    def _stored_block(self, stored: tuple[int, ...]) -> int:
        b = int(stored[-1]) if len(stored) == self.ndim else 0
        if not 1 <= b <= MAX_BLOCK:
            raise ValueError(f"implausible rotation block size {b}")
        return b

    def placeholder(self, width: int, block: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.zeros(-(-width // block), block, block, dtype=dtype, device=device)

    def block(self, value: np.ndarray | torch.Tensor) -> int:
        return int(value.shape[-1])

    def apply(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return block_rotate(x, value.to(x.dtype))

    def from_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return block_rotate(w, value.to(w.dtype).transpose(1, 2))


class TiledRotate(Rotate):
    """One orthogonal block repeated along the diagonal (a Hadamard without signs), declared
    by the method that makes it and stored once: the forward is one GEMM."""

    name = "tiled_rotate"
    ndim = 2

    def shape(self, width: int, stored: tuple[int, ...]) -> tuple[int, ...]:
        b = self._stored_block(stored)
        if width % b:
            raise ValueError(f"a tiled rotation's block {b} does not tile the width {width}")
        return (b, b)

    def placeholder(self, width: int, block: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.zeros(block, block, dtype=dtype, device=device)

    def apply(self, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return same_block_rotate(x, value.to(x.dtype))

    def from_basis(self, w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return same_block_rotate(w, value.to(w.dtype).t())


SCALE, PERM, ROTATE, TILED_ROTATE = Scale(), Perm(), Rotate(), TiledRotate()
KINDS: dict[str, StageKind] = {k.name: k for k in (SCALE, PERM, ROTATE, TILED_ROTATE)}


def kind_named(name: str) -> StageKind:
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown stage kind {name!r}; kinds are {', '.join(KINDS)}")
    return kind


@dataclass(frozen=True)
class StageSpec:
    """A stage without its values: what a layer's buffers and a bundle's datasets are.
    ``kind`` may be given by name."""

    kind: StageKind
    key: str

    def __post_init__(self) -> None:
        if not isinstance(self.kind, StageKind):
            object.__setattr__(self, "kind", kind_named(str(self.kind)))
        if not KEY_PATTERN.match(self.key) or self.key in RESERVED_KEYS:
            raise ValueError(f"stage key {self.key!r} is not a valid buffer name")


def check_plan(inputs: tuple[StageSpec, ...], outputs: tuple[StageSpec, ...]) -> None:
    """Keys unique across both lists; output stages are rotations (nothing else is defined there)."""
    keys = [s.key for s in (*inputs, *outputs)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"stage keys must be unique, got {keys}")
    if not all(s.kind.at_output for s in outputs):
        raise ValueError("output stages must be rotations")


Plan = list[tuple[StageKind, torch.Tensor]]


def forward(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """x·T for stages given as (kind, value), in order."""
    for kind, value in plan:
        x = kind.apply(x, value)
    return x


def weight_to_basis(plan: Plan, w: torch.Tensor) -> torch.Tensor:
    """W·T⁻ᵀ: the weight in the stages' basis."""
    for kind, value in plan:
        w = kind.to_basis(w, value)
    return w


def weight_from_basis(plan: Plan, w: torch.Tensor) -> torch.Tensor:
    """W_t·Tᵀ: the effective weight in the original basis (stages walked backwards)."""
    for kind, value in reversed(plan):
        w = kind.from_basis(w, value)
    return w


def rows_to_basis(plan: Plan, w: torch.Tensor) -> torch.Tensor:
    """blockdiag(R)·W for output rotations R: y_t = x·W_tᵀ then y = y_t·R gives x·Wᵀ."""
    for kind, value in plan:
        w = kind.from_basis(w.t(), value).t()
    return w


def rows_from_basis(plan: Plan, w: torch.Tensor) -> torch.Tensor:
    """blockdiag(R)ᵀ·W_t: the effective weight's rows back in the output basis."""
    for kind, value in reversed(plan):
        w = kind.apply(w.t(), value).t()
    return w
