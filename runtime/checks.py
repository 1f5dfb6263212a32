"""Checks shared by `duquant-packs verify` and `load_bundle`: integrity and config match."""

from __future__ import annotations

from .bundle import BundleHeader, BundleReader
from .config import DuQuantConfig
from .errors import BundleReadError
from .fingerprint import diff


def expected_layers(header: BundleHeader) -> set[str]:
    """Module names the fingerprint says the bundle holds (one per selected '.weight')."""
    return {
        row[0][: -len(".weight")] for row in header.fingerprint_doc.get("source", []) if str(row[0]).endswith(".weight")
    }


def config_problems(header: BundleHeader, expected: DuQuantConfig) -> list[str]:
    """Field-by-field differences between the bundle's config and ``expected`` (empty: match)."""
    lines = diff(header.fingerprint_doc.get("config", {}), expected.fingerprint_fields())
    return [f"config {line}" for line in lines]


def integrity_problems(reader: BundleReader) -> list[str]:
    """Every layer present, readable, consistent and passing its checksums."""
    problems = []
    names = set(reader.header.layer_names)
    want = expected_layers(reader.header)
    for missing in sorted(want - names):
        problems.append(f"layer {missing}: missing from the bundle (truncated or incomplete build)")
    for extra in sorted(names - want):
        problems.append(f"layer {extra}: present but not covered by the fingerprint")
    for name in sorted(names & want):
        try:
            reader.read_layer(name, check=True)
        except BundleReadError as exc:
            problems.append(str(exc))
    return problems
