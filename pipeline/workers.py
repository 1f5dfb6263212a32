"""Worker-side work and process setup: pack one layer in a worker, run the pool, stream results.

Workers (joblib, loky by default) open the checkpoint themselves, so no weight is pickled
to them; each returns a finished LayerPack (a quarter of the weight's bytes) to the one
writer in the parent as soon as it is done. Nothing here leaves the calling process changed:
the threading backend's one-thread cap is restored when the pool is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import nullcontext

import numpy as np
import torch
from duquant_runtime.bundle import LayerPack
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.signature import bits_digest, signature_matches, weight_signature
from duquant_runtime.stats import LayerStats, StatsError, StatsReader

from .checkpoint import Checkpoint, CheckpointError
from .methods import handler
from .pack import pack_layer, readonly_tensor
from .select import SelectedLayer

# loky: processes (default); threading: one process; dask: a dask.distributed cluster (dask_backend.py).
# (joblib's "multiprocessing" backend cannot stream results as they finish.)
BACKENDS = ("loky", "threading", "sequential", "dask")
# Statistics may be captured on a model holding a rounded copy (bf16/fp16) of the
# checkpoint's weights; another checkpoint's weights differ far more than this.
STATS_RTOL = 1e-4
TRIM_ABOVE_BYTES = 2 << 30  # in-process builds return freed memory above this resident size


@functools.lru_cache(maxsize=4)
def _cached_reader(stats_path: str, mtime_ns: int, size: int) -> StatsReader:
    # The build checked the whole file's seal once; a worker checks only its layers' datasets.
    return StatsReader(stats_path, whole_file=False)


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


@functools.lru_cache(maxsize=4)
def _cached_checkpoint(ckpt_path: str, mtime_ns: int, size: int) -> Checkpoint:
    return Checkpoint.open(ckpt_path)


def _checkpoint(ckpt_path: str) -> Checkpoint:
    """One parsed checkpoint (its header: ~2 ms for pi0.5's 800 tensors) per process, not one
    per layer; keyed on the path's mtime and size, so a rewritten checkpoint is read again."""
    try:
        st = os.stat(ckpt_path)
    except OSError:
        return Checkpoint.open(ckpt_path)  # says what is wrong with the path
    return _cached_checkpoint(ckpt_path, st.st_mtime_ns, st.st_size)


@functools.cache
def keep_large_temporaries() -> None:
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


def _return_freed_memory() -> None:
    """Give memory freed by finished layers back to the system once this process holds more
    than TRIM_ABOVE_BYTES: glibc keeps it in per-thread arenas, and an in-process full-size
    build grew to 4.5 GB of anonymous memory, 1.1 GB when trimmed after every layer. Below
    the bound nothing is trimmed, since re-faulting freed temporaries costs time (58.6 s ->
    74.3 s for that build with a trim per layer)."""
    try:
        with open("/proc/self/statm") as fh:
            resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if resident > TRIM_ABOVE_BYTES:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, ValueError, AttributeError, IndexError):
        return  # not Linux/glibc: nothing to do


@functools.cache
def _no_loky_leak_restarts() -> None:
    """Stop loky from replacing this worker as "leaking" (once per process).

    With psutil installed, loky restarts a worker whose RSS grew 300 MB past its size after
    its first task; the heap that ``keep_large_temporaries`` keeps on purpose always does,
    so every large layer cost a worker restart (imports, compiled kernels): 47 s -> 73 s for
    the full-size build. The limit is a module global that the worker reads after each task.
    """
    try:
        from joblib.externals.loky import process_executor
    except ImportError:
        return
    process_executor._MAX_MEMORY_LEAK_SIZE = 1 << 62


