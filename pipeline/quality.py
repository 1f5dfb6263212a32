"""Quality figures of a packed layer, computed with the runtime's own DuQuantLinear.

The numbers build records (and uses to choose a layer's transform) and the benchmarks
report come from the layer users run, not from a second copy of its forward:

* ``weight_sqnr_db``: the effective weight (``DuQuantLinear.effective_weight``, back in the
  original basis) against the source weight. It is the expected output SQNR for inputs
  with independent, equal-variance channels, and the data-free proxy build chooses by;
* ``output_sqnr_db``: the layer's output on captured input rows against x·Wᵀ, with the
  activation quantization it will run with.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from duquant_runtime import stages as st
from duquant_runtime.actquant import StaticScaleObserver
from duquant_runtime.bundle import LayerPack
from duquant_runtime.layer import DuQuantLinear

from . import kernels
from .basis import Transform

CHUNK = 1 << 20  # elements per step: temporaries stay cache-sized, no full float64 copies


def _sum_squares(x: torch.Tensor, y: torch.Tensor | None = None) -> float:
    """Σ x² (or Σ (x - y)²) in chunks, each chunk's sum in float64."""
    xf, yf = x.detach().reshape(-1), None if y is None else y.detach().reshape(-1)
    total = 0.0
    for start in range(0, xf.numel(), CHUNK):
        c = xf[start : start + CHUNK]
        if yf is not None:
            c = c - yf[start : start + CHUNK].to(c.dtype)
        total += kernels.sum_squares(c.numpy())
    return total


def db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); +inf for no noise."""
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor, signal: float | None = None) -> float:
    """10·log10(‖ref‖² / ‖ref - approx‖²); +inf for an exact match. ``signal`` = ‖ref‖² when known."""
    signal = _sum_squares(reference) if signal is None else signal
    return db(signal, _sum_squares(reference, approx))


def weight_error(tr: Transform, codes: np.ndarray, scales: np.ndarray, transformed_error: float) -> float:
    """‖W_eff - W‖² for the effective weight W_eff = (codes·s)·Tᵀ, given the transformed-basis
    error ‖codes·s - W_t‖². The map back is linear, so W_eff - W = (codes·s - W_t)·Tᵀ up to
    the float rounding of W = W_t·Tᵀ (~1e-7, far below a 4-bit step): the error rows go
    through the runtime's ``weight_from_basis`` in cache-sized chunks. Permutations and
    rotations keep norms, so only a transform with a scale stage pays for the mapping."""
    if all(s.kind.preserves_norm for s, _ in tr.stages):
        return transformed_error
    return weight_errors(tr, codes, scales)[0]


def weight_errors(
    tr: Transform, codes: np.ndarray, scales: np.ndarray, col_weight: np.ndarray | None = None
) -> tuple[float, float]:
    """(‖W_eff - W‖², Σ_j col_weight_j ‖(W_eff - W)[:, j]‖²) in one pass over the error rows
    mapped back to the original basis (the second: the output error for inputs of independent
    channels with variances ``col_weight`` [in]; 0 without it)."""
    w_t = np.ascontiguousarray(tr.w_t)
    plan = tr.plan(torch.from_numpy(w_t).dtype)
    s = scales.astype(w_t.dtype)
    step = max(1, CHUNK // max(1, w_t.shape[1]))
    buffer = np.empty((min(step, w_t.shape[0]), w_t.shape[1]), dtype=w_t.dtype)
    weight = None if col_weight is None else torch.from_numpy(np.asarray(col_weight, dtype=np.float64))
    total = weighted = 0.0
    for start in range(0, w_t.shape[0], step):
        stop = min(start + step, w_t.shape[0])
        e_t = kernels.dequantized_error(w_t[start:stop], codes[start:stop], s[start:stop], buffer[: stop - start])
        columns = st.weight_from_basis(plan, torch.from_numpy(e_t)).square().sum(0, dtype=torch.float64)
        total += float(columns.sum())
        if weight is not None:
            weighted += float(columns @ weight)
    return total, weighted


def variance_in_basis(tr: Transform, var: np.ndarray) -> np.ndarray:
    """Per-channel variances of x·T for x of independent channels with variances ``var`` [in]:
    each stage's matrix squared elementwise (a scale's value, a rotation's blocks; a permutation
    moves them), so no [in, in] product is formed."""
    v = torch.from_numpy(np.asarray(var, dtype=np.float64))[None]
    for kind, value in tr.plan():
        v = kind.apply(v, value * value if value.is_floating_point() else value)
    return v[0].numpy()


def activation_error(
    tr: Transform, var: np.ndarray, bits: int, per_token: bool, weight_energy: float | None = None
) -> float:
    """Expected ‖(x_q - x_t)·W_tᵀ‖² per row for activations of variances ``var`` quantized at
    ``bits`` in the transform's basis: rounding noise of Δ²/12 per channel, Δ = peak / qmax. The
    peak is a row's largest channel (per-token: about √(2 ln n) of the largest deviation, which
    a rotation lowers by spreading it) or each channel's own (per-channel static). ``weight_energy``:
    ‖W‖², which a transform of rotations and permutations keeps (no pass over W_t then)."""
    if bits <= 0:
        return 0.0
    var_t = variance_in_basis(tr, var)
    qmax = 2 ** (bits - 1) - 1
    peak2 = 2.0 * math.log(max(var_t.size, 2))
    if per_token and weight_energy is not None and all(s.kind.preserves_norm for s, _ in tr.stages):
        return float(peak2 * var_t.max() / qmax**2 / 12.0 * weight_energy)
    col_energy = kernels.column_sum_squares(np.ascontiguousarray(tr.w_t))
    if per_token:
        return float(peak2 * var_t.max() / qmax**2 / 12.0 * col_energy.sum())
    return float(peak2 / qmax**2 / 12.0 * (var_t @ col_energy))


def runtime_layer(pack: LayerPack, act_bits: int, act_mode: str, dtype: torch.dtype) -> DuQuantLinear:
    """The pack as users load it (int4 storage, the default)."""
    return DuQuantLinear.from_pack(pack, act_bits=act_bits, act_mode=act_mode, dtype=dtype).eval()


def weight_sqnr_db(layer: DuQuantLinear, weight: torch.Tensor, signal: float | None = None) -> float:
    """SQNR of the layer's effective weight against ``weight`` [out, in], in the weight's dtype."""
    return sqnr_db(weight, layer.effective_weight(weight.dtype), signal)


def output_energies(layer: DuQuantLinear, x: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """(‖x·Wᵀ‖², ‖error‖²) of the layer's output (bias excluded) on input rows ``x`` (float64)."""
    with torch.no_grad():
        y = layer(x.double())
        if layer.bias is not None:
            y = y - layer.bias.double()
        ref = x.double() @ weight.double().t()
    return _sum_squares(ref), _sum_squares(ref, y)


def output_sqnr_db(layer: DuQuantLinear, x: torch.Tensor, weight: torch.Tensor) -> float:
    """SQNR of the layer's output (bias excluded) on input rows ``x`` against x·Wᵀ (float64)."""
    return db(*output_energies(layer, x, weight))


def static_scales(layer: DuQuantLinear, sample: np.ndarray, bits: int, percentile: float) -> np.ndarray:
    """Static per-channel scales in the layer's transformed basis from calibration rows: the
    runtime's one rule (``actquant.StaticScaleObserver``), the sample as one batch. float32 [in]."""
    rule = StaticScaleObserver(percentile, bits)
    with torch.no_grad():
        rule.observe(layer.rotate_input(torch.from_numpy(sample).double()))
    return rule.scales().numpy()  # type: ignore[union-attr]
