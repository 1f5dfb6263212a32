"""Fingerprint: sha256 over the canonical JSON of everything a bundle's numbers depend on.

The document hashed is stored verbatim in the bundle, so a mismatch can be explained
field by field, and the hash can be recomputed to detect an edited header.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import DuQuantConfig

FORMAT_VERSION = 2
# Bump when the pack algorithm's numbers change for the same config and weights.
ALGORITHM_VERSIONS = {"svd": 1, "hadamard": 1, "duquant": 1}
SHORT_LEN = 12


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class SourceTensor:
    """One checkpoint tensor the packs were computed from."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    def to_json(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.sha256]


def fingerprint_document(
    config: DuQuantConfig,
    tensors: Iterable[SourceTensor],
    calib_digest: str | None = None,
    choices: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``choices`` (layer -> the candidate build kept, e.g. "hadamard+eq0.5" or
    "rtn+eq1+w8") binds the per-layer decisions too: two bundles that differ in any
    layer's transform never share a fingerprint. It is known only after the packs."""
    doc = {
        "format_version": FORMAT_VERSION,
        "algorithm": {"method": config.transform.method, "version": ALGORITHM_VERSIONS[config.transform.method]},
        "config": config.fingerprint_fields(),
        "source": sorted((t.to_json() for t in tensors), key=lambda row: row[0]),
        "calib": calib_digest,
    }
    if choices:
        doc["choices"] = sorted([name, str(choice)] for name, choice in choices.items())
    return doc


def inputs_of(document: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint document known before a build (all but the choices)."""
    return {k: v for k, v in document.items() if k != "choices"}


def digest(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def diff(bundle: Any, expected: Any, path: str = "") -> list[str]:
    """Field-by-field differences between two JSON-like values, as readable lines."""
    if isinstance(bundle, Mapping) and isinstance(expected, Mapping):
        out: list[str] = []
        for key in sorted(set(bundle) | set(expected)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in bundle:
                out.append(f"{sub}: missing in bundle, expected {expected[key]!r}")
            elif key not in expected:
                out.append(f"{sub}: bundle has {bundle[key]!r}, not expected")
            else:
                out.extend(diff(bundle[key], expected[key], sub))
        return out
    if bundle != expected:
        return [f"{path}: bundle {bundle!r}, expected {expected!r}"]
    return []


def diff_sources(bundle_rows: list[list[Any]], live_rows: list[list[Any]]) -> list[str]:
    """Which source tensors differ (by name), for 'built from another checkpoint' messages."""
    have = {r[0]: r for r in bundle_rows}
    want = {r[0]: r for r in live_rows}
    out = []
    for name in sorted(set(have) | set(want)):
        if name not in want:
            out.append(f"{name}: in bundle, not in checkpoint selection")
        elif name not in have:
            out.append(f"{name}: selected in checkpoint, not in bundle")
        else:
            for i, label in ((1, "dtype"), (2, "shape"), (3, "sha256")):
                if have[name][i] != want[name][i]:
                    b, e = have[name][i], want[name][i]
                    if label == "sha256":
                        b, e = b[:12], e[:12]
                    out.append(f"{name}: {label} differs (bundle {b}, checkpoint {e})")
    return out
