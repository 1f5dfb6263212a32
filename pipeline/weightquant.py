"""Weight quantization of the transformed weight: per-row scales, then codes.

Three steps, each optional beyond the first:

* scale search, one strategy each in ``SEARCHES`` (``quant.weight_search`` names one):
  ``"alpha"`` is the seed's (5 clip ratios, weight MSE); ``"mse"`` searches a finer grid of
  clip ratios and, given calibration statistics, weights each input channel's error by its
  mean squared activation — the output error of that row under the captured inputs, not the
  weight's own error; ``"round_to_nearest"`` is plain round-to-nearest (the peak of each row), the
  baseline every layer's quality record compares with;
* codes: round-to-nearest;
* refinements after the per-layer choice, one strategy each (``refinements``): GPTQ
  (``quant.gptq``) quantizes the columns in order and pushes each one's rounding error onto
  the not-yet-quantized columns through the inverse of the input second-moment matrix
  H = XᵀX (in the transformed basis), so the output error x·ΔWᵀ, not the weight error, is
  minimized. With H = I it is RTN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from duquant_runtime.codes import qmax
from duquant_runtime.config import QuantConfig

from . import kernels

SEED_ALPHAS = (0.5, 0.75, 1.0, 1.25, 1.5)
# "mse": clip ratios 1.0 .. 0.6 in steps of 0.1, then +-0.025 and +-0.05 around the best:
# the same answer as a 0.025 grid on these unimodal curves at 9 passes instead of 17.
MSE_COARSE = (1.0, 0.9, 0.8, 0.7, 0.6)
MSE_REFINE = (-0.05, -0.025, 0.025, 0.05)
MSE_COARSE_F32 = np.array(MSE_COARSE, dtype=np.float32)
MSE_REFINE_F32 = np.array(MSE_REFINE, dtype=np.float32)
# Scale floor: an all-zero row gets this scale and all-zero codes, never a division by 0.
SCALE_FLOOR = 1e-10
ROW_CHUNK = 256  # rows per step of the seed's search: temporaries stay cache-sized


def _row_error(rows: torch.Tensor, s: torch.Tensor, q: int) -> torch.Tensor:
    return (rows / s[:, None]).round_().clamp_(-q - 1, q).mul_(s[:, None]).sub_(rows).square_().sum(dim=1)


def _seed_alpha_scales(rows: torch.Tensor, q: int) -> torch.Tensor:
    """The seed's search, bit for bit: float64, scale = peak / q / alpha rounded to float32."""
    peak = rows.abs().amax(dim=1)
    best_err = torch.full_like(peak, float("inf"))
    best_s = torch.zeros_like(peak)
    for alpha in SEED_ALPHAS:
        s = (peak / q / alpha).clamp_min(SCALE_FLOOR).float().double()
        err = _row_error(rows, s, q)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return best_s


Quantized = tuple[torch.Tensor, torch.Tensor, float]  # scales (float64 of float32 values), codes, Σ err²


def _mse_search(w_t: torch.Tensor, q: int, channel_weight: torch.Tensor | None) -> Quantized:
    """The fused per-row loops of ``kernels.py`` on a float32 copy for the ranking; codes divide
    in ``w_t``'s own precision."""
    w32 = np.ascontiguousarray(w_t.numpy(), dtype=np.float32)
    cw = np.empty(0, np.float32) if channel_weight is None else channel_weight.numpy().astype(np.float32)
    scales32 = kernels.mse_scales(w32, q, MSE_COARSE_F32, MSE_REFINE_F32, cw)
    return _rounded(w_t, scales32, q)


def _absmax_rtn(w_t: torch.Tensor, q: int, channel_weight: torch.Tensor | None) -> Quantized:
    """Per-row absmax scales, round-to-nearest codes."""
    w = w_t.numpy()
    peaks = np.maximum(w.max(axis=1), -w.min(axis=1))  # max |w| per row, without an |w| copy
    return _rounded(w_t, np.maximum(peaks / q, SCALE_FLOOR).astype(np.float32), q)


def _rounded(w_t: torch.Tensor, scales32: np.ndarray, q: int) -> Quantized:
    codes = np.empty(w_t.shape, dtype=np.int8)
    rows = np.ascontiguousarray(w_t.numpy())
    row_err = kernels.round_codes(rows, scales32.astype(rows.dtype), q, codes)
    return torch.from_numpy(scales32).double(), torch.from_numpy(codes), float(row_err.sum())


