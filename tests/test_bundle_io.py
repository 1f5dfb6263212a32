"""Reading a bundle fast without trusting less: the seal checked in pieces on several threads,
the sealed bytes kept and cut into layers by the index, and the older paths still read."""

from __future__ import annotations

import json
import re
import shutil
import zlib

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight, write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_pipeline.cli import main
from duquant_runtime import crc, h5file, load_bundle
from duquant_runtime.bundle import INDEX, SEAL_MAGIC, BundleReader, seal
from duquant_runtime.config import from_dict
from duquant_runtime.errors import BundleReadError
from fuzz_reader import linear_tree
from torch import nn


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle with shared rotations (two layers of one width), a bias, and odd widths."""
    d = tmp_path_factory.mktemp("io")
    rng = np.random.default_rng(5)
    tensors = {
        "net.a.q_proj.weight": outlier_weight(rng, 48, 64),
        "net.a.k_proj.weight": outlier_weight(rng, 40, 64),
        "net.a.k_proj.bias": rng.standard_normal(40),
        "net.b.fc1.weight": outlier_weight(rng, 23, 37),
    }
    ckpt = write_checkpoint(d / "model.safetensors", tensors, torch.bfloat16)
    cfg = from_dict({"name": "io", "select": {"scope": "net."}, "transform": {"block_size": 16}})
    return build_bundle(cfg, ckpt, d, jobs=1).path, tensors


def model_of(tensors: dict[str, np.ndarray]) -> nn.Module:
    """A bf16 model holding the checkpoint's weights and biases."""
    layers = {
        k[: -len(".weight")]: [*w.shape, f"{k[: -len('.weight')]}.bias" in tensors]
        for k, w in tensors.items()
        if k.endswith(".weight")
    }
    model = linear_tree(layers, torch.bfloat16)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()})
    return model


def test_crc32_combine_and_the_threaded_seal_match_zlib(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
        assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    path = tmp_path / "blob"
    data = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    monkeypatch.setattr(h5file, "SEAL_PIECE_MIN", 1000)  # as many pieces as threads allow
    monkeypatch.setattr(h5file, "SEAL_CHUNK", 777)  # and chunks that do not divide them
    monkeypatch.setattr(h5file.os, "cpu_count", lambda: 7)
    kept = np.zeros(len(data), dtype=np.uint8)
    assert h5file._file_crc(path, 512, len(data), kept) == zlib.crc32(data[512:])
    assert kept[512:].tobytes() == data[512:]


def test_a_sealed_bundle_is_read_once_and_cut_by_its_index(built, monkeypatch):
    """The in-memory read makes no HDF5 call per layer or dataset, gives the same arrays as
    reading each dataset through HDF5, keeps codes as views of the checked bytes and copies
    the small arrays out (so they alone cannot keep the file's bytes alive)."""
    path, _ = built
    with BundleReader(path, in_memory=False) as slow:
        want = {n: slow.read_layer(n) for n in slow.header.layer_names}
    with BundleReader(path) as reader:
        assert reader.sealed and reader.indexed

        def no_hdf5(*args, **kwargs):
            raise AssertionError("an HDF5 read during an indexed load")

        monkeypatch.setattr(h5py.Dataset, "__getitem__", no_hdf5)
        monkeypatch.setattr(BundleReader, "_group", no_hdf5)
        got = {n: reader.read_layer(n) for n in reader.header.layer_names}
        monkeypatch.undo()
        for name, pack in got.items():
            arrays, expected = pack.arrays(), want[name].arrays()
            assert arrays.keys() == expected.keys()
            for key, array in arrays.items():
                assert array.dtype == expected[key].dtype and np.array_equal(array, expected[key]), (name, key)
                assert np.shares_memory(array, reader._bytes) == (key == "qweight"), (name, key)
        rotations = [p.array("r_in") for p in got.values() if p.in_features == 64 and p.array("r_in") is not None]
        assert len(rotations) == 2 and rotations[0] is rotations[1]  # stored once, read once


def rewrite(src, dest, edit) -> None:
    """A copy of a bundle edited through h5py and sealed again (a well-formed file whose
    contents disagree: what only a writer bug or a deliberate edit could make)."""
    shutil.copy(src, dest)
    with h5py.File(dest, "r+") as f:
        edit(f)
    seal(dest)


def test_an_index_that_disagrees_is_reported_by_verify_and_bounded_on_load(built, tmp_path):
    path, tensors = built

    def swap_offsets(f: h5py.File) -> None:
        doc = json.loads(f.attrs[INDEX])
        a, b = doc["layers"]["net.a.q_proj"]["datasets"], doc["layers"]["net.a.k_proj"]["datasets"]
        a["w_scale"][0], b["w_scale"][0] = b["w_scale"][0], a["w_scale"][0]
        f.attrs[INDEX] = json.dumps(doc)

    swapped = tmp_path / "swapped.h5"
    rewrite(path, swapped, swap_offsets)
    r = CliRunner().invoke(main, ["verify", str(swapped)])
    assert r.exit_code == 1
    assert "layer net.a.k_proj: the bundle's index disagrees with the layer's datasets" in r.stderr

    def past_the_end(f: h5py.File) -> None:
        doc = json.loads(f.attrs[INDEX])
        doc["layers"]["net.b.fc1"]["datasets"]["qweight"][0] = 1 << 40
        f.attrs[INDEX] = json.dumps(doc)

    outside = tmp_path / "outside.h5"
    rewrite(path, outside, past_the_end)
    model = model_of(tensors)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BundleReadError, match=re.escape("layer 'net.b.fc1' dataset 'qweight' points outside the file")):
        load_bundle(model, outside)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_bundles_without_an_index_still_read_from_memory(built, tmp_path):
    """0.4 bundles carry no index: each layer's group is walked, and the data still comes from
    the checked bytes, by each dataset's own offset."""
    path, tensors = built
    old = tmp_path / "no-index.h5"
    rewrite(path, old, lambda f: f.attrs.__delitem__(INDEX))
    with BundleReader(old) as reader, BundleReader(path) as indexed:
        assert reader.sealed and not reader.indexed
        for name in reader.header.layer_names:
            a, b = reader.read_layer(name).arrays(), indexed.read_layer(name).arrays()
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
            assert np.shares_memory(a["qweight"], reader._bytes)
    report = load_bundle(model_of(tensors), old)
    assert len(report.replaced) == 3


def test_read_sealed_refuses_appended_and_missing_bytes(built, tmp_path):
    path, _ = built
    data = path.read_bytes()
    longer, shorter = tmp_path / "longer.h5", tmp_path / "shorter.h5"
    longer.write_bytes(data + b"\0" * 10)
    shorter.write_bytes(data[:-10])
    with pytest.raises(h5file.SealError, match="bytes were appended to it"):
        h5file.read_sealed(longer, SEAL_MAGIC)
    with pytest.raises(h5file.SealError, match="it is truncated"):
        h5file.read_sealed(shorter, SEAL_MAGIC)
    assert h5file.read_sealed(path, SEAL_MAGIC).tobytes() == data
