"""The pack transforms: DESIGN.md §5's seed-compatible "svd" method, "hadamard" and "duquant".

A transform is x -> x[perm] · blockdiag(r_in) [· perm2 · blockdiag(r_in2)], and for svd
optionally y -> blockdiag(r_out) · y on the output rows. All math runs in float64.

svd: only B x B factors are ever formed: the left singular vectors of a block M (B x K)
are the eigenvectors of its B x B Gram matrix M Mᵀ, so no K x K right-singular matrix is
materialized (the seed's full SVD built up to 16384² per block, which is where its minutes
went).

Every method can be preceded by a per-input-channel equalization x/s, W·s (stored as the
``in_scale`` stage 1/s, applied before the permutation and rotation): from the weights alone
(``equalization_factors``) or, with calibration statistics, SmoothQuant's
(``smoothing_factors``). In trained networks the largest activation channels feed the
smallest weight columns; a rotation that mixes such a channel with ordinary ones multiplies
the large activation by full-size 4-bit errors. Equalizing first makes the product
x_j·W[:, j], which is what matters, the thing the rotation spreads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from duquant_runtime.config import TransformConfig
from duquant_runtime.stats import LayerStats

from .rotations import balanced_zigzag, greedy_rotation, hadamard_blocks
from .weightquant import quantize_weight

PEAK_ROWS = 1024  # weight rows (evenly spaced) the greedy rotation looks at: bounds its cost


@dataclass
class Transform:
    """The stages of one layer's input transform and its weight in the transformed basis."""

    perm: np.ndarray | None  # int64 [in]
    r_in: np.ndarray | None  # float64 [n_blocks, B, B], last block identity-padded; None: no rotation
    r_out: np.ndarray | None  # float64 [n_out_blocks, Bo, Bo]
    w_t: np.ndarray  # [out, in], float64 (svd, duquant) or float32 (hadamard)
    perm2: np.ndarray | None = None  # int64 [in], duquant's zigzag between its two rotations
    r_in2: np.ndarray | None = None  # float64 [n_blocks, B, B]
    in_scale: np.ndarray | None = None  # float64 [in]: x -> x·in_scale before everything else

    def apply_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, in] (float64) in the transformed basis, exactly as the runtime computes it."""
        if self.in_scale is not None:
            x = x * torch.from_numpy(self.in_scale).to(x.dtype)
        if self.perm is not None:
            x = x.index_select(1, torch.from_numpy(self.perm))
        if self.r_in is not None:
            x = rotate_column_blocks(x, self.r_in)
        if self.perm2 is not None:
            x = x.index_select(1, torch.from_numpy(self.perm2))
        if self.r_in2 is not None:
            x = rotate_column_blocks(x, self.r_in2)
        return x


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


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -x.shape[-1] % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def column_block_bases(w: torch.Tensor, block: int) -> np.ndarray:
    """U_b = left singular vectors of W[:, block b]ᵀ, i.e. eigenvectors of W_bᵀW_b [nb, B, B].

    Zero-padded columns make the short last block's Gram zero outside its r x r corner;
    that corner is decomposed alone so the block is a true r x r basis, identity-padded.
    """
    k, n = w.shape
    nb, tail = -(-n // block), n % block
    blocks = _pad_last(w, block).reshape(k, nb, block).permute(1, 2, 0)  # [nb, B, k]
    gram = torch.bmm(blocks, blocks.transpose(1, 2)).numpy()
    out = np.tile(np.eye(block), (nb, 1, 1))
    full = nb - (1 if tail else 0)
    if full:
        out[:full] = gram_basis(gram[:full])
    if tail:
        out[full, :tail, :tail] = gram_basis(gram[full, :tail, :tail])
    return out


def rotate_column_blocks(w: torch.Tensor, blocks: np.ndarray) -> torch.Tensor:
    """w [K, n] · blockdiag(blocks) (blocks identity-padded past n)."""
    k, n = w.shape
    nb, b, _ = blocks.shape
    wb = _pad_last(w, b).reshape(k, nb, b).transpose(0, 1)  # [nb, K, B]
    return torch.bmm(wb, torch.from_numpy(blocks).to(w.dtype)).transpose(0, 1).reshape(k, nb * b)[:, :n]


def svd_transform(w_np: np.ndarray, t: TransformConfig, stats: LayerStats | None = None) -> Transform:
    """Steps 1-5 of §5 for a weight ``w`` [out, in] (float64). Weight-only: ``stats`` unused."""
    w = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float64))
    perm = zigzag_permutation(w, t.lambda_smooth) if t.permute else None
    w_p = w.index_select(1, torch.from_numpy(perm)) if perm is not None else w
    r_in = column_block_bases(w_p, t.block_size)
    w_t = rotate_column_blocks(w_p, r_in)
    r_out = None
    if t.row_rot == "restore":
        # Rows of W are columns of Wᵀ: U_b = left singular vectors of W[rows_b, :].
        r_out = column_block_bases(w.t(), t.block_out_size)
        # blockdiag(R_out) · W_t, block by block on contiguous row groups.
        out_f, bo = w_t.shape[0], t.block_out_size
        nbo = r_out.shape[0]
        rows = torch.nn.functional.pad(w_t, (0, 0, 0, nbo * bo - out_f)).reshape(nbo, bo, -1)
        w_t = torch.bmm(torch.from_numpy(r_out), rows).reshape(nbo * bo, -1)[:out_f]
    return Transform(perm, r_in, r_out, np.ascontiguousarray(w_t.numpy()))


def hadamard_transform(w_np: np.ndarray, t: TransformConfig, stats: LayerStats | None = None) -> Transform:
    """Block Hadamard (optionally with seeded random signs); the seed's zigzag first if permute.

    float32 throughout: a Hadamard rotation is exact to ~1e-7, far below 4-bit steps, and
    it halves the memory traffic of the largest layers."""
    w = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float32))
    perm = zigzag_permutation(w, t.lambda_smooth) if t.permute else None
    w_p = w.index_select(1, torch.from_numpy(perm)) if perm is not None else w
    r_in = hadamard_blocks(w.shape[1], t.block_size, signs=t.hadamard_signs, seed=t.seed)
    k, n = w_p.shape
    if n % t.block_size == 0 and not t.hadamard_signs:
        # Every block is the same H: one [k·nb, B] x [B, B] GEMM, no block transposes.
        h = torch.from_numpy(r_in[0]).to(w_p.dtype)
        w_t = (w_p.contiguous().view(-1, t.block_size) @ h).view(k, n)
    else:
        w_t = rotate_column_blocks(w_p, r_in)
    return Transform(perm, r_in, None, np.ascontiguousarray(w_t.numpy()))


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


def duquant_transform(w_np: np.ndarray, t: TransformConfig, stats: LayerStats | None = None) -> Transform:
    """DuQuant: greedy rotation, zigzag permutation balancing block maxima, greedy rotation."""
    w = torch.from_numpy(np.ascontiguousarray(w_np, dtype=np.float64))
    peaks = peak_rows(w, stats)
    r1 = greedy_rotation(peaks, t.block_size, t.max_rotation_step, t.seed)
    rotated = rotate_column_blocks(peaks, r1)
    perm2 = None
    if t.permute:
        perm2 = balanced_zigzag(rotated.abs().amax(dim=0).numpy(), t.block_size)
        rotated = rotated.index_select(1, torch.from_numpy(perm2))
    r2 = greedy_rotation(rotated, t.block_size, t.max_rotation_step, t.seed + 1)
    tr = Transform(None, r1, None, np.empty(0), perm2=perm2, r_in2=r2)
    tr.w_t = np.ascontiguousarray(tr.apply_input(w).numpy())
    return tr


def no_rotation(w_np: np.ndarray, t: TransformConfig, stats: LayerStats | None = None) -> Transform:
    """Plain per-row round-to-nearest: no permutation, no rotation."""
    return Transform(None, None, None, np.ascontiguousarray(w_np))


METHODS = {"svd": svd_transform, "hadamard": hadamard_transform, "duquant": duquant_transform}
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


def equalization_factors(w: np.ndarray, beta: float) -> np.ndarray:
    """Data-free equalization: s_j = rms(W[:, j])^-β, so W·s has columns of equal size at β = 1.

    In trained networks a tiny weight column usually meets a large activation channel (the
    consumer compensates its producer), so x/s shrinks exactly the channels that a rotation
    must not spread; with independent outliers β = 0.5 is the choice that balances weight and
    activation error (Cauchy-Schwarz on ‖x/s‖·‖W·s‖). Build measures which β each layer wants.
    """
    rms = np.sqrt(np.mean(np.square(w, dtype=np.float64), axis=0))
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
) -> Transform:
    """One candidate transform and the weight in its basis: an equalization (data-free
    strength ``equalize``, or SmoothQuant ``smooth``, default the config's smooth_alpha)
    followed by the config's method, or by nothing when ``rotate`` is False."""
    smooth = t.smooth_alpha if smooth is None else smooth
    s = None
    if smooth > 0:
        if stats is None:
            raise ValueError("SmoothQuant smoothing needs calibration statistics (--calib)")
        s = smoothing_factors(stats.absmax, w, smooth)
    elif equalize > 0:
        s = equalization_factors(w, equalize)
    if s is not None:
        w = (w * s[None, :]).astype(w.dtype)
        stats = None if stats is None else stats.scaled(1.0 / s)
    tr = (METHODS[t.method] if rotate else no_rotation)(w, t, stats)
    if s is not None:
        tr.in_scale = 1.0 / s
    return tr


def transformed_hessian(tr: Transform, hessian: np.ndarray) -> torch.Tensor:
    """Tᵀ H T for the input transform T (equalization included: apply_input carries it)."""
    h = torch.from_numpy(np.asarray(hessian, dtype=np.float64))
    return tr.apply_input(tr.apply_input(h).t().contiguous())


def quantize_rows(w_t_np: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 6 of §5, the seed's scale search: 5 clip ratios alpha, least squared error."""
    codes, scales, _ = quantize_weight(torch.from_numpy(np.ascontiguousarray(w_t_np, dtype=np.float64)), bits)
    return codes, scales
