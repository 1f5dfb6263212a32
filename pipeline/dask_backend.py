"""Builds on a dask.distributed cluster: a LocalCluster sized to the machine, or an existing
cluster by scheduler address. Workers open the checkpoint by path (the cluster needs a shared
filesystem where it has the same path); finished packs stream back to the one writer.

A worker that dies mid-build has its layers rescheduled on the others (dask retries a task
whose worker died, up to ``distributed.scheduler.allowed-failures`` times); when that is not
possible the build ends with one sentence and no bundle.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from duquant_runtime.bundle import LayerPack
from duquant_runtime.errors import DuQuantError

from . import process
from .checkpoint import CheckpointError
from .job import layer_job
from .recipe import Recipe
from .select import SelectedLayer


class ClusterError(DuQuantError):
    """The dask cluster cannot be reached, or lost the work."""


def _pack_on_worker(ckpt_path: str, layer: SelectedLayer, recipe: Recipe, stats_path: str | None) -> LayerPack:
    for path, what in ((ckpt_path, "checkpoint"), (stats_path, "statistics file")):
        if path is not None and not os.path.exists(path):
            raise CheckpointError(
                f"dask worker on {socket.gethostname()} cannot open the {what} {path}: the cluster's workers need "
                "a shared filesystem where it has the same path"
            )
    return layer_job(ckpt_path, layer, recipe, stats_path)


def _worker_setup():
    """A dask WorkerPlugin that runs ``process.init_worker`` once in each worker (made here:
    the plugin class needs distributed, an optional dependency)."""
    from distributed import WorkerPlugin

    class DuquantWorkerSetup(WorkerPlugin):
        name = "duquant-worker-setup"  # registered once per cluster, however many builds use it

        def setup(self, worker: object) -> None:
            process.init_worker()

    return DuquantWorkerSetup()


def _client(scheduler: str | None, jobs: int):
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise DuQuantError(
            "--backend dask needs dask.distributed: pip install 'duquant-packs[dask]' (or use the default loky backend)"
        ) from None
    if scheduler:
        try:
            return Client(scheduler, timeout=10), None
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the dask scheduler at {scheduler} ({exc}); start one (`dask scheduler`) or drop "
                "--scheduler to run a local cluster"
            ) from None
    cluster = LocalCluster(
        n_workers=jobs,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    return Client(cluster), cluster


def _connect(scheduler: str | None, jobs: int):
    """``_client`` in a helper thread. Python runs signal handlers in the main thread only, so a
    Ctrl-C or SIGTERM during the seconds a LocalCluster takes to start interrupts this wait, not
    the cluster's construction: the cluster is then finished and closed whole. (Interrupted
    half-way, it left a worker in Status.init that distributed's exit hook tripped over.)"""
    with ThreadPoolExecutor(1, thread_name_prefix="duquant-dask-start") as pool:
        starting = pool.submit(_client, scheduler, jobs)
        try:
            return starting.result()
        except KeyboardInterrupt:
            if starting.exception() is None:  # waits for the start-up to finish
                client, cluster = starting.result()
                client.close()
                if cluster is not None:
                    cluster.close()
            raise


def run_dask(
    ckpt_path: str,
    order: list[SelectedLayer],
    recipe: Recipe,
    stats_path: str | None,
    jobs: int,
    scheduler: str | None,
) -> Iterator[LayerPack]:
    """Yield packs as the cluster finishes them; the local cluster (if any) is closed after."""
    from distributed import KilledWorker, as_completed
    from distributed.client import FutureCancelledError

    client, cluster = _connect(scheduler, jobs)
    futures = []
    try:
        client.register_plugin(_worker_setup())
        # No explicit keys: dask makes them unique (pure=False), so two builds sharing a cluster
        # never share a task.
        futures = [client.submit(_pack_on_worker, ckpt_path, la, recipe, stats_path, pure=False) for la in order]
        for future in as_completed(futures):
            yield future.result()
    except KilledWorker as exc:
        raise ClusterError(
            f"dask workers died while packing ({exc}); no bundle was written — check the workers' memory "
            "(each holds one layer's float32 weight and temporaries) or rerun"
        ) from None
    except (FutureCancelledError, OSError, TimeoutError) as exc:
        raise ClusterError(
            f"the dask cluster lost the build ({type(exc).__name__}: {exc}); no bundle was written"
        ) from None
    finally:
        client.cancel(futures)
        client.close()
        if cluster is not None:
            cluster.close()
