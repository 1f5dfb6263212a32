"""The pool: run the pack jobs (``job.py``) on workers and stream their results.

Workers (joblib, loky by default) open the checkpoint themselves, so no weight is pickled
to them; each returns a finished LayerPack (a quarter of the weight's bytes) to the one
writer in the parent as soon as it is done. A pack job is a function of its inputs; the
process settings a pool's workers run with are made once per worker by ``process.init_worker``
(loky's initializer), and the threading backend's one-thread cap is restored when it is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import nullcontext

from duquant_runtime.bundle import LayerPack
from duquant_runtime.config import DuQuantConfig

from . import process
from .checkpoint import Checkpoint
from .dask_backend import run_dask
from .job import layer_job
from .recipe import resolve
from .select import SelectedLayer

# loky: processes (default); threading: one process; dask: a dask.distributed cluster (dask_backend.py).
# (joblib's "multiprocessing" backend cannot stream results as they finish.)
BACKENDS = ("loky", "threading", "sequential", "dask")


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
    recipe = resolve(config, calibrated=stats_path is not None)
    if backend == "dask":
        yield from run_dask(str(ckpt.path), order, recipe, stats_path, jobs, scheduler)
        return
    if backend == "sequential" or jobs == 1:
        for layer in order:
            yield layer_job(str(ckpt.path), layer, recipe, stats_path)
            process.return_freed_memory()
        return
    from joblib import Parallel, delayed, parallel_config

    # loky caps each worker's BLAS threads itself; the threading backend runs in this process,
    # whose torch threads are capped for the pool's life only; dask workers cap their own.
    in_process = backend == "threading"
    settings = {} if in_process else LOKY_SETTINGS
    with (
        parallel_config(backend=backend, n_jobs=jobs, **settings),
        process.torch_threads(1) if in_process else nullcontext(),
    ):
        runner = Parallel(return_as="generator_unordered", pre_dispatch="2*n_jobs")
        yield from runner(delayed(layer_job)(str(ckpt.path), la, recipe, stats_path) for la in order)


# loky caps each worker's BLAS threads itself, and runs process.init_worker once per worker.
LOKY_SETTINGS = {"inner_max_num_threads": 1, "initializer": process.init_worker}


def start_pool(backend: str, jobs: int) -> None:
    """Start loky's reusable workers now, before the build writes anything: the short window
    in which this process ignores Ctrl-C then never overlaps the writing of a bundle (``run_jobs``
    finds the same pool, started with the same settings, and reuses it)."""
    if backend != "loky" or jobs == 1:
        return
    from joblib import Parallel, delayed, parallel_config

    # loky forks and execs the workers synchronously while dispatching the first tasks,
    # so the deaf window lasts those milliseconds, not while they import.
    with parallel_config(backend="loky", n_jobs=jobs, **LOKY_SETTINGS):
        with process.deaf_to_ctrl_c():
            pids = Parallel(n_jobs=jobs, return_as="generator")(delayed(_worker_pid)() for _ in range(jobs))
        list(pids)


def _worker_pid() -> int:
    return os.getpid()
