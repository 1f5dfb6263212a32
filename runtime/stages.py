"""A layer's transform as an ordered list of stages, and the one implementation of each.

The input transform T maps an input row to the basis the codes live in: x_t = x·T with
T = S_1·S_2·…·S_n, the stages applied left to right. Three kinds of stage::

    scale   x·diag(v)                     v float32 [in]          (equalization, smoothing)
    perm    x[..., v]                     v int32 [in]
    rotate  x·blockdiag(v_0, …, v_nb-1)   v float32 [nb, B, B]    (last block identity-padded)

The weight goes the other way: x·Wᵀ = x_t·W_tᵀ for W_t = W·T⁻ᵀ (``to_basis``: the pipeline
computes the codes' basis with it), and the effective weight W_t·Tᵀ walks the stages
backwards (``from_basis``). Output stages (svd's row rotation) act on the layer's output:
y = y_t·blockdiag(v), so W_t = blockdiag(v)·W for an orthogonal v.

The runtime's forward, ``.weight``, calibration and every build-time figure go through
these functions: there is no second copy of the forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS = ("scale", "perm", "rotate")
# Stage keys name buffers and bundle datasets: any identifier but the layer's own fields.
KEY_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}\Z")
RESERVED_KEYS = frozenset({"qweight", "w_scale", "w_t", "bias", "act_scale", "dtype_ref", "weight"})
# Bundles written before stages were listed (format 1, and format 2 from 0.2.0) hold these
# datasets, always applied in this order.
LEGACY_INPUT = (("scale", "in_scale"), ("perm", "perm"), ("rotate", "r_in"), ("perm", "perm2"), ("rotate", "r_in2"))
LEGACY_OUTPUT = (("rotate", "r_out"),)


@dataclass(frozen=True)
class StageSpec:
    """A stage without its values: what a layer's buffers and a bundle's datasets are."""

    kind: str
    key: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown stage kind {self.kind!r}; kinds are {', '.join(KINDS)}")
        if not KEY_PATTERN.match(self.key) or self.key in RESERVED_KEYS:
            raise ValueError(f"stage key {self.key!r} is not a valid buffer name")


def check_plan(inputs: tuple[StageSpec, ...], outputs: tuple[StageSpec, ...]) -> None:
    """Keys unique across both lists; output stages are rotations (nothing else is defined there)."""
    keys = [s.key for s in (*inputs, *outputs)]
    if len(set(keys)) != len(keys):
        raise ValueError(f"stage keys must be unique, got {keys}")
    if any(s.kind != "rotate" for s in outputs):
        raise ValueError("output stages must be rotations")


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
    [tokens·nb, B] rows, no transposed copies (every Hadamard layer without signs)."""
    return (x.reshape(-1, block.shape[0]) @ block).view(x.shape)


def is_uniform(blocks: torch.Tensor, width: int) -> bool:
    """Every block is the same matrix and the blocks tile ``width`` exactly (one-GEMM path)."""
    return width % blocks.shape[1] == 0 and bool((blocks == blocks[:1]).all())


def _rotate(x: torch.Tensor, blocks: torch.Tensor, uniform: bool, transpose: bool) -> torch.Tensor:
    blocks = blocks.to(x.dtype)
    if uniform:
        return same_block_rotate(x, blocks[0].t() if transpose else blocks[0])
    return block_rotate(x, blocks.transpose(1, 2) if transpose else blocks)


def apply(kind: str, x: torch.Tensor, value: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """x·S for one stage S (x [..., in])."""
    if kind == "scale":
        return x * value.to(x.dtype)
    if kind == "perm":
        return x.index_select(-1, value)
    return _rotate(x, value, uniform, transpose=False)


def to_basis(kind: str, w: torch.Tensor, value: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """w·S⁻ᵀ for one stage (w [out, in]): a scale divides, a permutation and an orthogonal
    rotation act on the weight's columns as on the inputs."""
    if kind == "scale":
        return w / value.to(w.dtype)
    return apply(kind, w, value, uniform)


def from_basis(kind: str, w: torch.Tensor, value: torch.Tensor, uniform: bool = False) -> torch.Tensor:
    """w·Sᵀ for one stage (any S: format-1 rotations may carry a smoothing and not be orthogonal)."""
    if kind == "scale":
        return w * value.to(w.dtype)
    if kind == "perm":
        return torch.empty_like(w).index_copy_(-1, value.long(), w)
    return _rotate(w, value, uniform, transpose=True)


def forward(plan: list[tuple[str, torch.Tensor, bool]], x: torch.Tensor) -> torch.Tensor:
    """x·T for stages given as (kind, value, uniform), in order."""
    for kind, value, uniform in plan:
        x = apply(kind, x, value, uniform)
    return x


def weight_to_basis(plan: list[tuple[str, torch.Tensor, bool]], w: torch.Tensor) -> torch.Tensor:
    """W·T⁻ᵀ: the weight in the stages' basis."""
    for kind, value, uniform in plan:
        w = to_basis(kind, w, value, uniform)
    return w


def weight_from_basis(plan: list[tuple[str, torch.Tensor, bool]], w: torch.Tensor) -> torch.Tensor:
    """W_t·Tᵀ: the effective weight in the original basis (stages walked backwards)."""
    for kind, value, uniform in reversed(plan):
        w = from_basis(kind, w, value, uniform)
    return w


def rows_to_basis(plan: list[tuple[str, torch.Tensor, bool]], w: torch.Tensor) -> torch.Tensor:
    """blockdiag(R)·W for output rotations R: y_t = x·W_tᵀ then y = y_t·R gives x·Wᵀ."""
    for _, value, uniform in plan:
        w = _rotate(w.t(), value, uniform, transpose=True).t()
    return w


def rows_from_basis(plan: list[tuple[str, torch.Tensor, bool]], w: torch.Tensor) -> torch.Tensor:
    """blockdiag(R)ᵀ·W_t: the effective weight's rows back in the output basis."""
    for _, value, uniform in reversed(plan):
        w = _rotate(w.t(), value, uniform, transpose=False).t()
    return w
