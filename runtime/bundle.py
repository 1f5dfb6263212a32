"""The bundle format (HDF5, format_version 2), defined once: the pipeline writes with it, the
runtime reads. This module is its public face; the parts live by job in ``bundle_records``
(``LayerPack``, ``BundleHeader``, names), ``bundle_schema`` (a layer's metadata and what a
reader demands of it), ``bundle_writer`` and ``bundle_reader``, on the sealed container of
``h5file``. Layout (docs/format.md)::

    /                   attrs: format, format_version, fingerprint, fingerprint_json,
                               config_json, provenance_json, tool_version, created_at,
                               index_json (from 0.5: {"layers": {module: {"meta": the layer's
                               meta, "datasets": {dataset: [byte offset, dtype, shape]}}}})
    /layers/<module>    attr meta (JSON): in_features, out_features, weight_bits, storage,
                               stages, out_stages ([kind, dataset] in order),
                               block_size, block_out_size, source_dtype,
                               source_sum, source_sumsq (float64 signature of the weight),
                               source_bits (int64 sum of its raw bytes; from 0.4),
                               crc32 {dataset: crc32 of its bytes},
                               choice (the candidate transform build kept, e.g.
                               "hadamard+eq1.0", "rtn"), quality (its measured SQNR)
        in_scale  float32 [in]              (per-channel equalization x·in_scale)
        perm      int32  [in]               (permutation stages)
        r_in      float32 [n_in_blocks, B, B]   (rotation stages; last block identity-padded)
        perm2, r_in2                        (duquant: zigzag, second rotation)
        r_out     float32 [n_out_blocks, Bo, Bo] (absent when row_rot is off)
        qweight   uint8 [out, ceil(in/2)] (int4x2) or int8 [out, in]
        w_scale   float32 [out]
        bias      float32 [out]          (absent when the layer has none)
        act_scale float32 [in]           (static activation scales, from build --calib)
    /shared/<dataset>-<n>  stage arrays identical across layers, hard-linked from each

The seal (the first 512 bytes) is checked before HDF5 parses a byte and vouches for every
dataset. Bundles of format 1 and bundles whose layers list no stages (before 0.3) are
refused with the command that rebuilds them.
"""

from __future__ import annotations

from pathlib import Path

from . import h5file
from .bundle_reader import BundleReader
from .bundle_records import (
    FIX,
    FIXED,
    FORMAT_NAME,
    INDEX,
    KIND,
    LAYERS,
    SEAL_MAGIC,
    SHARED,
    BundleHeader,
    LayerPack,
)
from .bundle_writer import BundleWriter
from .crc import crc32

__all__ = [
    "FIX",
    "FIXED",
    "FORMAT_NAME",
    "INDEX",
    "KIND",
    "LAYERS",
    "SEAL_MAGIC",
    "SHARED",
    "BundleHeader",
    "BundleReader",
    "BundleWriter",
    "LayerPack",
    "crc32",
    "seal",
]


def seal(path: str | Path) -> None:
    """Seal again a closed bundle edited in place (what tests of damaged bundles need)."""
    h5file.seal(Path(path), SEAL_MAGIC)
