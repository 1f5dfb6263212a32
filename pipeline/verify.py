"""`duquant-packs verify`: is a bundle intact, and was it built for this config and checkpoint?"""

from __future__ import annotations

from pathlib import Path

from duquant_runtime.bundle import BundleReader
from duquant_runtime.checks import config_problems, integrity_problems
from duquant_runtime.config import DuQuantConfig, from_dict
from duquant_runtime.errors import BundleError
from duquant_runtime.fingerprint import SourceTensor, diff_sources

from .checkpoint import Checkpoint
from .select import select_layers, source_tensors


def verify_bundle(
    path: str | Path,
    *,
    config: DuQuantConfig | None = None,
    checkpoint: str | Path | None = None,
    sources: list[SourceTensor] | None = None,
) -> list[str]:
    """Problems found, one line each (empty list: the bundle is intact and matches)."""
    try:
        with BundleReader(path) as reader:
            return reader_problems(reader, config=config, checkpoint=checkpoint, sources=sources)
    except BundleError as exc:
        return [str(exc)]


def reader_problems(
    reader: BundleReader,
    *,
    config: DuQuantConfig | None = None,
    checkpoint: str | Path | None = None,
    sources: list[SourceTensor] | None = None,
) -> list[str]:
    """``verify_bundle`` on a bundle already open (its seal checked once)."""
    problems = integrity_problems(reader)
    header = reader.header
    if config is not None:
        problems += config_problems(header, config)
    if checkpoint is not None and sources is None:
        ckpt = Checkpoint.open(checkpoint)
        bundle_config = config or from_dict(header.config)
        sources = source_tensors(ckpt, select_layers(bundle_config, ckpt))
    if sources is not None:
        live = [s.to_json() for s in sources]
        problems += [f"checkpoint {line}" for line in diff_sources(header.fingerprint_doc["source"], live)]
    return problems
