"""Block Hadamard (optionally with seeded random signs), the seed's zigzag first if permute.

float32: a Hadamard rotation is exact to ~1e-7, far below 4-bit steps, and it halves the memory
traffic of the largest layers. Without signs one matrix tiles the width: it is declared a
``tiled_rotate`` stage, stored once, one GEMM per forward. A short last block (width not a
multiple of B) gets a true r x r basis (DCT when r is not a power of two), identity-padded.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from duquant_runtime.config import TransformConfig
from duquant_runtime.errors import ConfigError
from duquant_runtime.stages import PERM, ROTATE, TILED_ROTATE
from duquant_runtime.stats import LayerStats

from ..basis import Basis
from .base import Method, register, zigzag_permutation


@functools.lru_cache(maxsize=16)
def sylvester_hadamard(b: int) -> np.ndarray:
    """The normalized b x b Hadamard matrix (b a power of two); read-only, built once per size."""
    h = np.ones((1, 1))
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    h = h / math.sqrt(b)
    h.flags.writeable = False
    return h


def dct_matrix(r: int) -> np.ndarray:
    """Orthonormal DCT-II, r x r: the Hadamard stand-in for a block that is not a power of two.

    Every entry is at most sqrt(2/r) in magnitude, so like a Hadamard it spreads one
    outlier channel over the whole block.
    """
    k = np.arange(r)[:, None]
    n = np.arange(r)[None, :]
    m = np.cos(np.pi * (n + 0.5) * k / r) * math.sqrt(2.0 / r)
    m[0] /= math.sqrt(2.0)
    return m.T  # columns are the basis vectors, so x · m is the transform


def _block_basis(r: int) -> np.ndarray:
    return sylvester_hadamard(r) if r & (r - 1) == 0 else dct_matrix(r)


def hadamard_blocks(n: int, block: int, *, signs: bool, seed: int) -> np.ndarray:
    """blockdiag(D · H) over n channels: H normalized Hadamard (DCT for a short tail),
    D an optional seeded random +-1 diagonal. float64 [ceil(n/B), B, B]."""
    nb, tail = -(-n // block), n % block
    out = np.tile(sylvester_hadamard(block), (nb, 1, 1))
    if tail:
        out[-1] = np.eye(block)
        out[-1, :tail, :tail] = _block_basis(tail)
    if signs:
        d = np.random.default_rng(seed).choice((-1.0, 1.0), size=nb * block)
        out = out * d.reshape(nb, block, 1)
    return out


@register
class Hadamard(Method):
    name, version = "hadamard", 1
    block_searchable = True

    def validate(self, t: TransformConfig) -> None:
        super().validate(t)
        if t.block_size & (t.block_size - 1):
            raise ConfigError(
                f"transform.block_size must be a power of two for method 'hadamard' (16, 32, 64, 128), "
                f"got {t.block_size}"
            )

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        if t.permute:
            basis.add(PERM, "perm", zigzag_permutation(basis.w, t.lambda_smooth))
        width = basis.w.shape[1]
        blocks = hadamard_blocks(width, t.block_size, signs=t.hadamard_signs, seed=t.seed)
        if t.hadamard_signs or width % t.block_size:  # the blocks differ (signs, a short tail)
            basis.add(ROTATE, "r_in", blocks)
        else:  # one matrix tiles the width
            basis.add(TILED_ROTATE, "r_in", blocks[0])
