"""DuQuant: greedy rotation, zigzag permutation balancing block maxima, greedy rotation.

Both rotations are block-diagonal orthogonal factors [n_blocks, B, B] acting on the input
channels as ``x -> x · blockdiag(R)``, chosen to flatten the block maxima of the peak rows
(weight rows, plus the calibration sample's activation rows when given). A short last block
rotates only its r live channels and is identity-padded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from duquant_runtime.config import TransformConfig
from duquant_runtime.stages import PERM, ROTATE
from duquant_runtime.stats import LayerStats

from ..basis import Basis
from .base import Method, register

PEAK_ROWS = 1024  # weight rows (evenly spaced) the greedy rotation looks at: bounds its cost


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


@register
class DuQuant(Method):
    name, version, dtype = "duquant", 1, torch.float64

    def build(self, basis: Basis, t: TransformConfig, stats: LayerStats | None) -> None:
        peaks = Basis(peak_rows(basis.w, stats))  # the peak rows follow the weight through the stages
        r1 = greedy_rotation(peaks.w, t.block_size, t.max_rotation_step, t.seed)
        basis.add(ROTATE, "r_in", r1)
        peaks.add(ROTATE, "r_in", r1)
        if t.permute:
            perm2 = balanced_zigzag(peaks.w.abs().amax(dim=0).numpy(), t.block_size)
            basis.add(PERM, "perm2", perm2)
            peaks.add(PERM, "perm2", perm2)
        basis.add(ROTATE, "r_in2", greedy_rotation(peaks.w, t.block_size, t.max_rotation_step, t.seed + 1))
