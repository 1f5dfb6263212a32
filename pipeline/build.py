"""Build: checkpoint + config -> one fingerprinted HDF5 bundle, written atomically.

The orchestration only: select the layers, check the inputs, reuse a bundle built from the
same inputs, else run the packs (``workers``) and write them as they arrive (``output``,
``duquant_runtime.bundle``). The fingerprint is computed at the end, when every layer's
choice is known, and names the file.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from duquant_runtime import __version__
from duquant_runtime.bundle import BundleReader, BundleWriter, LayerPack
from duquant_runtime.bundle_records import EMBEDDING, LINEAR
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.errors import BundleError
from duquant_runtime.fingerprint import SourceTensor
from duquant_runtime.flowsteps import flow_times
from duquant_runtime.stats import StatsError, StatsReader

from .build_fingerprint import fingerprint_document, inputs_of
from .checkpoint import Checkpoint
from .output import OutputError, bundle_path, check_space, output_error, output_errors, remove_stale_temps
from .pack import pack_layer
from .process import block_stop_signals
from .recipe import statistics_needed
from .rotations import check
from .select import SelectedLayer, build_notes, select_layers, source_tensors
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
    notes: list[str] = field(default_factory=list)  # select.build_notes: e.g. no adaptive norms on pi0
    tables: tuple[str, ...] = ()  # the embedding tables among the layers (their quality is a table's)


# Below this many selected weights a pool's start-up (worker processes importing torch and
# loading the compiled kernels, ~2 s here) costs more than a second core saves: on 2 cores
# the in-process build was faster at 7 M, 30 M and 114 M weights and the pool at 2.7 G
# (docs/benchmarks.md, "Build and load speed"); the linear fit of those runs crosses at ~240 M.
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
    needs = statistics_needed(config)
    layers = [la for la in layers if la.kind == LINEAR]  # tables have no activations to capture
    for la in layers:  # patterns giving a layer two activation modes are refused now, not in a worker
        config.quant.mode_for(la.name)
    if calib is None:
        if needs:
            raise StatsError(
                f"config {config.name!r} sets {' and '.join(needs)}, which need calibration statistics: "
                f"pass --calib stats.h5, recorded on the float model with `with duquant_runtime.capture_stats(model, "
                f"{config.name!r}) as s: <run batches>; s.save('stats.h5')` (README, \"Calibration\"; on a demo "
                f"checkpoint `duquant-packs demo-stats -c {config.name} --ckpt <demo>` captures them)"
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
    stepped = [la.name for la in layers if config.quant.runs_per_step(la.name)]
    if stepped:
        _check_steps(config, reader, str(calib), stepped[0])
    return reader.digest


def _check_steps(config: DuQuantConfig, reader: StatsReader, calib: str, layer: str) -> None:
    """A per-step config's statistics were captured per step, at its flow times."""
    times = reader.meta[layer].get("flow_times")
    wanted = [round(t, 9) for t in flow_times(config.quant.flow_steps)]
    if times is None or [round(float(t), 9) for t in times] != wanted:
        got = "no denoising steps" if times is None else f"{len(times)} denoising steps"
        raise StatsError(
            f"config {config.name!r} sets quant.act_mode = 'per_step_static' with {config.quant.flow_steps} steps, "
            f"but {calib} holds {got}: capture them again with this config, on an instrumented model "
            "(duquant_runtime.instrument)"
        )


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
    writer: BundleWriter,
    packs: Iterator[LayerPack],
    layers: list[SelectedLayer],
    out_cfg: Path,
    progress: Progress | None,
) -> tuple[dict[str, str], dict[str, dict[str, float]]]:
    """Write packs as they arrive; returns each layer's choice (for the fingerprint) and its
    quality figures (for the build's summary)."""
    by_name = {la.name: la for la in layers}
    total_bytes = sum(la.weight_bytes for la in layers)
    choices: dict[str, str] = {}
    quality: dict[str, dict[str, float]] = {}
    done_bytes = 0
    for done_layers, pack in enumerate(packs, 1):
        with output_errors(out_cfg):  # only our own writes: a packing error is not an output error
            writer.add(pack)
        if pack.choice:
            choices[pack.name] = pack.choice
        quality[pack.name] = dict(pack.quality or {})
        done_bytes += by_name[pack.name].weight_bytes
        if progress:
            progress(done_layers, len(layers), done_bytes, total_bytes)
    return choices, quality


@dataclass
class _Plan:
    """What a build that writes knows before its first pack: the inputs and where it writes."""

    config: DuQuantConfig
    ckpt: Checkpoint
    layers: list[SelectedLayer]
    out_dir: Path
    stats_digest: str | None
    sources: Callable[[], list[SourceTensor]]  # the sources' digests, when they are needed

    @property
    def out_cfg(self) -> Path:
        return self.out_dir / self.config.name


