"""Fingerprint: sha256 over the canonical JSON of everything a bundle's numbers depend on.

The document hashed is stored verbatim in the bundle, so a mismatch can be explained
field by field, and the hash can be recomputed to detect an edited header. The pipeline
writes it (``duquant_pipeline.build_fingerprint``); the runtime only reads and compares.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMAT_VERSION = 2
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
    # a layer's own tensor (its weight or bias), or a producer the build read its activation
    # estimate from (recorded apart, under "producers": the runtime's layers are the former)
    producer: bool = False

    def to_json(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.sha256]


def digest(document: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def diff_fields(bundle: Any, expected: Any, path: str = "") -> list[tuple[str, str]]:
    """Field-by-field differences between two JSON-like values: (dotted path, readable line)."""
    if isinstance(bundle, Mapping) and isinstance(expected, Mapping):
        out: list[tuple[str, str]] = []
        for key in sorted(set(bundle) | set(expected)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in bundle:
                out.append((sub, f"{sub}: missing in bundle, expected {expected[key]!r}"))
            elif key not in expected:
                out.append((sub, f"{sub}: bundle has {bundle[key]!r}, not expected"))
            else:
                out.extend(diff_fields(bundle[key], expected[key], sub))
        return out
    if bundle != expected:
        return [(path, f"{path}: bundle {bundle!r}, expected {expected!r}")]
    return []


def diff_sources(bundle_rows: list[list[Any]], live_rows: list[list[Any]]) -> list[str]:
    """Which source tensors differ (by name), one line each, for 'built from another
    checkpoint' messages."""
    have = {r[0]: r for r in bundle_rows}
    want = {r[0]: r for r in live_rows}
    out = []
    for name in sorted(set(have) | set(want)):
        if name not in want:
            out.append(f"{name}: in bundle, not in checkpoint selection")
        elif name not in have:
            out.append(f"{name}: selected in checkpoint, not in bundle")
        else:
            differs = []
            for i, label in ((1, "dtype"), (2, "shape"), (3, "sha256")):
                if have[name][i] != want[name][i]:
                    b, e = have[name][i], want[name][i]
                    if label == "sha256":
                        b, e = b[:12], e[:12]
                    differs.append(f"{label} bundle {b}, checkpoint {e}")
            if differs:
                out.append(f"{name}: differs ({'; '.join(differs)})")
    return out