def pack_job(
    ckpt_path: str,
    layer: SelectedLayer,
    config: DuQuantConfig,
    stats_path: str | None = None,
    worker: bool = False,
) -> LayerPack:
    """Runs in a worker: open the checkpoint here, so only names cross the process boundary.

    ``worker``: this is a pool process of our own (loky, dask), so it may be tuned: one torch
    thread (2 workers x 2 threads would oversubscribe 2 cores; loky also caps BLAS through
    ``inner_max_num_threads``) and large temporaries kept. In-process jobs change nothing.
    """
    if worker:
        torch.set_num_threads(1)
        keep_large_temporaries()
        _no_loky_leak_restarts()
    ckpt = _checkpoint(ckpt_path)
    # A float64 method (the seed's svd reproduces its float64 numbers) reads float64; the
    # others float32, which holds bf16/fp16/fp32 sources exactly.
    exact64 = handler(config.transform.method).dtype == torch.float64 or layer.dtype == "F64"
    raw = ckpt.raw(layer.weight)  # selection keeps floating tensors only
    weight = raw.to(torch.float64 if exact64 else torch.float32).numpy()
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
    dtype = ckpt.tensors[layer.weight].dtype
    return pack_layer(weight, bias, layer, dtype, config, stats, signature, source_bits=bits_digest(raw))


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Cap this process's torch threads for the block, then put the caller's setting back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_jobs(
    ckpt: Checkpoint,
    layers: list[SelectedLayer],
    config: DuQuantConfig,
    stats_path: str | None,
    jobs: int,
    backend: str,
    scheduler: str | None = None,
) -> Iterator[LayerPack]:
    """Yield packs as workers finish them (unordered), largest layers first for balance.
    ``scheduler``: a dask scheduler address (backend "dask"; none: a local cluster). Call
    ``start_pool`` first: the loky workers it starts ignore Ctrl-C, and are reused here."""
    order = sorted(layers, key=lambda la: -la.out_features * la.in_features)
    if backend == "dask":
        from .dask_backend import run_dask

        yield from run_dask(str(ckpt.path), order, config, stats_path, jobs, scheduler)
        return
    if backend == "sequential" or jobs == 1:
        for layer in order:
            yield pack_job(str(ckpt.path), layer, config, stats_path)
            _return_freed_memory()
        return
    from joblib import Parallel, delayed, parallel_config

    # loky caps each worker's BLAS threads itself; the threading backend runs in this process,
    # whose torch threads are capped for the pool's life only; dask workers cap their own.
    cap = {"inner_max_num_threads": 1} if backend == "loky" else {}
    in_process = backend == "threading"
    with parallel_config(backend=backend, n_jobs=jobs, **cap), _torch_threads(1) if in_process else nullcontext():
        runner = Parallel(return_as="generator_unordered", pre_dispatch="2*n_jobs")
        jobs_ = (delayed(pack_job)(str(ckpt.path), la, config, stats_path, not in_process) for la in order)
        yield from runner(jobs_)


def start_pool(backend: str, jobs: int) -> None:
    """Start loky's reusable workers now, before the build writes anything: the short window
    in which this process ignores Ctrl-C then never overlaps the writing of a bundle (``run_jobs``
    finds the same pool and reuses it)."""
    if backend != "loky" or jobs == 1:
        return
    from joblib import parallel_config

    with parallel_config(backend="loky", n_jobs=jobs, inner_max_num_threads=1):
        _spawn_workers_deaf_to_ctrl_c(jobs)


def _worker_pid() -> int:
    return os.getpid()


def block_ctrl_c() -> None:
    """Keep SIGINT away from the calling thread (a helper thread's initializer): the kernel
    then delivers a Ctrl-C to the main thread, the one Python handles it in."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _spawn_workers_deaf_to_ctrl_c(jobs: int) -> None:
    """Start the pool's (reusable) workers with SIGINT ignored.

    A terminal's Ctrl-C signals the whole foreground process group; workers that got it
    would each die with a traceback. An ignored disposition survives exec, and Python
    keeps it at startup, so Ctrl-C reaches only this process, whose KeyboardInterrupt
    makes joblib terminate the workers and the build remove its temp file. (A blocked
    mask alone would not do: loky clears it when it spawns.)

    While the workers are forked this thread both blocks and ignores SIGINT: on Linux a
    blocked signal stays pending even when ignored, so a Ctrl-C pressed in that window is
    delivered as soon as the handler is restored and the mask lifted — never lost.
    Helper threads block SIGINT (``block_ctrl_c``), so it cannot land on one of them.
    """
    from joblib import Parallel, delayed

    if threading.current_thread() is not threading.main_thread():
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # loky forks and execs the workers synchronously while dispatching the first tasks,
        # so the window lasts those milliseconds, not while they import.
        pids = Parallel(n_jobs=jobs, return_as="generator")(delayed(_worker_pid)() for _ in range(jobs))
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    list(pids)
