"""One layer's pack, pure: the per-layer choice among the recipe's candidates, the refinements,
the 8-bit fallback and the quality record.

With a single candidate (the config asks for no per-layer choice) this is the configured
method as it always was. Otherwise every candidate is packed and measured
(``quantizer.LayerQuantizer``: data-free on the layer's activation estimate, or with statistics
on the captured sample), and the best is kept.

The recipe's refinements then recompute the chosen candidate's codes, each kept only when
it lowers the measured error. A layer whose best SQNR stays under ``quant.min_sqnr_db`` is
packed again at 8 bits. The choice and its figures (with plain round-to-nearest's for
comparison) go into the pack's ``quality`` record.
"""

from __future__ import annotations

import numpy as np
from duquant_runtime.bundle import LayerPack
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.signature import weight_signature
from duquant_runtime.stats import LayerStats

from .proxy import kind as layer_source_kind
from .quantizer import RANK_MIN_ROWS, LayerQuantizer, Measured, readonly_tensor
from .recipe import Candidate, Recipe
from .select import SelectedLayer

__all__ = ["RANK_MARGIN_DB", "RANK_MIN_ROWS", "LayerQuantizer", "choose", "pack_layer", "readonly_tensor"]

FALLBACK_BITS = 8  # quant.min_sqnr_db: layers that cannot reach it are packed at 8 bits
RANK_MARGIN_DB = 0.5  # the sample's runner-up within this of the leader is packed on all rows too


def choose(packer: LayerQuantizer, options: list[Candidate], bits: int, data_free: bool) -> tuple[Measured, Candidate]:
    """The best candidate, measured on the whole layer (ties keep the first).

    Data-free candidates are first ranked on a sample of rows (``row_sample``): a row's error
    depends only on that row and the transform, and the transform is the one of the whole
    layer. The leader's rotation then competes at the other ``block_search`` sizes (with the
    leader's pre-transform: where the rotation won, its block may too). The leader is packed on
    all rows, and so is the runner-up when the sample puts it within RANK_MARGIN_DB, so a near
    tie is settled on the whole weight.
    """
    ranker = packer.row_sample() if data_free and len(options) > 1 else packer
    options, scores = list(options), []
    best, best_index = _rank(ranker, options, bits, scores)
    if packer.act_var is not None or packer.sample is not None:
        width = packer.layer.in_features
        variants = [v for v in packer.recipe.block_variants(options[best_index], width) if v not in options]
        if variants:
            start = len(options)
            options += variants
            leader, index = _rank(ranker, variants, bits, scores)
            if leader.sqnr > best.sqnr:
                best, best_index = leader, start + index
    if ranker is packer:
        return best, options[best_index]
    order = sorted(range(len(options)), key=lambda i: -scores[i])
    finalists = sorted(i for i in order[:2] if scores[best_index] - scores[i] < RANK_MARGIN_DB)
    best = None
    for index in finalists:
        m = packer.candidate(options[index], bits)
        if best is None or m.sqnr > best.sqnr:
            best, best_index = m, index
    assert best is not None
    return best, options[best_index]


def _rank(ranker: LayerQuantizer, options: list[Candidate], bits: int, scores: list[float]) -> tuple[Measured, int]:
    """The best of ``options`` measured by ``ranker`` and its index; each score appended to ``scores``.
    Only the best so far is kept: one layer's temporaries at a time."""
    best: Measured | None = None
    best_index = 0
    for index, option in enumerate(options):
        m = ranker.candidate(option, bits)
        scores.append(m.sqnr)
        if best is None or m.sqnr > best.sqnr:
            best, best_index = m, index
        del m
    assert best is not None
    return best, best_index