def _reuse(plan: _Plan, start: float) -> BuildResult | None:
    """The result of an existing bundle built from exactly these inputs, or None."""
    sources = plan.sources()
    doc = fingerprint_document(plan.config, sources, plan.stats_digest, name_prefix=plan.layers[0].prefix)
    reusable = _reusable(plan.out_cfg, plan.config, inputs_of(doc), sources)
    if reusable is None:
        return None
    final, fp, quality = reusable
    total_bytes = sum(la.weight_bytes for la in plan.layers)
    seconds = time.perf_counter() - start
    notes = build_notes(plan.config, plan.ckpt, plan.layers)
    tables = _tables(plan.layers)
    prefix = plan.layers[0].prefix
    return BuildResult(final, fp, len(plan.layers), True, seconds, total_bytes, prefix, quality, notes, tables)


def _write_bundle(plan: _Plan, packs: Iterator[LayerPack], progress: Progress | None) -> tuple[Path, str, dict]:
    """Write the packs and the header into a sealed bundle named by its fingerprint; returns
    its path, fingerprint and the layers' quality figures."""
    out_cfg, config = plan.out_cfg, plan.config
    closing = False  # set once only the temp file's fsync and rename are left
    try:
        with output_errors(out_cfg):
            writer = BundleWriter(out_cfg / f"{config.name}.h5")
        with writer:
            choices, quality = _write_packs(writer, packs, plan.layers, out_cfg, progress)
            doc = fingerprint_document(config, plan.sources(), plan.stats_digest, choices, plan.layers[0].prefix)
            with output_errors(out_cfg):
                fp = writer.finish(
                    fingerprint_doc=doc,
                    config=config.to_dict(),
                    provenance=plan.ckpt.provenance(),
                    tool_version=__version__,
                    created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                )  # the seal: crc32 of every byte, checked before HDF5 parses the file
            writer.target = bundle_path(plan.out_dir, config, fp)
            closing = True
    except (OSError, RuntimeError) as exc:
        if closing:
            raise output_error(out_cfg, exc) from None
        raise
    return writer.target, fp, quality


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
    jobs = jobs or default_jobs(layers, backend)
    stats_digest = _check_calib(config, layers, calib)
    pool = ThreadPoolExecutor(max_workers=1, initializer=block_stop_signals)
    out_cfg = Path(out_dir) / config.name
    if not force and any(out_cfg.glob(f"{config.name}-*.h5")):
        # A bundle of this config exists: the fingerprint's inputs decide whether it can be reused.
        sources = source_tensors(ckpt, layers, jobs)
        plan = _Plan(config, ckpt, layers, Path(out_dir), stats_digest, lambda: sources)
        reused = _reuse(plan, start)
        if reused is not None:
            return reused
    else:
        # Nothing to reuse: hash the sources (seconds for GBs) while the layers are packed.
        hashing: Future[list[SourceTensor]] = pool.submit(source_tensors, ckpt, layers, 1)
        plan = _Plan(config, ckpt, layers, Path(out_dir), stats_digest, hashing.result)
    _prepare_output(plan)
    if scheduler and backend != "dask":
        raise ValueError("a scheduler address is for backend 'dask'")
    start_pool(backend, jobs)
    packs = run_jobs(ckpt, layers, config, None if calib is None else str(calib), jobs, backend, scheduler)
    try:
        path, fp, quality = _write_bundle(plan, packs, progress)
    finally:
        packs.close()  # stops the workers now (loky's, a local dask cluster), not when collected
        pool.shutdown(wait=False, cancel_futures=True)
    seconds, total_bytes = time.perf_counter() - start, sum(la.weight_bytes for la in layers)
    notes, tables = build_notes(config, ckpt, layers), _tables(layers)
    return BuildResult(path, fp, len(layers), False, seconds, total_bytes, layers[0].prefix, quality, notes, tables)


def _tables(layers: list[SelectedLayer]) -> tuple[str, ...]:
    return tuple(la.name for la in layers if la.kind == EMBEDDING)


def _prepare_output(plan: _Plan) -> None:
    """The output folder made, stale temp files of dead builds removed, the space checked."""
    with output_errors(plan.out_cfg):  # a read-only or forbidden folder is said as such, first
        plan.out_cfg.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(plan.out_cfg)
    check_space(plan.layers, plan.config, plan.out_cfg)


__all__ = ["BuildResult", "BundleError", "OutputError", "build_bundle", "bundle_path", "pack_layer", "source_tensors"]
