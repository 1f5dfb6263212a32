"""The pack algorithm: DESIGN.md §5, the seed-compatible "svd" method.

All math runs in float64 (torch for the batched products, NumPy for the small
eigendecompositions). Only B x B factors are ever formed: the left singular
vectors of a block M (B x K) are the eigenvectors of its B x B Gram matrix M Mᵀ, so
no K x K right-singular matrix is materialized (the seed's full SVD built up to
16384² per block, which is where its minutes went).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from duquant_runtime.config import TransformConfig
from duquant_runtime.packing import qmax

ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)
# Scale floor: an all-zero row gets this scale and all-zero codes, never a division by 0.
SCALE_FLOOR = 1e-10
ROW_CHUNK = 1024  # rows per step of the scale search: bounds temporaries to ~5 x chunk x in


@dataclass
class Transform:
    """The orthogonal pieces of one layer and its weight in the transformed basis."""

    perm: np.ndarray | None  # int64 [in]
    r_in: np.ndarray  # float64 [n_blocks, B, B], last block identity-padded
    r_out: np.ndarray | None  # float64 [n_out_blocks, Bo, Bo]
    w_t: np.ndarray  # float64 [out, in]


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
    return torch.bmm(wb, torch.from_numpy(blocks)).transpose(0, 1).reshape(k, nb * b)[:, :n]


def svd_transform(w_np: np.ndarray, t: TransformConfig) -> Transform:
    """Steps 1-5 of §5 for a weight ``w`` [out, in] (float64)."""
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


METHODS = {"svd": svd_transform}


def quantize_rows(w_t_np: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: per-row scale with the clip ratio alpha searched by least squared error.

    The float32-rounded scale is the one searched, stored and used at runtime, so
    codes and scale agree exactly. Ties keep the earlier alpha. Returns (codes int8,
    scales float32).
    """
    q = qmax(bits)
    w_t = torch.from_numpy(np.ascontiguousarray(w_t_np, dtype=np.float64))
    codes = torch.empty(w_t.shape, dtype=torch.int8)
    scales = torch.empty(w_t.shape[0], dtype=torch.float32)
    for start in range(0, w_t.shape[0], ROW_CHUNK):
        rows = w_t[start : start + ROW_CHUNK]
        peak = rows.abs().amax(dim=1)
        best_err = torch.full_like(peak, float("inf"))
        best_s = torch.zeros_like(peak)
        for alpha in ALPHAS:
            s = (peak / q / alpha).clamp_min(SCALE_FLOOR).float().double()[:, None]
            err = (rows / s).round_().clamp_(-q - 1, q).mul_(s).sub_(rows).square_().sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s[:, 0], best_s)
        codes[start : start + ROW_CHUNK] = (rows / best_s[:, None]).round_().clamp_(-q - 1, q).to(torch.int8)
        scales[start : start + ROW_CHUNK] = best_s.float()
    return codes.numpy(), scales.numpy()
