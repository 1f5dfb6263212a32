"""Checks shared by `duquant-packs verify` and `load_bundle`: integrity and config match."""

from __future__ import annotations

from typing import NamedTuple

from .bundle import BundleHeader, BundleReader
from .errors import BundleReadError, ConfigMismatchError
from .fingerprint import diff_fields
from .schema import CONFIG_SCHEMA, SCHEMA_1_REFUSED, DuQuantConfig


def expected_layers(header: BundleHeader) -> set[str]:
    """Layer names the fingerprint says the bundle holds: one per selected '.weight', less the
    checkpoint's name prefix (``name_prefix``, recorded when the build detected one)."""
    prefix = str(header.fingerprint_doc.get("name_prefix", ""))
    return {
        row[0][len(prefix) : -len(".weight")]
        for row in header.fingerprint_doc.get("source", [])
        if str(row[0]).endswith(".weight") and str(row[0]).startswith(prefix)
    }


class ConfigProblem(NamedTuple):
    """One field where a bundle's config differs from the expected one."""

    field: str  # e.g. "transform.block_size"
    text: str  # the whole sentence, e.g. "config transform.block_size: bundle 16, expected 64"

    def __str__(self) -> str:
        return self.text


def config_problems(header: BundleHeader, expected: DuQuantConfig) -> list[ConfigProblem]:
    """Field-by-field differences between the bundle's config and ``expected`` (empty: match)."""
    schema = header.fingerprint_doc.get("schema", 1)  # bundles of 0.1 and 0.2 wrote none: schema 1
    if schema == 1:
        return [ConfigProblem("schema", SCHEMA_1_REFUSED)]
    if schema != CONFIG_SCHEMA:
        return [ConfigProblem("schema", f"config schema {schema!r} is not one this tool knows (1, {CONFIG_SCHEMA})")]
    bundle, want = header.fingerprint_doc.get("config", {}), expected.fingerprint_fields()
    return [ConfigProblem(path, f"config {line}") for path, line in diff_fields(bundle, want)]


def require_config(header: BundleHeader, expected: DuQuantConfig) -> None:
    """Refuses a bundle built for another config than ``expected`` (``load_bundle``), naming every
    field that differs; a schema-1 bundle is refused with the rebuild that fixes it."""
    problems = config_problems(header, expected)
    if not problems:
        return
    if problems[0].text == SCHEMA_1_REFUSED:  # not another config: one no longer compared
        raise ConfigMismatchError(f"{header.path}: {SCHEMA_1_REFUSED}", field="schema")
    raise ConfigMismatchError(
        f"{header.path} was built for another config than {expected.name!r}: " + "; ".join(p.text for p in problems),
        field=problems[0].field,
    )


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
    try:
        problems += reader.index_problems()
    except BundleReadError as exc:
        problems.append(str(exc))
    return problems
