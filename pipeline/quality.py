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
    w_t = np.ascontiguousarray(tr.w_t)
    plan = tr.plan(torch.from_numpy(w_t).dtype)
    s = scales.astype(w_t.dtype)
    step = max(1, CHUNK // max(1, w_t.shape[1]))
    buffer = np.empty((min(step, w_t.shape[0]), w_t.shape[1]), dtype=w_t.dtype)
    total = 0.0
    for start in range(0, w_t.shape[0], step):
        stop = min(start + step, w_t.shape[0])
        e_t = kernels.dequantized_error(w_t[start:stop], codes[start:stop], s[start:stop], buffer[: stop - start])
        total += _sum_squares(st.weight_from_basis(plan, torch.from_numpy(e_t)))
    return total


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
