"""Parallel build: checkpoint + config -> one fingerprinted HDF5 bundle, written atomically.

Workers (joblib, loky by default) open the checkpoint themselves, so no weight is
pickled to them; each returns a finished LayerPack (a quarter of the weight's bytes)
to the one writer in the parent as soon as it is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import errno
import functools
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from duquant_runtime import __version__
from duquant_runtime.bundle import (
    HDF5_LIBVER,
    LAYERS,
    USERBLOCK,
    BundleReader,
    LayerPack,
    seal,
    write_header,
    write_layer,
)
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.errors import BundleError, DuQuantError
from duquant_runtime.fingerprint import SHORT_LEN, SourceTensor, digest, fingerprint_document, inputs_of
from duquant_runtime.loader import signature_matches, weight_signature
from duquant_runtime.stats import LayerStats, StatsError, StatsReader

from .checkpoint import Checkpoint, CheckpointError
from .pack import pack_layer, readonly_tensor
from .select import SelectedLayer, select_layers, source_tensors
from .verify import reader_problems

# loky: processes (default); threading: one process; dask: a dask.distributed cluster.
# (joblib's "multiprocessing" backend cannot stream results as they finish.)
BACKENDS = ("loky", "threading", "sequential", "dask")
# Statistics may be captured on a model holding a rounded copy (bf16/fp16) of the
# checkpoint's weights; another checkpoint's weights differ far more than this.
STATS_RTOL = 1e-4


@dataclass(frozen=True)
class BuildResult:
    path: Path
    fingerprint: str
    layers: int
    skipped: bool
    seconds: float
    weight_bytes: int


class OutputError(DuQuantError):
    """The bundle cannot be written where it was asked for (full disk, read-only, no permission)."""


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_parent(path)).free


@contextlib.contextmanager
def _output_errors(path: Path) -> Iterator[None]:
    """Any failure to write the output becomes one sentence naming the path and the fix.

    h5py reports a full disk as OSError or, from its flush, as RuntimeError; both come here
    only from our own writes (packing errors are raised outside this block)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        code = getattr(exc, "errno", None)
        free = _free_bytes(path)
        if code == errno.EROFS:
            reason, fix = "the file system is read-only", "pass --out to a writable folder"
        elif code in (errno.EACCES, errno.EPERM):
            reason, fix = "permission denied", "pass --out to a folder you can write, or fix its permissions"
        elif code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (code is None and free < (64 << 20)):
            reason = f"the disk or quota is full ({free / 2**20:.0f} MB free there)"
            fix = "free some space, or pass --out on another disk"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fix = "check the folder and the disk"
        raise OutputError(f"cannot write the bundle in {path}: {reason}; {fix}. No bundle was written.") from None


