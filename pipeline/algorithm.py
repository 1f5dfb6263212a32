"""The pack algorithm: DESIGN.md §5, the seed-compatible "svd" method.

All math runs in float64 NumPy. Only B x B factors are ever formed: the left singular
vectors of a block M (B x K) are the eigenvectors of its B x B Gram matrix M Mᵀ, so
no K x K right-singular matrix is materialized (the seed's full SVD built up to
16384² per block, which is where its minutes went).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from duquant_runtime.config import TransformConfig

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


def smoothed_energy(w: np.ndarray, lam: float) -> np.ndarray:
    energy = np.mean(w * w, axis=0)
    return (1.0 - lam) * energy + lam * energy.mean()


def zigzag(order: np.ndarray) -> np.ndarray:
    """Take alternately from the front and the back: o0, o[n-1], o1, o[n-2], ..."""
    n = order.shape[0]
    out = np.empty_like(order)
    out[0::2] = order[: (n + 1) // 2]
    out[1::2] = order[::-1][: n // 2]
    return out


def zigzag_permutation(w: np.ndarray, lam: float) -> np.ndarray:
    energy = smoothed_energy(w, lam)
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


def block_bases(columns: np.ndarray, block: int) -> np.ndarray:
    """U per block of ``block`` consecutive columns of ``columns`` [K, n]: U = left SVs of cols_bᵀ.

    Returns [ceil(n / block), block, block]; the short last block is identity-padded.
    """
    k, n = columns.shape
    nb, full = -(-n // block), n // block
    out = np.tile(np.eye(block), (nb, 1, 1))
    if full:
        body = columns[:, : full * block].reshape(k, full, block)
        out[:full] = gram_basis(np.einsum("knb,knc->nbc", body, body))
    tail = n - full * block
    if tail:
        cols = columns[:, full * block :]
        out[full, :tail, :tail] = gram_basis(cols.T @ cols)
    return out


def apply_blocks_right(w: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """w [K, n] · blockdiag(blocks) (blocks identity-padded past n)."""
    k, n = w.shape
    nb, b, _ = blocks.shape
    padded = np.zeros((k, nb * b))
    padded[:, :n] = w
    return np.einsum("knb,nbc->knc", padded.reshape(k, nb, b), blocks).reshape(k, nb * b)[:, :n]


def svd_transform(w: np.ndarray, t: TransformConfig) -> Transform:
    """Steps 1-5 of §5 for a weight ``w`` [out, in] (float64)."""
    perm = zigzag_permutation(w, t.lambda_smooth) if t.permute else None
    w_p = w[:, perm] if perm is not None else w
    r_in = block_bases(w_p, t.block_size)
    w_t = apply_blocks_right(w_p, r_in)
    r_out = None
    if t.row_rot == "restore":
        # Bases of the original rows: U of W[rows, :] = blocks over the columns of Wᵀ.
        r_out = block_bases(w.T, t.block_out_size)
        # blockdiag(R_out) · W_t == (W_tᵀ · blockdiag(R_out)ᵀ)ᵀ
        w_t = apply_blocks_right(w_t.T, np.swapaxes(r_out, 1, 2)).T
    return Transform(perm, r_in, r_out, np.ascontiguousarray(w_t))


METHODS = {"svd": svd_transform}


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_rows(w_t: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: per-row scale with the clip ratio alpha searched by least squared error.

    The float32-rounded scale is the one searched, stored and used at runtime, so
    codes and scale agree exactly. Ties keep the earlier alpha. Returns (codes int8,
    scales float32).
    """
    q = qmax(bits)
    codes = np.empty(w_t.shape, dtype=np.int8)
    scales = np.empty(w_t.shape[0], dtype=np.float32)
    for start in range(0, w_t.shape[0], ROW_CHUNK):
        rows = w_t[start : start + ROW_CHUNK]
        peak = np.abs(rows).max(axis=1)
        best_err = np.full(rows.shape[0], np.inf)
        best_s = np.zeros(rows.shape[0])
        best_q = np.zeros(rows.shape, dtype=np.int8)
        for alpha in ALPHAS:
            s = np.maximum(peak / q / alpha, SCALE_FLOOR).astype(np.float32).astype(np.float64)
            cand = np.clip(np.rint(rows / s[:, None]), -q - 1, q)
            err = np.sum((cand * s[:, None] - rows) ** 2, axis=1)
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
            best_q[better] = cand[better]
        codes[start : start + ROW_CHUNK] = best_q
        scales[start : start + ROW_CHUNK] = best_s
    return codes, scales
