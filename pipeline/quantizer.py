"""One layer's candidates packed and measured: :class:`LayerQuantizer` holds a layer's weight,
statistics (or data-free activation estimate) and config, and turns a candidate transform into
codes, scales and the figures the per-layer choice (``pack.choose``) ranks:

* data-free, the output error expected on the activation sizes the checkpoint implies (the
  weight error weighted per input channel plus the activations' rounding error; ``proxy.py``),
  or, for a layer without an estimate, the error of the effective weight in the original basis
  (the expected output error for inputs with independent, equal-variance channels);
* with calibration statistics, the output error on the captured sample rows, through the
  runtime's own layer.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from duquant_runtime.bundle import LayerPack
from duquant_runtime.codes import pack_codes, storage_for_bits
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.config_sections import STATIC_ACT_MODES
from duquant_runtime.layer import DuQuantLinear
from duquant_runtime.signature import weight_signature
from duquant_runtime.stats import LayerStats

from .basis import Transform, transformed_hessian
from .pretransforms import column_rms
from .quality import (
    activation_error,
    db,
    output_energies,
    output_sqnr_db,
    runtime_layer,
    static_scales,
    weight_error,
    weight_errors,
    weight_sqnr_db,
)
from .recipe import Candidate, Recipe, resolve
from .select import SelectedLayer
from .weightquant import Refinement, quantize_weight, round_to_nearest

# Data-free ranking sample: every k-th row, 1/RANK_FRACTION of the rows but at least
# RANK_MIN_ROWS; layers with fewer than 2·RANK_MIN_ROWS rows are ranked on all of them.
# (``pack.choose``; docs/benchmarks.md, "Quality" gives how often this changes a choice, and by how much.)
RANK_FRACTION = 8
RANK_MIN_ROWS = 512


def readonly_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor view of a (possibly read-only, memory-mapped) array, for reading only: no
    copy, and no "NumPy array is not writable" warning on every build."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


@dataclass
class Measured:
    tr: Transform
    codes: np.ndarray  # int8 [out, in]
    scales: np.ndarray  # float32 [out]
    bits: int
    sqnr: float  # what the choice maximizes: output SQNR with a sample, else weight SQNR
    figures: dict[str, float]
    pack: LayerPack | None = None  # assembled already when the figures needed the runtime layer


class LayerQuantizer:
    """Packs and measures candidates of one layer (its weight, statistics and config)."""

    def __init__(
        self,
        weight: np.ndarray,
        bias: np.ndarray | None,
        layer: SelectedLayer,
        source_dtype: str,
        recipe: Recipe | DuQuantConfig,
        stats: LayerStats | None,
        signature: tuple[float, float],
        rms: np.ndarray | None = None,
        source_bits: int | None = None,
        act_rms: np.ndarray | None = None,
    ) -> None:
        """``recipe``: the build's, or a config to resolve (with statistics when ``stats`` is given);
        ``act_rms``: the layer's data-free activation estimate (pipeline/proxy.py), when it has one."""
        self.recipe = recipe if isinstance(recipe, Recipe) else resolve(recipe, stats is not None)
        self.weight, self.bias, self.layer, self.config, self.stats = weight, bias, layer, self.recipe.config, stats
        self.source_dtype, self.signature = source_dtype, signature
        self._rms = rms
        self.source_bits = source_bits
        # float64 for a float64 method's bit-exact numbers; float32 is exact enough to rank 4-bit errors
        self.w_ref = readonly_tensor(weight).to(torch.float64 if weight.dtype == np.float64 else torch.float32)
        self.sample = None if stats is None or not stats.sample.shape[0] else torch.from_numpy(stats.sample).double()
        self.signal = signature[1]  # ‖W‖², the float64 sum of squares the signature already holds
        use_proxy = act_rms is not None and stats is None and self.config.transform.act_proxy
        self.act = act_rms if use_proxy else None
        self.act_var = None if self.act is None else self.act * self.act
        self._proxy_signal: float | None = None  # Σ_j var_j ‖W[:, j]‖², once per layer
        # the layer's activation quantization: its config's, until pack.py keeps it at 8 bits
        # (quant.a4_min_sqnr_db) or measures per-token scales better than static ones
        self.act_bits, self.act_mode = self.config.quant.act_bits, self.config.quant.mode_for(layer.name)

    @property
    def static(self) -> bool:
        """Are the layer's activations quantized with scales fitted to the sample (with statistics)?"""
        return self.stats is not None and self.act_mode in STATIC_ACT_MODES and self.act_bits > 0

    @property
    def per_step(self) -> bool:
        return self.act_mode == "per_step_static" and self.act_bits > 0

    @property
    def rms(self) -> np.ndarray:
        """Column RMS of the weight, for every equalization candidate: computed once."""
        if self._rms is None:
            self._rms = column_rms(self.weight)
        return self._rms

    def row_sample(self) -> LayerQuantizer:
        """A packer for every k-th row (at least RANK_MIN_ROWS, 1/RANK_FRACTION of a large layer),
        with the whole weight's equalization; this packer itself when the layer is small."""
        rows = self.weight.shape[0]
        wanted = max(RANK_MIN_ROWS, rows // RANK_FRACTION)
        if 2 * wanted > rows:
            return self
        sample = np.ascontiguousarray(self.weight[:: rows // wanted])
        signature = weight_signature(readonly_tensor(sample))
        return LayerQuantizer(
            sample, None, self.layer, self.source_dtype, self.recipe, None, signature, self.rms, act_rms=self.act
        )

    def assemble(self, tr: Transform, codes: np.ndarray, scales: np.ndarray, bits: int) -> LayerPack:
        stored = {s.key: s.kind.stored(v) for s, v in (*tr.stages, *tr.out_stages)}
        return LayerPack(
            name=self.layer.name,
            in_features=self.layer.in_features,
            out_features=self.layer.out_features,
            weight_bits=bits,
            storage=storage_for_bits(bits),
            qweight=pack_codes(codes, bits),
            w_scale=scales,
            bias=None if self.bias is None else self.bias.astype(np.float32),
            source_dtype=self.source_dtype,
            source_sum=self.signature[0],
            source_sumsq=self.signature[1],
            source_bits=self.source_bits,
            stages=tuple(s for s, _ in tr.stages),
            out_stages=tuple(s for s, _ in tr.out_stages),
            stage_values=stored,
        )

    def measure(self, tr: Transform, codes: np.ndarray, scales: np.ndarray, bits: int) -> Measured:
        """Pack, load it as the runtime does, and measure it."""
        pack = self.assemble(tr, codes, scales, bits)
        layer = self.runtime(pack)
        figures = {"weight_sqnr_db": weight_sqnr_db(layer, self.w_ref, self.signal)}
        if self.static and self.per_step:
            figures["output_sqnr_db"] = self.per_step_sqnr(layer, pack)
        else:
            if self.static:
                pack.act_scale = self.fitted(layer, self.stats.sample)  # type: ignore[union-attr]
                layer.set_act_scale(torch.from_numpy(pack.act_scale))
            if self.sample is not None:
                figures["output_sqnr_db"] = output_sqnr_db(layer, self.sample, self.w_ref)
        key = "output_sqnr_db" if self.sample is not None else "weight_sqnr_db"
        return Measured(tr, codes, scales, bits, figures[key], figures, pack)

    def runtime(self, pack: LayerPack) -> DuQuantLinear:
        """The pack as the runtime loads it, at the layer's activation bits (a per-step layer
        measured one step's row at a time, as a per-channel one)."""
        return runtime_layer(
            pack, self.act_bits, "per_channel_static" if self.static else "per_token_dynamic", self.w_ref.dtype
        )

    def fitted(self, layer: DuQuantLinear, rows: np.ndarray) -> np.ndarray:
        """Static scales from ``rows`` in the layer's basis, at the layer's activation bits."""
        return static_scales(layer, rows, self.act_bits, self.config.quant.act_percentile)

    def per_step_sqnr(self, layer: DuQuantLinear, pack: LayerPack) -> float:
        """One static scale row per denoising step, each from that step's sample (``pack.act_scale``
        [steps, in]); returns the output SQNR over every step's rows, each with its own row."""
        steps = self.stats.step_sample  # type: ignore[union-attr]
        assert steps is not None  # the build checks the statistics were captured per step
        pack.act_scale = np.stack([self.fitted(layer, rows) for rows in steps])
        signal = noise = 0.0
        for rows, scale in zip(steps, pack.act_scale, strict=True):
            layer.set_act_scale(torch.from_numpy(scale))
            s, n = output_energies(layer, torch.from_numpy(rows).double(), self.w_ref)
            signal, noise = signal + s, noise + n
        return db(signal, noise)

    def held_out_sqnr(self, m: Measured) -> float:
        """The kept candidate's output SQNR on rows its static scales were not fitted to: the
        sample's two halves (each step's, per step), each measured with scales from the other.
        Per-token layers fit nothing to the sample: their output SQNR on all of it, as measured."""
        if not self.static:
            return m.figures["output_sqnr_db"]
        layer = self.runtime(dataclasses.replace(self.finished(m), act_scale=None))  # scales set per half
        groups = self.stats.step_sample if self.per_step else self.stats.sample[None]  # type: ignore[union-attr]
        signal = noise = 0.0
        for rows in groups:
            halves = (rows[0::2], rows[1::2])
            for fit, held in (halves, halves[::-1]):
                layer.set_act_scale(torch.from_numpy(self.fitted(layer, fit)))
                s, n = output_energies(layer, torch.from_numpy(held).double(), self.w_ref)
                signal, noise = signal + s, noise + n
        return db(signal, noise)

    def measure_weight(
        self, tr: Transform, codes: np.ndarray, scales: np.ndarray, bits: int, sq_err: float
    ) -> Measured:
        """Data-free: the effective weight's SQNR from the codes' error mapped back through the
        runtime's stages (``quality.weight_error``), without assembling a pack per candidate. With
        an activation estimate the choice maximizes the output SQNR expected on it instead: the
        weight error weighted per input channel, plus the activations' rounding error."""
        if self.act_var is None:
            sqnr = db(self.signal, weight_error(tr, codes, scales, sq_err))
            return Measured(tr, codes, scales, bits, sqnr, {"weight_sqnr_db": sqnr})
        plain, weighted = weight_errors(tr, codes, scales, self.act_var)
        figures = {"weight_sqnr_db": db(self.signal, plain)}
        return Measured(tr, codes, scales, bits, self.proxy_sqnr(tr, weighted), figures)

    def proxy_sqnr(self, tr: Transform, weighted_error: float) -> float:
        """Output SQNR expected for inputs of independent channels with the estimated variances:
        the weight error weighted by them, plus the activations' rounding error."""
        var = self.act_var
        assert var is not None
        if self._proxy_signal is None:  # the column energies the equalization's RMS holds already
            self._proxy_signal = float((self.rms * self.rms * self.weight.shape[0]) @ var)
        # per-channel static layers start per token (calibrate keeps what measures better): rank
        # as the dynamic bundle; per-step layers have a static row per step
        noise = weighted_error + activation_error(tr, var, self.act_bits, not self.per_step, self.signal)
        return db(self._proxy_signal, noise)

    def finished(self, m: Measured) -> LayerPack:
        return m.pack if m.pack is not None else self.assemble(m.tr, m.codes, m.scales, m.bits)

    def hessian(self, tr: Transform) -> torch.Tensor | None:
        return None if self.stats is None else transformed_hessian(tr, self.stats.hessian())

    def candidate(self, cand: Candidate, bits: int) -> Measured:
        rms = self.rms if cand.pre.uses_rms else None
        return self.quantized(cand.transform(self.weight, self.config.transform, self.stats, rms, self.act), bits)

    def quantized(self, tr: Transform, bits: int) -> Measured:
        """The transform's weight quantized at ``bits`` (scale search, RTN codes), measured."""
        w_t = torch.from_numpy(np.ascontiguousarray(tr.w_t))
        search = self.config.quant.weight_search
        codes, scales, sq_err = quantize_weight(w_t, bits, search=search, hessian=self.hessian(tr))
        if self.stats is None:
            return self.measure_weight(tr, codes, scales, bits, sq_err)
        return self.measure(tr, codes, scales, bits)

    def refined(self, best: Measured, bits: int, refinement: Refinement) -> Measured:
        """``refinement``'s codes for the chosen transform, with its scales; kept only if they measure better."""
        hessian = self.hessian(best.tr)
        assert hessian is not None  # checked before the build starts
        codes = refinement.codes(best.tr.w_t, best.scales, bits, hessian)
        refined = self.measure(best.tr, codes, best.scales, bits)
        return refined if refined.sqnr > best.sqnr or self.sample is None else best

    def rtn_w4a8_sqnr(self) -> float:
        """Plain round-to-nearest of the layer's weight bits with per-token 8-bit activations
        (RTN W4A8), on the rows ``held_out_sqnr`` measures (every step's, for a per-step layer):
        what a layer kept at A4 must beat."""
        codes, scales, _ = round_to_nearest(self.w_ref, self.layer.bits)
        pack = self.assemble(Transform(w_t=self.w_ref.numpy()), codes, scales, self.layer.bits)
        layer = runtime_layer(pack, 8, "per_token_dynamic", self.w_ref.dtype)
        steps = self.stats.step_sample if self.per_step else None  # type: ignore[union-attr]
        rows = self.sample if steps is None else torch.from_numpy(steps.reshape(-1, steps.shape[-1])).double()
        return output_sqnr_db(layer, rows, self.w_ref)  # type: ignore[arg-type]

    def rtn_figures(self) -> dict[str, float]:
        """Plain W4A8 round-to-nearest of the same layer (per-row absmax, per-token activations)."""
        codes, scales, sq_err = round_to_nearest(self.w_ref, self.layer.bits)
        if self.stats is None:  # the weight figure needs no layer
            return {"rtn_weight_sqnr_db": db(self.signal, sq_err)}
        m = self.measure(Transform(w_t=self.w_ref.numpy()), codes, scales, self.layer.bits)
        return {f"rtn_{k}": v for k, v in m.figures.items()}
