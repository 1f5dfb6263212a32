"""Data-free and activation-aware input rotations: block Hadamard and DuQuant's greedy rotation.

Both produce block-diagonal orthogonal factors [n_blocks, B, B] that act on the input
channels as ``x -> x · blockdiag(R)``; a short last block (width not a multiple of B)
gets a true r x r rotation and is identity-padded, like the svd method's.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch


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


def uniform_first_row(b: int) -> np.ndarray:
    """Householder reflection whose first row (and column) is uniform 1/sqrt(b): applied to
    x, it spreads channel 0 evenly over all b channels."""
    u = np.full(b, 1.0 / math.sqrt(b))
    v = np.zeros(b)
    v[0] = 1.0
    v -= u
    if not v.any():
        return np.eye(b)
    return np.eye(b) - 2.0 * np.outer(v, v) / (v @ v)


def random_orthogonal(b: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((b, b)))
    return q * np.sign(np.diag(r))


def greedy_rotation(peaks: torch.Tensor, width: int, steps: int, seed: int) -> np.ndarray:
    """DuQuant's greedy rotation, every block at once.

    ``peaks`` [rows, n] are the rows whose per-block maximum we want small (weight rows
    and, with calibration data, activation rows), ``width`` B. Each step swaps the block's
    current peak channel to the front, mixes the other channels with a random rotation and
    spreads the peak uniformly (``uniform_first_row``); the step with the smallest block
    maximum is kept (step 0 is the identity). Returns float64 [ceil(n/B), B, B].
    """
    rows, n = peaks.shape
    nb, tail = -(-n // width), n % width
    cur = torch.nn.functional.pad(peaks.double(), (0, nb * width - n)).reshape(rows, nb, width).transpose(0, 1)
    rot = torch.eye(width, dtype=torch.float64).repeat(nb, 1, 1)
    best_rot = rot.clone()
    best = cur.abs().amax(dim=(1, 2))
    rng = np.random.default_rng(seed)
    sizes = [width] * (nb - 1) + [tail or width]  # a short tail block rotates only its r live channels
    groups = {r: [b for b, size in enumerate(sizes) if size == r] for r in set(sizes)}
    base = {r: torch.from_numpy(uniform_first_row(r)) for r in groups}
    for _ in range(steps):
        top = cur.abs().amax(dim=1).argmax(dim=1)  # [nb] current peak channel (padding is 0)
        step = torch.eye(width, dtype=torch.float64).repeat(nb, 1, 1)
        for r, members in groups.items():
            idx = torch.tensor(members)
            inner = torch.eye(r, dtype=torch.float64)
            if r > 1:
                inner[1:, 1:] = torch.from_numpy(random_orthogonal(r - 1, rng))
            mixed = inner @ base[r]  # [r, r]: mix channels 1.., then spread channel 0 evenly
            # swap(0, t) · mixed = mixed with rows 0 and t exchanged, for each block's own t
            block = mixed.repeat(len(members), 1, 1)
            t = top[idx].clamp(max=r - 1)
            ar = torch.arange(len(members))
            row0 = block[ar, 0].clone()
            block[ar, 0] = block[ar, t]
            block[ar, t] = row0
            step[idx, :r, :r] = block
        cur = torch.bmm(cur, step)
        rot = torch.bmm(rot, step)
        score = cur.abs().amax(dim=(1, 2))
        better = score < best
        best = torch.where(better, score, best)
        best_rot[better] = rot[better]
    return best_rot.numpy()


def balanced_zigzag(channel_peak: np.ndarray, width: int) -> np.ndarray:
    """DuQuant's zigzag permutation: channels sorted by peak are dealt to blocks
    0, 1, ..., nb-1, nb-1, ..., 0, 0, 1, ... so every block gets a similar share of the
    large ones. Returns ``perm`` with ``x[..., perm]`` the permuted channels; a short last
    block takes only as many channels as it has room for."""
    n = channel_peak.shape[0]
    nb = -(-n // width)
    capacity = [width] * nb
    if n % width:
        capacity[-1] = n % width
    order = np.argsort(-channel_peak, kind="stable")
    members: list[list[int]] = [[] for _ in range(nb)]
    cycle = list(range(nb)) + list(range(nb - 1, -1, -1))
    pos = 0
    for ch in order:
        while len(members[cycle[pos % len(cycle)]]) >= capacity[cycle[pos % len(cycle)]]:
            pos += 1
        members[cycle[pos % len(cycle)]].append(int(ch))
        pos += 1
    return np.concatenate([np.asarray(m, dtype=np.int64) for m in members])
