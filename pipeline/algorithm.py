"""A layer's transform, built stage by stage with the runtime's own stage functions.

A :class:`Basis` starts from the weight W and adds stages one at a time; after each it holds
the weight in the new basis (``duquant_runtime.stages.to_basis``: the same code the runtime's
forward and ``.weight`` use), which is what the next stage is computed from. A method
(``methods.py``) is a recipe of stages; ``compute_transform`` is one candidate a build tries:
an optional per-input-channel equalization, then the method or nothing.

Equalization x/s, W·s (stored as the ``in_scale`` stage 1/s, applied first): from the weights
alone (``equalization_factors``) or, with calibration statistics, SmoothQuant's
(``smoothing_factors``). In trained networks the largest activation channels feed the
smallest weight columns; a rotation that mixes such a channel with ordinary ones multiplies
the large activation by full-size 4-bit errors. Equalizing first makes the product
x_j·W[:, j], which is what matters, the thing the rotation spreads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from duquant_runtime import stages as st
from duquant_runtime.config import TransformConfig
from duquant_runtime.stages import StageSpec
from duquant_runtime.stats import LayerStats

from . import kernels

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


# ---------------------------------------------------------------- shared pieces of the methods


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
    energy = smoothed_energy(w, lam).numpy()
    return zigzag(np.argsort(-energy, kind="stable"))


def fix_signs(u: np.ndarray) -> np.ndarray:
    """Make the largest-magnitude entry of every column positive (deterministic packs)."""
    idx = np.argmax(np.abs(u), axis=-2)  # [..., B] row index per column
    pivot = np.take_along_axis(u, idx[..., None, :], axis=-2)
    return u * np.where(pivot < 0, -1.0, 1.0)


def gram_basis(gram: np.ndarray) -> np.ndarray:
    """Left singular vectors from Gram matrices [..., B, B]: eigenvectors, descending, sign-fixed.

    eigh returns a full orthonormal basis even when the block is rank-deficient, so
    U is always a complete B x B rotation.
    """
    _, vecs = np.linalg.eigh(gram)
    return fix_signs(vecs[..., ::-1])


def column_block_bases(w: torch.Tensor, block: int) -> np.ndarray:
    """U_b = left singular vectors of W[:, block b]ᵀ, i.e. eigenvectors of W_bᵀW_b [nb, B, B].

    Only B x B factors are formed (the seed's full SVD built up to 16384² per block). Zero-
    padded columns make the short last block's Gram zero outside its r x r corner; that
    corner is decomposed alone so the block is a true r x r basis, identity-padded.
    """
    k, n = w.shape
    nb, tail = -(-n // block), n % block
    padded = torch.nn.functional.pad(w, (0, nb * block - n))
    blocks = padded.reshape(k, nb, block).permute(1, 2, 0)  # [nb, B, k]
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).numpy()
    out = np.tile(np.eye(block), (nb, 1, 1))
    full = nb - (1 if tail else 0)
    if full:
        out[:full] = gram_basis(gram[:full])
    if tail:
        out[full, :tail, :tail] = gram_basis(gram[full, :tail, :tail])
    return out


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
    from .methods import handler

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