def pack_layer(
    weight: np.ndarray,
    bias: np.ndarray | None,
    layer: SelectedLayer,
    source_dtype: str,
    recipe: Recipe | DuQuantConfig,
    stats: LayerStats | None = None,
    signature: tuple[float, float] | None = None,
    *,
    source_bits: int | None = None,
    act_rms: np.ndarray | None = None,
) -> LayerPack:
    """One layer's pack from its weight (float64 for a float64 method, float32 otherwise): the kept
    candidate transform, its codes and scales, static activation scales (static act_mode
    with statistics) and the quality record. ``source_bits``: ``bits_digest`` of the stored
    source tensor, which loads check live weights of the source's dtype against; ``act_rms``: the
    layer's data-free activation estimate (``proxy.activation_rms``), when it has one."""
    signature = signature or weight_signature(readonly_tensor(weight))
    packer = LayerQuantizer(
        weight, bias, layer, source_dtype, recipe, stats, signature, source_bits=source_bits, act_rms=act_rms
    )
    bits = layer.bits
    options = list(packer.recipe.options(packer.act_var is not None))
    best, choice = chosen_and_refined(packer, options, bits)
    config = packer.config
    q = config.quant
    if packer.sample is not None:
        best, choice = activation_choice(packer, options, best, choice)
    if q.min_sqnr_db > 0 and best.sqnr < q.min_sqnr_db and bits < FALLBACK_BITS:
        bits = FALLBACK_BITS
        best = packer.quantized(best.tr, bits)  # the chosen transform, at 8 bits
        for refinement in packer.recipe.refinements:
            best = packer.refined(best, bits, refinement)
        choice += f"+w{bits}"
    pack = packer.finished(best)
    figures = dict(best.figures)
    if config.per_layer_choice or q.min_sqnr_db > 0:
        figures.update(packer.rtn_figures())
    pack.quality = {k: round(v, 3) if np.isfinite(v) else 999.0 for k, v in figures.items()}
    pack.choice = choice if packer.recipe.records_choice else None
    if stats is None and len(options) > 1:
        pack.act_source = "none" if packer.act_var is None else layer_source(layer)
    pack.act_bits, pack.act_mode = packer.act_bits, packer.act_mode
    return pack


def chosen_and_refined(packer: LayerQuantizer, options: list[Candidate], bits: int) -> tuple[Measured, str]:
    """The best candidate with the recipe's refinements that measure better, and its label."""
    best, chosen = choose(packer, options, bits, packer.stats is None)
    choice = chosen.label()
    for refinement in packer.recipe.refinements:
        refined = packer.refined(best, bits, refinement)
        choice += refinement.label if refined is not best else ""
        best = refined
    return best, choice


def activation_choice(
    packer: LayerQuantizer, options: list[Candidate], best: Measured, choice: str
) -> tuple[Measured, str]:
    """With statistics, the layer's activation quantization by measurement on held-out rows:
    a per-channel static layer keeps per-token scales where they measure better; a layer whose
    activations are under 8 bits and measure under ``quant.a4_min_sqnr_db`` (or, with
    ``quant.a4_vs_rtn_w4a8``, under RTN W4A8 of the layer plus ``a4_rtn_margin_db``) is chosen
    again at 8 (``+a8`` in its choice). Either way the held-out figure is recorded."""
    q = packer.config.quant
    may_fall_back = q.a4_min_sqnr_db > 0 and 0 < packer.act_bits < FALLBACK_BITS
    if not (packer.static or may_fall_back):
        return best, choice
    held = packer.held_out_sqnr(best)
    if packer.act_mode == "per_channel_static" and packer.act_bits > 0:
        packer.act_mode = "per_token_dynamic"
        per_token = packer.measure(best.tr, best.codes, best.scales, best.bits)  # the same codes, no scales
        if per_token.sqnr > held:
            best, held = per_token, per_token.sqnr
            choice += "+tok"
        else:
            packer.act_mode = "per_channel_static"
    rtn = packer.rtn_w4a8_sqnr() if may_fall_back and q.a4_vs_rtn_w4a8 else None
    floor = q.a4_min_sqnr_db if rtn is None else max(q.a4_min_sqnr_db, rtn + q.a4_rtn_margin_db)
    if may_fall_back and held < floor:
        packer.act_bits, packer.act_mode = FALLBACK_BITS, q.mode_for(packer.layer.name)
        best, choice = chosen_and_refined(packer, options, best.bits)
        best, choice = activation_choice(packer, options, best, choice + "+a8")
        best.figures["a4_held_out_sqnr_db"] = held
    else:
        best.figures["held_out_sqnr_db"] = held
    if rtn is not None:
        best.figures["rtn_w4a8_held_out_sqnr_db"] = rtn
    return best, choice


def layer_source(layer: SelectedLayer) -> str:
    """Where the layer's activation estimate came from (``proxy.kind``; "given" when a caller
    passed one for a layer selected without producers)."""
    return "given" if layer.proxy is None else layer_source_kind(layer.proxy)
