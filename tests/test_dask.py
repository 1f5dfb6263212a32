"""Builds on a real dask.distributed cluster (2 worker processes over loopback).

The bundle is the loky build's, array for array; a worker killed while it packs has its
layers retried and the bundle is the same — within a deadline, never a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from duquant_pipeline.build import build_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import resolve

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    import logging

    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as local,
        distributed.Client(local) as client,
    ):
        yield local, client


def assert_same_bundle(a, b) -> None:
    assert a.fingerprint == b.fingerprint
    with BundleReader(a.path) as ra, BundleReader(b.path) as rb:
        assert ra.header.layer_names == rb.header.layer_names
        for name in ra.header.layer_names:
            pa, pb = ra.read_layer(name), rb.read_layer(name)
            assert pa.stages == pb.stages and pa.choice == pb.choice
            for key, value in pa.arrays().items():
                np.testing.assert_array_equal(value, pb.arrays()[key])


def test_dask_cluster_builds_the_loky_bundle(demo_ckpt, cluster, tmp_path):
    local, _ = cluster
    config = resolve("llm_w4a8")
    loky = build_bundle(config, demo_ckpt, tmp_path / "loky", jobs=2)
    on_cluster = build_bundle(
        config, demo_ckpt, tmp_path / "dask", jobs=2, backend="dask", scheduler=local.scheduler_address
    )
    assert_same_bundle(loky, on_cluster)


def test_dask_without_address_starts_a_local_cluster(demo_ckpt, tmp_path):
    config = resolve("dit_w4a8")
    loky = build_bundle(config, demo_ckpt, tmp_path / "loky", jobs=2)
    local = build_bundle(config, demo_ckpt, tmp_path / "dask", jobs=2, backend="dask")
    assert_same_bundle(loky, local)


def test_a_worker_killed_while_packing_has_its_layers_retried(demo_ckpt, cluster, tmp_path):
    """The kill lands on a worker that holds layers in progress, so the build can only finish
    by running them again elsewhere: it must, with the loky bundle's fingerprint."""
    local, client = cluster
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "duquant_pipeline.cli", "build", "-c", "full_w4a8", "--ckpt", str(demo_ckpt)]
    cmd += ["--out", str(out), "--backend", "dask", "--scheduler", local.scheduler_address, "-q", "--no-env"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    busy: dict[str, tuple] = {}
    while time.time() < deadline and proc.poll() is None:
        busy = {worker: keys for worker, keys in client.processing().items() if keys}
        if busy and list((out / "full_w4a8").glob(".*.tmp")):
            break
        time.sleep(0.02)
    assert proc.poll() is None and busy, "no worker was packing before the build ended"
    victim = next(iter(busy))  # it holds layers in progress: finishing means they were retried
    os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the build hung after a worker was killed")
    assert proc.returncode == 0, stderr
    bundles = list((out / "full_w4a8").glob("*.h5"))
    assert not list((out / "full_w4a8").glob(".*.tmp"))
    assert len(bundles) == 1 and stdout.strip().splitlines()[-1] == str(bundles[0])
    assert victim not in client.scheduler_info()["workers"]  # the worker was lost, not merely idle
    reference = build_bundle(resolve("full_w4a8"), demo_ckpt, tmp_path / "ref", jobs=2)
    with BundleReader(bundles[0]) as r:
        assert r.header.fingerprint == reference.fingerprint


def test_a_worker_without_the_checkpoint_says_so(tmp_path):
    from duquant_pipeline.checkpoint import CheckpointError
    from duquant_pipeline.dask_backend import _pack_on_worker
    from duquant_pipeline.select import SelectedLayer

    layer = SelectedLayer("l", "l.weight", None, 4, 4, "F32", 4)
    missing = tmp_path / "elsewhere" / "model.safetensors"
    with pytest.raises(CheckpointError, match="need a shared filesystem where it has the same path"):
        _pack_on_worker(str(missing), layer, resolve("llm_w4a8"), None)
