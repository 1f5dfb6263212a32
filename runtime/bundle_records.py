"""What a bundle holds, as records: ``LayerPack`` (one layer's arrays and metadata, as built
and as read), ``BundleHeader`` (the root attributes), and the names and kind of the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fingerprint import FORMAT_VERSION
from .h5file import BUNDLE_MAGIC, FileKind
from .stages import StageSpec

KIND = FileKind(BUNDLE_MAGIC, "duquant-packs-bundle", FORMAT_VERSION)
FORMAT_NAME = KIND.format
SEAL_MAGIC = KIND.magic
LAYERS = "layers"  # one group per layer: /layers/<module name>
SHARED = "shared"  # datasets identical across layers (e.g. one Hadamard per width), stored once
INDEX = "index_json"  # root attribute (from 0.5): every layer's meta and dataset offsets
FIXED = ("qweight", "w_scale", "bias", "act_scale")  # every layer's own datasets besides its stages
# Which tool release first wrote each format version (for "built by X" messages).
FORMAT_WRITERS = {1: "0.1", 2: "0.2"}
# A layer's kind: what it replaces. A linear layer's meta names none (every bundle before 0.6
# held linear layers only); an embedding's says "embedding".
LINEAR, EMBEDDING = "linear", "embedding"
LAYER_KINDS = (LINEAR, EMBEDDING)
FIX = "rebuild it with `duquant-packs build`"
REBUILD = "rebuild it with `duquant-packs build -c <config> --ckpt <checkpoint>`"


@dataclass
class LayerPack:
    """Everything the runtime needs for one layer; produced offline, stored as-is.

    ``stages`` / ``out_stages`` list the transform in order; ``stage_values`` holds each
    stage's array under its key (float32 scales and rotation blocks, int32 permutations).
    """

    name: str
    in_features: int
    out_features: int
    weight_bits: int
    storage: str
    qweight: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    source_dtype: str
    source_sum: float
    source_sumsq: float
    stages: tuple[StageSpec, ...] = ()
    source_bits: int | None = None  # signature.bits_digest of the source tensor (absent before 0.4)
    out_stages: tuple[StageSpec, ...] = ()
    stage_values: dict[str, np.ndarray] = field(default_factory=dict)
    act_scale: np.ndarray | None = None
    quality: dict[str, float] | None = None
    choice: str | None = None
    # where a data-free choice read the activation sizes from: "norm", "producer rows" or "none"
    # (the unweighted weight error); None when the build did not choose data-free
    act_source: str | None = None
    # the layer's activation quantization as built (0.10: per layer, e.g. an A4 layer kept at A8
    # by quant.a4_min_sqnr_db); None in older bundles, whose layers all run the config's
    act_bits: int | None = None
    act_mode: str | None = None
    # LINEAR (in/out features: the weight's columns/rows) or EMBEDDING (embedding_dim /
    # num_embeddings: a table of rows, no stages, ``w_scale`` [rows, groups] of ``group_size``
    # columns each, 0 = one group per row)
    kind: str = LINEAR
    group_size: int = 0
    # stage key -> where the bundle stores an array several layers link to (set by the reader,
    # never written): the loader makes one tensor per location
    shared: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def array(self, key: str) -> np.ndarray | None:
        """A stage's array (``"r_in"``, ``"perm"``...) or a fixed dataset, None when absent."""
        return self.stage_values.get(key) if key not in FIXED else getattr(self, key)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every dataset of the layer, stages first in order."""
        out = {s.key: self.stage_values[s.key] for s in (*self.stages, *self.out_stages)}
        out.update((k, getattr(self, k)) for k in FIXED if getattr(self, k) is not None)
        return out

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


@dataclass(frozen=True)
class BundleHeader:
    path: Path
    format_version: int
    fingerprint: str
    fingerprint_doc: dict[str, Any]
    config: dict[str, Any]
    provenance: dict[str, Any]
    tool_version: str
    created_at: str
    layer_names: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.config.get("name", "?"))
