"""A bundle's schema, both ways: the ``meta`` a writer stores for a pack, and what a reader
demands of what it finds (the header's documents, the stage list, each dataset's shape and
dtype from the layer's sizes, values that shapes cannot vouch for), then the ``LayerPack``
built from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .bundle_records import EMBEDDING, LAYER_KINDS, LINEAR, REBUILD, LayerPack
from .codes import INT4, INT8, scale_groups
from .config_sections import ACT_MODES, MAX_FLOW_STEPS
from .crc import crc32
from .errors import BundleReadError, BundleVersionError
from .h5file import Node
from .stages import F32, StageKind, StageSpec, check_plan


def _block(specs: tuple[StageSpec, ...], values: dict[str, np.ndarray]) -> int:
    """The first rotation's block size (0 without one): written for readers of 0.2.0."""
    return next((b for s in specs if (b := s.kind.block(values[s.key]))), 0)


def layer_meta(pack: LayerPack, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The layer's ``meta`` attribute: sizes, signature, stage lists, each dataset's crc32."""
    meta: dict[str, Any] = {
        "in_features": int(pack.in_features),
        "out_features": int(pack.out_features),
        "weight_bits": int(pack.weight_bits),
        "block_size": _block(pack.stages, pack.stage_values) or 1,
        "block_out_size": _block(pack.out_stages, pack.stage_values) or 1,
        "storage": pack.storage,
        "source_dtype": pack.source_dtype,
        "source_sum": float(pack.source_sum),
        "source_sumsq": float(pack.source_sumsq),
        **({} if pack.source_bits is None else {"source_bits": int(pack.source_bits)}),
        "stages": [[s.kind.name, s.key] for s in pack.stages],
        "out_stages": [[s.kind.name, s.key] for s in pack.out_stages],
        "crc32": {k: crc32(a) for k, a in arrays.items()},
    }
    if pack.kind != LINEAR:  # a linear layer's meta is what it was before embeddings existed
        meta.update(layer_kind=pack.kind, group_size=int(pack.group_size))
    if pack.quality:
        meta["quality"] = pack.quality
    if pack.choice:
        meta["choice"] = pack.choice
    if pack.act_source:
        meta["act_source"] = pack.act_source
    if pack.act_bits is not None:
        meta.update(act_bits=int(pack.act_bits), act_mode=str(pack.act_mode))
    return meta


def header_docs_ok(fp_doc: Any, config: Any, provenance: Any) -> bool:
    """Whether the header's JSON documents have the shapes readers rely on."""
    source = fp_doc.get("source") if isinstance(fp_doc, dict) else None
    return (
        isinstance(fp_doc, dict)
        and isinstance(fp_doc.get("config"), dict)
        and isinstance(source, list)
        and all(isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) for r in source)
        and isinstance(config, dict)
        and isinstance(provenance, dict)
    )


def plan(path: Path, name: str, meta: dict[str, Any]) -> tuple[tuple[StageSpec, ...], tuple[StageSpec, ...]]:
    """The layer's (input, output) stage lists, as its metadata lists them."""
    if "stages" not in meta:  # written before 0.3, in the fixed order of 0.1's datasets
        raise BundleVersionError(
            f"{path}: layer {name!r} lists no stages, as bundles before duquant-packs 0.3 did, which this "
            f"runtime no longer reads: {REBUILD}",
            layer=name,
            field="stages",
        )
    inputs = tuple(StageSpec(str(k), str(n)) for k, n in meta["stages"])
    outputs = tuple(StageSpec(str(k), str(n)) for k, n in meta.get("out_stages", []))
    check_plan(inputs, outputs)
    return inputs, outputs


def layer_kind(meta: dict[str, Any]) -> tuple[str, int | None]:
    """The layer's kind and, for an embedding, how many scales each row has (a ValueError
    when the meta is not one a writer makes)."""
    kind = str(meta.get("layer_kind", LINEAR))
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}")
    if kind == LINEAR:
        return kind, None
    if meta.get("stages") or meta.get("out_stages"):
        raise ValueError("an embedding lists transform stages")
    return kind, scale_groups(int(meta["in_features"]), int(meta.get("group_size", 0)))


