"""The seed's method (the openpi DuQuant prototype this tool replaces): zigzag permutation by
smoothed column energy, then per block the left singular vectors of W_bᵀ; optionally the same
on the output rows. float64, so the seed's numbers are reproduced."""

from __future__ import annotations

import numpy as np
import torch
from duquant_runtime.config import TransformConfig
from duquant_runtime.stages import PERM, ROTATE
from duquant_runtime.stats import LayerStats

from ..basis import Basis
from .base import Method, register, zigzag_permutation


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


@register
class Svd(Method):
    """Zigzag (``permute``), the block bases of the columns, and with ``row_rot = 'restore'``
    the block bases of the rows, applied to the output."""

    name, version, dtype, row_rotation = "svd", 1, torch.float64, True

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        w = basis.w
        if t.permute:
            basis.add(PERM, "perm", zigzag_permutation(w, t.lambda_smooth))
        basis.add(ROTATE, "r_in", column_block_bases(basis.w, t.block_size))
        if t.row_rot == "restore":  # rows of W are columns of Wᵀ
            basis.add_output(ROTATE, "r_out", column_block_bases(w.t(), t.block_out_size))
