"""Embedding tables (``[embed]``): each one's pack (which the config picks is ``select.py``'s).

An embedding's forward is a gather, so it has no activations to quantize and no basis to
rotate: each row is quantized on its own, ``embed.group_size`` columns per scale, by the
config's weight search. The quality record is measured with the runtime's ``QuantEmbedding``.
"""

from __future__ import annotations

import numpy as np
import torch
from duquant_runtime.bundle import LayerPack
from duquant_runtime.bundle_records import EMBEDDING
from duquant_runtime.codes import pack_codes, scale_groups, storage_for_bits
from duquant_runtime.config import DuQuantConfig, EmbedConfig
from duquant_runtime.embedding import QuantEmbedding
from duquant_runtime.errors import SelectionError
from duquant_runtime.signature import weight_signature

from .checkpoint import CheckpointError
from .quality import db
from .weightquant import quantize_weight, round_to_nearest

# Table rows quantized per step: a 257,152-row table never needs a float64 or search copy whole.
ROW_CHUNK = 8192


def _quantized_rows(rows: torch.Tensor, e: EmbedConfig, search: str | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(codes int8 [n, dim], scales float32 [n, groups], Σ err²) of table rows [n, dim], by the
    weight search ``search`` (None: plain round-to-nearest, the baseline)."""
    n, dim = rows.shape
    groups = scale_groups(dim, e.group_size)
    grouped = rows.reshape(n * groups, dim // groups)
    if search is None:
        codes, scales, sq_err = round_to_nearest(grouped, e.bits)
    else:
        codes, scales, sq_err = quantize_weight(grouped, e.bits, search=search)
    return codes.reshape(n, dim), scales.reshape(n, groups), sq_err


def pack_embedding(
    table: torch.Tensor,
    name: str,
    source_dtype: str,
    config: DuQuantConfig,
    source_bits: int | None = None,
) -> LayerPack:
    """The pack of an embedding table [num_embeddings, embedding_dim] in its checkpoint dtype,
    with its weight SQNR and plain round-to-nearest's beside it. Rows are read, checked and
    quantized ``ROW_CHUNK`` at a time into the stored codes: a float copy of PaliGemma's table
    alone would be 2 GB."""
    e = config.embed
    rows, dim = table.shape
    try:
        groups = scale_groups(dim, e.group_size)
    except ValueError:
        raise SelectionError(
            f"embedding {name} has {dim} columns, which embed.group_size {e.group_size} does not divide: "
            "give a group size that does (or 0: one scale per row)"
        ) from None
    stored, scales, rtn_err = None, np.empty((rows, groups), np.float32), 0.0
    for start in range(0, rows, ROW_CHUNK):
        chunk = table[start : start + ROW_CHUNK].to(torch.float32)
        if not bool(torch.isfinite(chunk).all()):
            first = start + int((~torch.isfinite(chunk)).any(dim=1).nonzero()[0, 0])
            raise CheckpointError(
                f"embedding {name} has NaN/Inf value(s), the first in row {first}; "
                "fix the checkpoint or leave the table out of [embed] include"
            )
        part = slice(start, start + len(chunk))
        codes, scales[part], _ = _quantized_rows(chunk, e, config.quant.weight_search)
        packed = pack_codes(codes, e.bits)
        if stored is None:
            stored = np.empty((rows, packed.shape[1]), packed.dtype)
        stored[part] = packed
        rtn_err += _quantized_rows(chunk, e, None)[2]
    signature = weight_signature(table)
    pack = LayerPack(
        name=name,
        in_features=dim,
        out_features=rows,
        weight_bits=e.bits,
        storage=storage_for_bits(e.bits),
        qweight=stored,
        w_scale=scales,
        bias=None,
        source_dtype=source_dtype,
        source_sum=signature[0],
        source_sumsq=signature[1],
        source_bits=source_bits,
        kind=EMBEDDING,
        group_size=e.group_size,
        choice=f"int{e.bits}" + (f"g{e.group_size}" if e.group_size else ""),
    )
    signal = signature[1]
    sqnr = db(signal, table_error(pack, table))
    pack.quality = {"weight_sqnr_db": round(sqnr, 3), "rtn_weight_sqnr_db": round(db(signal, rtn_err), 3)}
    return pack


def table_error(pack: LayerPack, table: torch.Tensor | np.ndarray) -> float:
    """Σ (dequantized − source)² over the table, through the runtime's QuantEmbedding (float64,
    ``ROW_CHUNK`` rows at a time)."""
    layer = QuantEmbedding.from_pack(pack, dtype=torch.float64)
    total = 0.0
    for start in range(0, pack.out_features, ROW_CHUNK):
        index = torch.arange(start, min(pack.out_features, start + ROW_CHUNK))
        source = torch.as_tensor(table[start : start + ROW_CHUNK]).to(torch.float64)
        total += float((layer.rows(index, torch.float64) - source).square().sum())
    return total