def _expected(
    key: str, kind: StageKind | None, shape: tuple[int, ...], width: int, n_out: int, storage: str, groups: int | None
) -> tuple:
    """(shape, allowed dtypes) of a dataset, from the layer's attributes and, for a stage,
    what its kind demands (a rotation's block size is the dataset's last dimension, bounded).
    ``groups``: an embedding's scales per row (None for a linear layer)."""
    if kind is not None:
        return kind.shape(width, shape), kind.stored_dtypes
    if key == "qweight":
        if storage == INT4:
            return (n_out, (width + 1) // 2), (np.dtype(np.uint8),)
        return (n_out, width), (np.dtype(np.int8),)
    if groups is not None:
        if key != "w_scale":
            raise ValueError(f"an embedding holds no {key!r}")
        return (n_out, groups), F32
    if key == "act_scale" and len(shape) == 2 and 1 <= shape[0] <= MAX_FLOW_STEPS:
        return (shape[0], width), F32  # per-step static scales: one row per denoising step
    return (width,), F32  # scales, w_scale, bias, act_scale


def check_dataset(
    path: Path,
    name: str,
    key: str,
    stored: Node,
    kind: StageKind | None,
    width: int,
    n_out: int,
    storage: str,
    groups: int | None = None,
) -> None:
    """Refuse a dataset whose shape or dtype the layer's sizes do not give (before any read,
    so a damaged header can never make us allocate a huge array)."""
    if min(width, n_out) < 1 or max(width, n_out) > 1 << 24:
        raise ValueError(f"implausible layer size {n_out}x{width}")
    if storage not in (INT4, INT8):
        raise ValueError(f"unknown storage {storage!r}")
    try:
        shape, dtypes = _expected(key, kind, stored.shape, width, n_out, storage, groups)
    except ValueError as e:  # a stage kind refusing the stored shape (block size, tiling), an embedding's stray
        raise BundleReadError(
            f"{path}: layer {name!r} dataset {key!r}: {e}; the bundle is inconsistent", layer=name, field=key
        ) from None
    if stored.shape != shape or stored.dtype not in dtypes:
        raise BundleReadError(
            f"{path}: layer {name!r} dataset {key!r} has shape/dtype {(stored.shape, str(stored.dtype))}, "
            f"expected {shape}; the bundle is inconsistent",
            layer=name,
            field=key,
        )


def check_pack_values(path: Path, p: LayerPack, vetted: set[str]) -> None:
    """Values that shapes cannot vouch for, as each stage's kind checks them (a permutation
    must be one, numbers finite, scales positive). Stage keys in ``vetted`` (arrays shared
    by layers, checked before) are skipped."""
    for spec in (*p.stages, *p.out_stages):
        problem = None if spec.key in vetted else spec.kind.problem(p.stage_values[spec.key])
        if problem:
            raise BundleReadError(f"{path}: layer {p.name!r} {spec.key} {problem}", layer=p.name, field=spec.key)
    for key in ("w_scale", "bias", "act_scale"):
        value = getattr(p, key)
        if value is not None and not np.isfinite(value).all():
            raise BundleReadError(f"{path}: layer {p.name!r} {key} holds NaN/Inf", layer=p.name, field=key)


def _source_bits(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not -(1 << 63) <= value < 1 << 63:
        raise ValueError("malformed source_bits")
    return value


def _act(meta: dict[str, Any]) -> tuple[int | None, str | None]:
    """The layer's own activation bits and mode (0.10), None for a bundle that has none."""
    if "act_bits" not in meta:
        return None, None
    bits, mode = meta["act_bits"], meta.get("act_mode")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= 16 or mode not in ACT_MODES:
        raise ValueError(f"malformed activation quantization (act_bits {bits!r}, act_mode {mode!r})")
    return bits, mode


def _quality(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise ValueError("malformed quality report")
    return {str(k): float(v) for k, v in value.items()}


def pack_of(name: str, meta: dict[str, Any], arrays: dict[str, np.ndarray], stages: tuple[tuple, tuple]) -> LayerPack:
    """The layer's pack from its checked metadata, arrays and (input, output) stages."""
    inputs, outputs = stages
    act_bits, act_mode = _act(meta)
    return LayerPack(
        name=name,
        in_features=int(meta["in_features"]),
        out_features=int(meta["out_features"]),
        weight_bits=int(meta["weight_bits"]),
        storage=str(meta["storage"]),
        qweight=arrays["qweight"],
        w_scale=arrays["w_scale"],
        bias=arrays.get("bias"),
        act_scale=arrays.get("act_scale"),
        source_dtype=str(meta["source_dtype"]),
        source_sum=float(meta["source_sum"]),
        source_sumsq=float(meta["source_sumsq"]),
        source_bits=_source_bits(meta.get("source_bits")),
        stages=inputs,
        out_stages=outputs,
        stage_values={s.key: arrays[s.key] for s in (*inputs, *outputs)},
        quality=_quality(meta.get("quality")),
        choice=str(meta["choice"]) if "choice" in meta else None,
        act_source=str(meta["act_source"]) if "act_source" in meta else None,
        act_bits=act_bits,
        act_mode=act_mode,
        kind=str(meta.get("layer_kind", LINEAR)),
        group_size=int(meta.get("group_size", 0)) if meta.get("layer_kind") == EMBEDDING else 0,
    )
