"""The fingerprint document of a build: everything a bundle's numbers depend on.

format version, config schema, the method's name and version (from its handler), every
config field that changes the packs or the runtime numerics, the selected source tensors'
digests, the calibration digest, and — known only after the packs — each layer's choice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from duquant_runtime.fingerprint import FORMAT_VERSION, SourceTensor
from duquant_runtime.schema import CONFIG_SCHEMA, DuQuantConfig

from .rotations import handler


def fingerprint_document(
    config: DuQuantConfig,
    tensors: Iterable[SourceTensor],  # the layers' own and (``producer``) the estimates' tensors
    calib_digest: str | None = None,
    choices: Mapping[str, str] | None = None,
    name_prefix: str = "",
) -> dict[str, Any]:
    """``choices`` (layer -> the candidate build kept, e.g. "hadamard+eq0.5" or
    "rtn+eq1+w8") binds the per-layer decisions too: two bundles that differ in any
    layer's transform never share a fingerprint. ``name_prefix``: the checkpoint's prefix
    the layer names were found under (e.g. LeRobot's "model."), recorded only when there is
    one, so bundles without it keep their fingerprints."""
    method = handler(config.transform.method)
    doc = {
        "format_version": FORMAT_VERSION,
        "schema": CONFIG_SCHEMA,
        "algorithm": {"method": method.name, "version": method.version},
        "config": config.fingerprint_fields(),
        "source": sorted((t.to_json() for t in tensors if not t.producer), key=lambda row: row[0]),
        "calib": calib_digest,
    }
    producers = sorted((t.to_json() for t in tensors if t.producer), key=lambda row: row[0])
    if producers:  # the activation estimates' tensors (norm gains): recorded only when read
        doc["producers"] = producers
    if name_prefix:
        doc["name_prefix"] = name_prefix
    if choices:
        doc["choices"] = sorted([name, str(choice)] for name, choice in choices.items())
    return doc


def inputs_of(document: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint document known before a build (all but the choices)."""
    return {k: v for k, v in document.items() if k != "choices"}
