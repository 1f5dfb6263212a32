"""Build: checkpoint + config -> one fingerprinted HDF5 bundle, written atomically.

The orchestration only: select the layers, check the inputs, reuse a bundle built from the
same inputs, else run the packs (``workers``) and write them as they arrive (``output``,
``duquant_runtime.bundle``). The fingerprint is computed at the end, when every layer's
choice is known, and names the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
from duquant_runtime import __version__, h5file
from duquant_runtime.bundle import LAYERS, BundleReader, LayerPack, seal, write_header, write_layer
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.errors import BundleError
from duquant_runtime.fingerprint import SourceTensor, digest
from duquant_runtime.stats import StatsError, StatsReader

from .checkpoint import Checkpoint
from .fingerprints import fingerprint_document, inputs_of
from .methods import check
from .output import OutputError, bundle_path, check_space, output_error, output_errors, remove_stale_temps
from .pack import pack_layer
from .process import block_stop_signals
from .select import SelectedLayer, select_layers, source_tensors
from .verify import reader_problems
from .workers import BACKENDS, run_jobs, start_pool

Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class BuildResult:
    path: Path
    fingerprint: str
    layers: int
    skipped: bool
    seconds: float
    weight_bytes: int
    name_prefix: str = ""  # the checkpoint's prefix the layer names were found under, e.g. "model."
    quality: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> its recorded SQNR figures


# Below this many selected weights a pool's start-up (worker processes importing torch and
# loading the compiled kernels, ~2 s here) costs more than a second core saves: on 2 cores
# the in-process build was faster at 7 M, 30 M and 114 M weights and the pool at 2.7 G
# (README "Build speed"); the linear fit of those runs crosses at ~240 M.
POOL_MIN_WEIGHTS = 250_000_000


def default_jobs(layers: list[SelectedLayer], backend: str) -> int:
    """--jobs when not given: in-process for small selections, else one worker per core."""
    cores = os.cpu_count() or 1
    if backend == "dask":
        return cores
    return 1 if sum(la.out_features * la.in_features for la in layers) < POOL_MIN_WEIGHTS else cores


def _check_calib(config: DuQuantConfig, layers: list[SelectedLayer], calib: str | Path | None) -> str | None:
    """Refuse, before any work, a config that needs statistics without them, or statistics
    that do not cover the selection; returns the statistics digest for the fingerprint."""
    needs = [
        k
        for k, on in (("quant.gptq", config.quant.gptq), ("transform.smooth_alpha", config.transform.smooth_alpha > 0))
        if on
    ]
    if calib is None:
        if needs:
            raise StatsError(
                f"config {config.name!r} sets {' and '.join(needs)}, which need calibration statistics: "
                "pass --calib stats.h5 (record them with duquant_runtime.capture_stats)"
            )
        return None
    reader = StatsReader(calib)
    missing = [la.name for la in layers if la.name not in reader.meta]
    if missing:
        raise StatsError(
            f"{calib} has no statistics for {len(missing)} of the {len(layers)} selected layers (e.g. {missing[0]}): "
            "capture them with the same config on this checkpoint's model"
        )
    wrong = [la.name for la in layers if int(reader.meta[la.name]["in_features"]) != la.in_features]
    if wrong:
        raise StatsError(
            f"{calib} was captured on another checkpoint: {wrong[0]} has in_features "
            f"{reader.meta[wrong[0]]['in_features']} there"
        )
    return reader.digest


def _reusable(
    out_cfg: Path, config: DuQuantConfig, inputs: dict, sources: list[SourceTensor]
) -> tuple[Path, str, dict[str, dict[str, float]]] | None:
    """An existing bundle built by this tool version from exactly these inputs (config,
    sources, statistics) that verifies, newest first. Its per-layer choices follow from them
    for one version only: a release may choose differently (0.4 ranks candidates on a row
    sample) or write more (0.5's layer index), so after an upgrade the first build rebuilds."""
    for path in sorted(out_cfg.glob(f"{config.name}-*.h5"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            with BundleReader(path) as reader:  # one open: the seal is read once
                fp_doc = reader.header.fingerprint_doc
                same = reader.header.tool_version == __version__ and inputs_of(fp_doc) == inputs
                if same and not reader_problems(reader, config=config, sources=sources):
                    quality = {n: reader.layer_summary(n).get("quality", {}) for n in reader.header.layer_names}
                    return path, reader.header.fingerprint, quality
        except BundleError:
            continue
    return None


def _write_packs(
    f: h5py.File, packs: Iterator[LayerPack], layers: list[SelectedLayer], out_cfg: Path, progress: Progress | None
) -> tuple[dict[str, str], dict[str, Any], dict[str, dict[str, float]]]:
    """Write packs as they arrive; returns each layer's choice (for the fingerprint), its
    index entry (for the header) and its quality figures (for the build's summary)."""
    by_name = {la.name: la for la in layers}
    total_bytes = sum(la.weight_bytes for la in layers)
    choices: dict[str, str] = {}
    index: dict[str, Any] = {}
    quality: dict[str, dict[str, float]] = {}
    shared: dict = {}
    done_bytes = 0
    with output_errors(out_cfg):
        f.require_group(LAYERS)
    for done_layers, pack in enumerate(packs, 1):
        with output_errors(out_cfg):
            index[pack.name] = write_layer(f, pack, shared)
        if pack.choice:
            choices[pack.name] = pack.choice
        quality[pack.name] = dict(pack.quality or {})
        done_bytes += by_name[pack.name].weight_bytes
        if progress:
            progress(done_layers, len(layers), done_bytes, total_bytes)
    return choices, index, quality


def build_bundle(
    config: DuQuantConfig,
    checkpoint: str | Path,
    out_dir: str | Path = "artifacts",
    *,
    jobs: int | None = None,
    backend: str = "loky",
    force: bool = False,
    progress: Progress | None = None,
    calib: str | Path | None = None,
    scheduler: str | None = None,
) -> BuildResult:
    """Build (or reuse) the bundle of ``config`` for ``checkpoint``; returns where it is.

    ``calib`` is a statistics file from ``duquant_runtime.capture_stats``; its digest enters
    the fingerprint. ``backend="dask"`` runs on the dask scheduler at ``scheduler`` (workers
    need the checkpoint at the same path), or on a local cluster of ``jobs`` workers.
    ``progress(layers_done, layers_total, bytes_done, bytes_total)`` is
    called as layers finish.
    """
    start = time.perf_counter()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check(config)
    ckpt = Checkpoint.open(checkpoint)
    layers = select_layers(config, ckpt)
    name_prefix = layers[0].prefix
    jobs = jobs or default_jobs(layers, backend)
    stats_digest = _check_calib(config, layers, calib)
    total_bytes = sum(la.weight_bytes for la in layers)
    out_cfg = Path(out_dir) / config.name
    hashing: Future[list[SourceTensor]] | None = None
    pool = ThreadPoolExecutor(max_workers=1, initializer=block_stop_signals)
    if not force and any(out_cfg.glob(f"{config.name}-*.h5")):
        # A bundle of this config exists: the fingerprint's inputs decide whether it can be reused.
        sources = source_tensors(ckpt, layers, jobs)
        reusable = _reusable(
            out_cfg,
            config,
            inputs_of(fingerprint_document(config, sources, stats_digest, name_prefix=name_prefix)),
            sources,
        )
        if reusable is not None:
            final, fp, quality = reusable
            seconds = time.perf_counter() - start
            return BuildResult(final, fp, len(layers), True, seconds, total_bytes, name_prefix, quality)
    else:
        # Nothing to reuse: hash the sources (seconds for GBs) while the layers are packed.
        hashing = pool.submit(source_tensors, ckpt, layers, 1)
    with output_errors(out_cfg):  # a read-only or forbidden folder is said as such, first
        out_cfg.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out_cfg)
    check_space(layers, config, out_cfg)
    stats_path = None if calib is None else str(calib)
    if scheduler and backend != "dask":
        raise ValueError("a scheduler address is for backend 'dask'")
    start_pool(backend, jobs)
    packs = run_jobs(ckpt, layers, config, stats_path, jobs, backend, scheduler)
    closing = False  # set once only the temp file's fsync and rename are left
    try:
        with h5file.atomic_file(out_cfg / f"{config.name}.h5") as out:
            with output_errors(out_cfg):
                f = h5file.create(out.tmp)
            try:
                choices, index, quality = _write_packs(f, packs, layers, out_cfg, progress)
                if hashing is not None:
                    sources = hashing.result()
                doc = fingerprint_document(config, sources, stats_digest, choices, name_prefix)
                with output_errors(out_cfg):
                    write_header(
                        f,
                        fingerprint_doc=doc,
                        config=config.to_dict(),
                        provenance=ckpt.provenance(),
                        tool_version=__version__,
                        created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                        index=index,
                    )
                    f.close()
            finally:
                with contextlib.suppress(Exception):  # already closed, or closing after a failure
                    f.close()
            with output_errors(out_cfg):
                seal(out.tmp)  # crc32 of every byte, checked before HDF5 parses the file
            fp = digest(doc)
            out.target = bundle_path(Path(out_dir), config, fp)
            closing = True
    except (OSError, RuntimeError) as exc:
        if closing:
            raise output_error(out_cfg, exc) from None
        raise
    finally:
        packs.close()  # stops the workers now (loky's, a local dask cluster), not when collected
        pool.shutdown(wait=False, cancel_futures=True)
    seconds = time.perf_counter() - start
    return BuildResult(out.target, fp, len(layers), False, seconds, total_bytes, name_prefix, quality)


__all__ = ["BuildResult", "BundleError", "OutputError", "build_bundle", "bundle_path", "pack_layer", "source_tensors"]
