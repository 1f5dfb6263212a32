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


# ---------------------------------------------------------------- the seed's (svd) pieces


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
