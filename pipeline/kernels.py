"""The weight search's inner loops, fused per row (numba, compiled once and cached on disk).

Each loop reads a row once per candidate clip ratio while it sits in L1, where the same
search as a chain of torch element-wise ops streams the whole weight through memory five
times per ratio: on a 16384 x 2048 layer, one thread, 0.3 s became 0.02 s.

Semantics are those of the torch search they replace (``weightquant.py`` documents them):
ranking divides by multiplying with 1/s, codes divide exactly (round half to even, as
``torch.round``), scales are float32, error sums accumulate in float64. No fast-math flag
that could change a code is enabled: only re-association of the sums, which lets LLVM
vectorize them.
"""

from __future__ import annotations

import numba
import numpy as np

# Re-associating the sums is what vectorizes them; 'arcp' (x/s as x·(1/s)) is off on
# purpose: the codes must be those of an exact division.
_SUMS = {"reassoc", "nsz"}
SCALE_FLOOR = np.float32(1e-10)  # weightquant.SCALE_FLOOR, as float32


def _compiled(fn):
    """Compiled on first use and cached on disk (next to this file, else numba's user-wide
    cache); where no cache location is writable, compiled in each process instead."""
    try:
        return numba.njit(cache=True, nogil=True, fastmath=_SUMS)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(cache=False, nogil=True, fastmath=_SUMS)(fn)


@_compiled
def _clip_error(row, peak, clip, q, cw):  # pragma: no cover - compiled
    """Σ_j cw_j (Q(x_j) - x_j)² for the scale peak·clip/q (cw empty: all ones)."""
    s = max(np.float32(peak * clip / np.float32(q)), SCALE_FLOOR)
    inv = np.float32(1.0) / s
    lo, hi = np.float32(-q - 1), np.float32(q)
    acc = np.float32(0.0)
    if cw.shape[0] == 0:
        for j in range(row.shape[0]):
            d = min(max(np.rint(row[j] * inv), lo), hi) * s - row[j]
            acc += d * d
    else:
        for j in range(row.shape[0]):
            d = min(max(np.rint(row[j] * inv), lo), hi) * s - row[j]
            acc += d * d * cw[j]
    return acc


@_compiled
def mse_scales(w, q, coarse, refine, cw):  # pragma: no cover - compiled
    """Per-row scale minimizing the (channel-weighted) squared error: the best of the
    ``coarse`` clip ratios, then the best of ``refine`` offsets around it (clamped to
    [0.05, 1]); ties keep the earlier ratio. ``w`` float32 [rows, in], result float32 [rows]."""
    rows = w.shape[0]
    scales = np.empty(rows, dtype=np.float32)
    for r in range(rows):
        row = w[r]
        peak = np.float32(0.0)
        for j in range(row.shape[0]):
            peak = max(peak, abs(row[j]))
        best_err = np.inf
        best_clip = np.float32(1.0)
        for k in range(coarse.shape[0]):
            err = _clip_error(row, peak, coarse[k], q, cw)
            if err < best_err:
                best_err, best_clip = err, coarse[k]
        center = best_clip
        for k in range(refine.shape[0]):
            clip = min(max(np.float32(center + refine[k]), np.float32(0.05)), np.float32(1.0))
            err = _clip_error(row, peak, clip, q, cw)
            if err < best_err:
                best_err, best_clip = err, clip
        scales[r] = max(np.float32(peak * best_clip / np.float32(q)), SCALE_FLOOR)
    return scales


@_compiled
def round_codes(w, scales, q, codes):  # pragma: no cover - compiled
    """codes[r, j] = clamp(round(w[r, j] / s_r)) into ``codes`` (int8); returns the per-row
    squared error Σ_j (codes·s - w)² in float64."""
    rows, cols = w.shape
    lo, hi = np.float32(-q - 1), np.float32(q)
    err = np.empty(rows, dtype=np.float64)
    for r in range(rows):
        s = scales[r]
        acc = 0.0
        for j in range(cols):
            c = min(max(np.rint(w[r, j] / s), lo), hi)
            codes[r, j] = np.int8(c)
            d = c * s - w[r, j]
            acc += np.float64(d * d)
        err[r] = acc
    return err


@_compiled
def dequantized_error(w, codes, scales, out):  # pragma: no cover - compiled
    """out = codes·s - w (float32), the transformed-basis error a figure maps back."""
    rows, cols = w.shape
    for r in range(rows):
        s = scales[r]
        for j in range(cols):
            out[r, j] = np.float32(codes[r, j]) * s - w[r, j]
    return out


@_compiled
def sum_squares(x):  # pragma: no cover - compiled
    """Σ x² of a 1-D array, accumulated in float64 (no float64 copy of ``x``)."""
    acc = 0.0
    for j in range(x.shape[0]):
        acc += np.float64(x[j]) * np.float64(x[j])
    return acc


@_compiled
def column_sum_squares(w):  # pragma: no cover - compiled
    """Σ_r w[r, j]² per column, float64, in one row-major pass (no float64 copy of ``w``)."""
    acc = np.zeros(w.shape[1], dtype=np.float64)
    for r in range(w.shape[0]):
        for j in range(w.shape[1]):
            acc[j] += np.float64(w[r, j]) * np.float64(w[r, j])
    return acc
