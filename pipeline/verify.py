"""`duquant-packs verify`: is a bundle intact, and was it built for this config and checkpoint?"""

from __future__ import annotations

from pathlib import Path

from duquant_runtime.bundle import BundleHeader, BundleReader
from duquant_runtime.bundle_checks import config_problems, integrity_problems
from duquant_runtime.config import DuQuantConfig, from_dict
from duquant_runtime.errors import BundleError, SelectionError
from duquant_runtime.fingerprint import SourceTensor, diff_sources

from .checkpoint import Checkpoint
from .select import select_layers, source_tensors

SHOWN_TENSORS = 5  # differing source tensors named before "--all lists every one"


def verify_bundle(
    path: str | Path,
    *,
    config: DuQuantConfig | None = None,
    checkpoint: str | Path | None = None,
    sources: list[SourceTensor] | None = None,
    every_tensor: bool = True,
) -> list[str]:
    """Problems found, one line each (empty list: the bundle is intact and matches). With
    ``every_tensor`` False, a checkpoint that differs in many tensors is one count and the
    first few names."""
    try:
        with BundleReader(path) as reader:
            return reader_problems(
                reader, config=config, checkpoint=checkpoint, sources=sources, every_tensor=every_tensor
            )
    except BundleError as exc:
        return [str(exc)]


def reader_problems(
    reader: BundleReader,
    *,
    config: DuQuantConfig | None = None,
    checkpoint: str | Path | None = None,
    sources: list[SourceTensor] | None = None,
    every_tensor: bool = True,
) -> list[str]:
    """``verify_bundle`` on a bundle already open (its seal checked once)."""
    problems = integrity_problems(reader)
    header = reader.header
    if config is not None:
        problems += config_problems(header, config)
    if checkpoint is not None and sources is None:
        ckpt = Checkpoint.open(checkpoint)
        bundle_config = config or from_dict(header.config)
        try:
            sources = source_tensors(ckpt, select_layers(bundle_config, ckpt))
        except SelectionError as exc:  # nothing to compare: the checkpoint is another one
            return [*problems, _another_checkpoint(header, checkpoint, exc)]
    if sources is not None:
        recorded = header.fingerprint_doc["source"] + header.fingerprint_doc.get("producers", [])
        differing = diff_sources(recorded, [s.to_json() for s in sources])
        compared = len({r[0] for r in recorded} | {s.name for s in sources})
        problems += _source_lines(differing, compared, every_tensor)
    return problems


def _source_lines(differing: list[str], compared: int, every_tensor: bool) -> list[str]:
    if every_tensor or len(differing) <= SHOWN_TENSORS:
        return [f"checkpoint {line}" for line in differing]
    more = len(differing) - SHOWN_TENSORS
    return [
        f"checkpoint: {len(differing)} of {compared} source tensors differ (another checkpoint?), first "
        f"{SHOWN_TENSORS}:",
        *(f"  {line}" for line in differing[:SHOWN_TENSORS]),
        f"  ... and {more} more (`verify --all` lists every one)",
    ]


def _another_checkpoint(header: BundleHeader, checkpoint: str | Path, why: SelectionError) -> str:
    """The config selects nothing comparable in ``checkpoint``: name the checkpoint the
    fingerprint's sources come from, and why this one has none of them."""
    source = header.fingerprint_doc.get("source") or [["?"]]
    built_from = header.provenance.get("checkpoint", "unknown")
    return (
        f"checkpoint {checkpoint} is not the one this bundle was built from ({built_from}, whose "
        f"{len(source)} source tensors include {source[0][0]}): {why}"
    )