def estimated_bundle_bytes(layers: list[SelectedLayer], config: DuQuantConfig) -> int:
    """An upper estimate of the bundle's size: codes, scales, bias, equalization, permutations
    and float32 rotation blocks per layer, plus HDF5 overhead."""
    block = config.transform.block_size
    total = 1 << 20
    for la in layers:
        codes = la.out_features * (la.in_features if la.bits > 4 else (la.in_features + 1) // 2)
        total += codes + 8 * la.out_features + 12 * la.in_features + 4 * la.in_features * block + 4096
    return total


def bundle_path(out_dir: Path, config: DuQuantConfig, fingerprint: str) -> Path:
    return out_dir / config.name / f"{config.name}-{fingerprint[:SHORT_LEN]}.h5"


@functools.lru_cache(maxsize=4)
def _cached_reader(stats_path: str, mtime_ns: int, size: int) -> StatsReader:
    return StatsReader(stats_path)


def _stats_reader(stats_path: str) -> StatsReader:
    """One reader (header and index parsed once) per worker process, not one per layer;
    keyed on the file's mtime and size, so a rewritten file is read again."""
    st = os.stat(stats_path)
    return _cached_reader(stats_path, st.st_mtime_ns, st.st_size)


def _layer_stats(stats_path: str, layer: SelectedLayer, signature: tuple[float, float], size: int) -> LayerStats:
    """The layer's statistics, refused when they were captured on other weights."""
    reader = _stats_reader(stats_path)
    meta = reader.meta.get(layer.name)
    if meta is None:
        raise StatsError(f"{stats_path} has no statistics for {layer.name}; capture them with the same config")
    if not signature_matches(*signature, meta["weight_sum"], meta["weight_sumsq"], size, STATS_RTOL):
        raise StatsError(
            f"{stats_path} was captured on another checkpoint: the weight of {layer.name} differs from the one "
            "the statistics were recorded with; capture statistics on this checkpoint's model"
        )
    return reader.layer(layer.name)


@functools.cache
def _keep_large_temporaries() -> None:
    """Ask glibc to keep freed large blocks in the heap (once per process).

    By default every temporary over ~32 MB is mmap'ed and unmapped on free, so each layer
    page-faults its float32 copies back in: on 2 cores that was 19 s of system time in a
    73 s full-model build (8 s and 63 s with this). Peak memory is unchanged: the same
    temporaries are reused instead of re-faulted. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)
    libc.mallopt(m_top_pad, 256 << 20)


def _pack_job(
    ckpt_path: str,
    layer: SelectedLayer,
    config: DuQuantConfig,
    stats_path: str | None = None,
    threads: int | None = None,
) -> LayerPack:
    """Runs in a worker: open the checkpoint here, so only names cross the process boundary.

    Worker BLAS threads are capped at one by ``inner_max_num_threads`` (loky sets the
    OMP/OpenBLAS variables before the worker imports numpy): 2 workers x 2 threads would
    oversubscribe 2 cores. Other multi-worker backends pass ``threads=1`` for torch.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    _keep_large_temporaries()
    ckpt = Checkpoint.open(ckpt_path)
    # The seed's svd reproduces its float64 numbers; the other methods work in float32,
    # which holds bf16/fp16/fp32 sources exactly.
    exact64 = config.transform.method == "svd" or layer.dtype == "F64"
    weight = ckpt.read(layer.weight, np.float64 if exact64 else np.float32)
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise CheckpointError(
            f"layer {layer.name} has {bad} NaN/Inf value(s) in {layer.weight}; fix the checkpoint or exclude the layer"
        )
    bias = ckpt.read(layer.bias) if layer.bias else None
    if bias is not None and not np.isfinite(bias).all():
        raise CheckpointError(f"layer {layer.name} has NaN/Inf value(s) in {layer.bias}")
    signature = weight_signature(readonly_tensor(weight))
    stats = None if stats_path is None else _layer_stats(stats_path, layer, signature, weight.size)
    return pack_layer(weight, bias, layer, ckpt.tensors[layer.weight].dtype, config, stats, signature)


def _run_jobs(
    ckpt: Checkpoint,
    layers: list[SelectedLayer],
    config: DuQuantConfig,
    stats_path: str | None,
    jobs: int,
    backend: str,
) -> Iterator[LayerPack]:
    """Yield packs as workers finish them (unordered), largest layers first for balance."""
    order = sorted(layers, key=lambda la: -la.out_features * la.in_features)
    if backend == "sequential" or jobs == 1:
        for layer in order:
            yield _pack_job(str(ckpt.path), layer, config, stats_path)
        return
    from joblib import Parallel, delayed, parallel_config

    if backend == "dask":
        try:
            import distributed  # noqa: F401  (registers joblib's dask backend)
        except ImportError:
            raise DuQuantError(
                "--backend dask needs dask.distributed: pip install 'duquant-packs[dask]' and start "
                "a dask.distributed Client (or use the default loky backend)"
            ) from None
    # Only loky accepts a per-worker thread cap; the others get torch pinned in the job.
    cap = {"inner_max_num_threads": 1} if backend == "loky" else {}
    threads = None if backend == "loky" else 1
    with parallel_config(backend=backend, n_jobs=jobs, **cap):
        if backend == "loky":
            _spawn_workers_deaf_to_ctrl_c(jobs)
        runner = Parallel(return_as="generator_unordered", pre_dispatch="2*n_jobs")
        yield from runner(delayed(_pack_job)(str(ckpt.path), layer, config, stats_path, threads) for layer in order)


def _worker_pid() -> int:
    return os.getpid()


def _spawn_workers_deaf_to_ctrl_c(jobs: int) -> None:
    """Start the pool's (reusable) workers with SIGINT ignored.

    A terminal's Ctrl-C signals the whole foreground process group; workers that got it
    would each die with a traceback. An ignored disposition survives exec, and Python
    keeps it at startup, so Ctrl-C reaches only this process, whose KeyboardInterrupt
    makes joblib terminate the workers and the build remove its temp file. (A blocked
    mask would not do: loky clears it when it spawns.) This process's own handler is
    restored as soon as the workers are forked.
    """
    from joblib import Parallel, delayed

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # loky forks and execs the workers synchronously while dispatching the first tasks,
        # so the parent ignores Ctrl-C only for those milliseconds, not while they import.
        pids = Parallel(n_jobs=jobs, return_as="generator")(delayed(_worker_pid)() for _ in range(jobs))
    finally:
        signal.signal(signal.SIGINT, previous)
    list(pids)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(directory: Path) -> None:
    """Temp files of builds that died (SIGKILL) are removed; a live build's are kept."""
    for tmp in directory.glob(".*.h5.*.tmp"):
        with contextlib.suppress(ValueError, OSError):
            if not _pid_alive(int(tmp.name.rsplit(".", 2)[-2])):
                tmp.unlink()


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
) -> tuple[Path, str] | None:
    """An existing bundle built from exactly these inputs (config, sources, statistics) that
    verifies, newest first; its per-layer choices follow from them."""
    for path in sorted(out_cfg.glob(f"{config.name}-*.h5"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            with BundleReader(path) as reader:  # one open: the seal is read once
                fp_doc = reader.header.fingerprint_doc
                if inputs_of(fp_doc) == inputs and not reader_problems(reader, config=config, sources=sources):
                    return path, reader.header.fingerprint
        except BundleError:
            continue
    return None


def build_bundle(
    config: DuQuantConfig,
    checkpoint: str | Path,
    out_dir: str | Path = "artifacts",
    *,
    jobs: int | None = None,
    backend: str = "loky",
    force: bool = False,
    progress: Callable[[int, int, int, int], None] | None = None,
    calib: str | Path | None = None,
) -> BuildResult:
    """Build (or reuse) the bundle of ``config`` for ``checkpoint``; returns where it is.

    ``calib`` is a statistics file from ``duquant_runtime.capture_stats``; its digest enters
    the fingerprint. ``progress(layers_done, layers_total, bytes_done, bytes_total)`` is
    called as layers finish.
    """
    start = time.perf_counter()
    jobs = jobs or os.cpu_count() or 1
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    ckpt = Checkpoint.open(checkpoint)
    layers = select_layers(config, ckpt)
    stats_digest = _check_calib(config, layers, calib)
    total_bytes = sum(la.weight_bytes for la in layers)
    out_cfg = Path(out_dir) / config.name
    hashing: Future[list[SourceTensor]] | None = None
    pool = ThreadPoolExecutor(max_workers=1)
    if not force and any(out_cfg.glob(f"{config.name}-*.h5")):
        # A bundle of this config exists: the fingerprint's inputs decide whether it can be reused.
        sources = source_tensors(ckpt, layers, jobs)
        reusable = _reusable(out_cfg, config, inputs_of(fingerprint_document(config, sources, stats_digest)), sources)
        if reusable is not None:
            final, fp = reusable
            return BuildResult(final, fp, len(layers), True, time.perf_counter() - start, total_bytes)
    else:
        # Nothing to reuse: hash the sources (seconds for GBs) while the layers are packed.
        hashing = pool.submit(source_tensors, ckpt, layers, 1)
    with _output_errors(out_cfg):  # a read-only or forbidden folder is said as such, first
        out_cfg.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(out_cfg)
    need, free = estimated_bundle_bytes(layers, config), _free_bytes(out_cfg)
    if free < need:
        raise OutputError(
            f"not enough space for the bundle in {out_cfg}: about {need / 2**20:.0f} MB needed, "
            f"{free / 2**20:.0f} MB free; free some space, or pass --out on another disk"
        )
    tmp = out_cfg / f".{config.name}.h5.{os.getpid()}.tmp"
    try:
        with _output_errors(out_cfg):
            f = h5py.File(tmp, "w", libver=HDF5_LIBVER, userblock_size=USERBLOCK)
        try:
            with _output_errors(out_cfg):
                f.require_group(LAYERS)
            done_bytes = 0
            by_name = {la.name: la for la in layers}
            stats_path = None if calib is None else str(calib)
            choices: dict[str, str] = {}
            shared: dict = {}
            for done_layers, pack in enumerate(_run_jobs(ckpt, layers, config, stats_path, jobs, backend), 1):
                with _output_errors(out_cfg):
                    write_layer(f, pack, shared)
                if pack.choice:
                    choices[pack.name] = pack.choice
                done_bytes += by_name[pack.name].weight_bytes
                if progress:
                    progress(done_layers, len(layers), done_bytes, total_bytes)
            if hashing is not None:
                sources = hashing.result()
            doc = fingerprint_document(config, sources, stats_digest, choices)
            fp = digest(doc)
            final = bundle_path(Path(out_dir), config, fp)
            with _output_errors(out_cfg):
                write_header(
                    f,
                    fingerprint_doc=doc,
                    config=config.to_dict(),
                    provenance=ckpt.provenance(),
                    tool_version=__version__,
                    created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                )
                f.close()
        finally:
            with contextlib.suppress(Exception):  # already closed, or closing after a failure
                f.close()
        with _output_errors(out_cfg):
            seal(tmp)  # crc32 of every byte, checked before HDF5 parses the file; fsyncs
            os.replace(tmp, final)  # atomic: readers see the old bundle or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return BuildResult(final, fp, len(layers), False, time.perf_counter() - start, total_bytes)


__all__ = ["BuildResult", "BundleError", "build_bundle", "bundle_path", "pack_layer", "source_tensors"]