def _seed_search(w_t: torch.Tensor, q: int, channel_weight: torch.Tensor | None = None) -> Quantized:
    """The seed's "alpha" search in float64, chunk by chunk: each chunk's codes are computed
    while its rows are still in cache. Weight MSE only: ``channel_weight`` is not used."""
    scales = torch.empty(w_t.shape[0], dtype=torch.float64)
    codes = torch.empty(w_t.shape, dtype=torch.int8)
    sq_err = 0.0
    for start in range(0, w_t.shape[0], ROW_CHUNK):
        rows = w_t[start : start + ROW_CHUNK]
        s = _seed_alpha_scales(rows.double(), q)  # bit for bit the seed's, in float64
        s_rows = s.to(rows.dtype)[:, None]
        c = (rows / s_rows).round_().clamp_(-q - 1, q)
        sq_err += float(c.mul(s_rows).sub_(rows).square_().sum())
        codes[start : start + ROW_CHUNK] = c.to(torch.int8)
        scales[start : start + ROW_CHUNK] = s
    return scales, codes, sq_err


def gptq_codes(
    w_t: torch.Tensor, scales: torch.Tensor, bits: int, hessian: torch.Tensor, damp: float, group: int = 128
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with fixed per-row scales. ``hessian`` [in, in] float64.

    Columns with no signal (zero diagonal) are quantized plainly; ``damp`` adds that
    fraction of the mean diagonal, which keeps the Cholesky factor well conditioned.
    """
    q = qmax(bits)
    w = w_t.clone()
    n = w.shape[1]
    h = hessian.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h += torch.eye(n, dtype=h.dtype) * (damp * torch.diagonal(h).mean())
    # Upper Cholesky factor of H⁻¹: row i holds the update weights for columns > i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.empty(w.shape, dtype=torch.int8)
    s = scales[:, None]
    for i1 in range(0, n, group):
        i2 = min(i1 + group, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            c = (col / s).round().clamp(-q - 1, q)
            codes[:, i1 + i] = c[:, 0].to(torch.int8)
            err = (col - c * s) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


# The scale searches by name; each takes (w_t, qmax, per-input-channel error weight or None).
SEARCHES = {"alpha": _seed_search, "mse": _mse_search, "round_to_nearest": _absmax_rtn}


def quantize_weight(
    w_t: torch.Tensor, bits: int, *, search: str = "alpha", hessian: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """(codes int8 [out, in], scales float32 [out], Σ (codes·scale - w_t)²) for the
    transformed weight ``w_t`` (float64 for the seed's bit-exact search, float32 is enough
    otherwise). ``hessian`` (transformed-basis XᵀX) makes the search activation-aware via
    its diagonal.
    """
    cw = None if hessian is None else torch.diagonal(hessian).clamp_min(0)
    scales, codes, sq_err = SEARCHES[search](w_t, qmax(bits), cw)
    return codes.numpy(), scales.float().numpy(), sq_err


def round_to_nearest(w: torch.Tensor, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Plain round-to-nearest (per-row peak scales): the baseline every quality record cites."""
    return quantize_weight(w, bits, search="round_to_nearest")


class Refinement(Protocol):
    """New codes for the chosen transform and its scales, kept only when they measure better."""

    label: ClassVar[str]  # what it adds to the choice label when it is kept
    switch: ClassVar[str]  # the config field that asks for it (refinements need statistics)

    def codes(self, w_t: np.ndarray, scales: np.ndarray, bits: int, hessian: torch.Tensor) -> np.ndarray: ...


@dataclass(frozen=True)
class Gptq:
    """GPTQ after the per-layer choice: new codes for the chosen transform's scales."""

    damp: float
    label: ClassVar[str] = "+gptq"
    switch: ClassVar[str] = "quant.gptq"

    def codes(self, w_t: np.ndarray, scales: np.ndarray, bits: int, hessian: torch.Tensor) -> np.ndarray:
        w64, s64 = torch.from_numpy(w_t).double(), torch.from_numpy(scales).double()
        return gptq_codes(w64, s64, bits, hessian, self.damp).numpy()


def refinements(q: QuantConfig) -> tuple[Refinement, ...]:
    """The code refinements ``q`` asks for, in the order they run."""
    return (Gptq(q.gptq_damp),) if q.gptq else ()


def describe(q: QuantConfig) -> str:
    """The weight quantizer's part of a config's one-line summary, e.g. "mse+gptq"."""
    return q.weight_search + "".join(r.label for r in refinements(q))
