"""Every shipped method's stages, through the runtime, against the slow loop references.

The runtime applies a layer's stages in the order the bundle lists them; ``.weight`` walks
them backwards. Both are checked here against ``reference.py`` (plain loops, no shared code)
for svd, hadamard and duquant, with and without equalization. Bundles written by hand as 0.1
and 0.2.0 wrote them (no stage list) are refused with the command that rebuilds them.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import outlier_weight
from duquant_pipeline.pack import pack_layer
from duquant_pipeline.select import SelectedLayer
from duquant_runtime import DuQuantLinear, h5file, load_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.errors import BundleVersionError
from reference import (
    blocks_from_stacked,
    reference_equalization,
    reference_hadamard,
    reference_stages,
    unpack_int4,
)
from torch import nn

ONE = {"equalize": (), "rtn_candidate": False}
METHODS = {
    "svd": {"method": "svd", "block_size": 16, "permute": True, "row_rot": "restore", **ONE},
    "svd_no_rows": {"method": "svd", "block_size": 16, "permute": True, "row_rot": "0", **ONE},
    "hadamard": {"method": "hadamard", "block_size": 16, **ONE},
    "hadamard_zigzag": {"method": "hadamard", "block_size": 16, "permute": True, **ONE},
    "duquant": {"method": "duquant", "block_size": 16, "permute": True, "max_rotation_step": 4, **ONE},
    "default_choice": {"block_size": 16},  # six candidates, the chosen one stored
}


def pack_of(w: np.ndarray, **transform):
    cfg = DuQuantConfig(name="x", transform=TransformConfig(**transform))
    return pack_layer(w.astype(np.float32), None, SelectedLayer("l", "l.weight", None, *w.shape, "F32", 4), "F32", cfg)


def reference_plan(pack, keys) -> list[tuple[str, object]]:
    plan = []
    for spec in keys:
        value = pack.array(spec.key)
        width = pack.out_features if spec in pack.out_stages else pack.in_features
        if spec.kind.name == "tiled_rotate":  # one block repeated over the width
            value = [value.astype(np.float64)] * (width // value.shape[0])
        elif spec.kind.name == "rotate":
            value = blocks_from_stacked(value, width)
        plan.append((spec.kind.name, value))
    return plan


def dequantized(pack) -> np.ndarray:
    return unpack_int4(pack.qweight, pack.in_features) * pack.w_scale.astype(np.float64)[:, None]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("shape", [(40, 48), (24, 37)])
def test_forward_and_weight_follow_the_stages_in_order(method, shape):
    rng = np.random.default_rng(11)
    w = outlier_weight(rng, *shape)
    pack = pack_of(w, **METHODS[method])
    layer = DuQuantLinear.from_pack(pack, act_bits=0, act_mode="per_token_dynamic", dtype=torch.float64)
    x = rng.standard_normal((9, shape[1]))
    x_t = reference_stages(x, reference_plan(pack, pack.stages))
    y = reference_stages(x_t @ dequantized(pack).T, reference_plan(pack, pack.out_stages))
    with torch.no_grad():
        got = layer(torch.from_numpy(x)).numpy()
        eff = layer.weight.materialize().numpy()
    np.testing.assert_allclose(got, y, rtol=1e-9, atol=1e-9)
    # W_eff = Rᵀ·W_t·Tᵀ with T, R the input and output stages applied to the identity
    t = reference_stages(np.eye(shape[1]), reference_plan(pack, pack.stages))
    r_out = reference_stages(np.eye(shape[0]), reference_plan(pack, pack.out_stages))
    np.testing.assert_allclose(eff, r_out.T @ (dequantized(pack) @ t.T), rtol=1e-9, atol=1e-9)
    # The codes are W's own round-to-nearest in the stages' frame: undo R and T on W
    # (inverting the stored stage matrices), divide by the row scales, round and clamp.
    # Only near-ties may round the other way (float32-stored stages).
    w_frame = np.linalg.inv(r_out.T) @ w.astype(np.float64) @ np.linalg.inv(t.T)
    ratio = w_frame / pack.w_scale.astype(np.float64)[:, None]
    codes = unpack_int4(pack.qweight, pack.in_features)
    expected = np.clip(np.rint(ratio), -8, 7)
    near_tie = np.abs(ratio - np.floor(ratio) - 0.5) < 1e-3
    assert np.all((codes == expected) | near_tie), np.argwhere((codes != expected) & ~near_tie)[:5]
    assert near_tie.mean() < 0.01


def test_hadamard_stage_is_the_sylvester_matrix():
    rng = np.random.default_rng(2)
    w = outlier_weight(rng, 20, 64)
    pack = pack_of(w, **METHODS["hadamard"])
    # without signs one block tiles the width: the method declares it, stored once
    assert [(s.kind.name, s.key) for s in pack.stages] == [("tiled_rotate", "r_in")]
    np.testing.assert_allclose(pack.array("r_in"), reference_hadamard(16), atol=1e-7)


def test_a_hadamard_with_signs_or_a_short_tail_stores_every_block():
    rng = np.random.default_rng(3)
    for width, signs in ((64, True), (72, False)):
        pack = pack_of(outlier_weight(rng, 20, width), **{**METHODS["hadamard"], "hadamard_signs": signs})
        assert [(s.kind.name, s.key) for s in pack.stages] == [("rotate", "r_in")]
        assert pack.array("r_in").shape == (-(-width // 16), 16, 16)


def test_duquant_has_two_rotations_around_a_permutation():
    rng = np.random.default_rng(4)
    pack = pack_of(outlier_weight(rng, 32, 48), **METHODS["duquant"])
    assert [(s.kind.name, s.key) for s in pack.stages] == [("rotate", "r_in"), ("perm", "perm2"), ("rotate", "r_in2")]
    for key in ("r_in", "r_in2"):
        for u in blocks_from_stacked(pack.array(key), 48):
            np.testing.assert_allclose(u @ u.T, np.eye(u.shape[0]), atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_equalization_stage_is_the_reference_factor(beta):
    rng = np.random.default_rng(6)
    w = outlier_weight(rng, 30, 40)
    pack = pack_of(w, method="hadamard", block_size=8, equalize=(beta,), rtn_candidate=False)
    assert pack.stages[0].kind.name == "scale" and pack.choice == f"hadamard+eq{beta:g}"
    np.testing.assert_allclose(
        pack.array("in_scale"), 1.0 / reference_equalization(w.astype(np.float32), beta), rtol=1e-5
    )


def write_format1(path, pack, config: DuQuantConfig, version: int = 1) -> None:
    """A bundle as duquant-packs 0.1 wrote it: no seal, format_version 1, perm / r_in / r_out
    datasets without a stage list, block sizes in the metadata, every dataset checksummed
    (``version=2``: as 0.2.0 wrote it, the same sealed)."""
    import zlib

    arrays = {k: pack.array(k) for k in ("perm", "r_in", "r_out")}
    arrays.update(qweight=pack.qweight, w_scale=pack.w_scale)
    doc = {"format_version": 1, "algorithm": {"method": "svd", "version": 1}, "calib": None}
    doc["config"] = config.fingerprint_fields()
    doc["source"] = [["l.weight", "F32", [pack.out_features, pack.in_features], "0" * 64]]
    from duquant_runtime.fingerprint import canonical_json, digest

    with h5file.create(path) if version > 1 else h5py.File(path, "w") as f:
        f.attrs.update(
            format="duquant-packs-bundle",
            format_version=version,
            fingerprint=digest(doc),
            fingerprint_json=canonical_json(doc),
            config_json=json.dumps(config.to_dict()),
            provenance_json="{}",
            tool_version="0.1.0",
            created_at="2026-01-01T00:00:00+00:00",
        )
        g = f.create_group("layers/l")
        meta = {
            "in_features": pack.in_features,
            "out_features": pack.out_features,
            "weight_bits": 4,
            "block_size": 16,
            "block_out_size": 16,
            "storage": pack.storage,
            "source_dtype": "F32",
            "source_sum": pack.source_sum,
            "source_sumsq": pack.source_sumsq,
            "crc32": {k: zlib.crc32(np.ascontiguousarray(a).tobytes()) for k, a in arrays.items()},
        }
        g.attrs["meta"] = json.dumps(meta)
        for key, array in arrays.items():
            g.create_dataset(key, data=array)
    if version > 1:
        h5file.seal(path, h5file.BUNDLE_MAGIC)


REBUILD = "rebuild it with `duquant-packs build -c <config> --ckpt <checkpoint>`"


def _old_bundle(tmp_path, version: int):
    rng = np.random.default_rng(8)
    w = outlier_weight(rng, 24, 40).astype(np.float32)
    config = DuQuantConfig(name="old", transform=TransformConfig(**METHODS["svd"]))
    path = tmp_path / "old.h5"
    write_format1(path, pack_of(w, **METHODS["svd"]), config, version)
    model = nn.Module()
    model.l = nn.Linear(40, 24, bias=False)
    return path, config, model


def test_format1_bundles_are_refused_with_the_rebuild_command(tmp_path):
    path, config, model = _old_bundle(tmp_path, 1)
    with pytest.raises(BundleVersionError) as err:
        load_bundle(model, path, config)
    assert str(err.value) == (
        f"{path} was built by duquant-packs 0.1.0 (format 1), which this runtime no longer reads: {REBUILD}"
    )
    assert err.value.field == "format_version" and isinstance(model.l, nn.Linear)


def test_bundles_whose_layers_list_no_stages_are_refused_with_the_rebuild_command(tmp_path):
    path, _, _ = _old_bundle(tmp_path, 2)
    with BundleReader(path) as reader:
        assert reader.sealed and reader.header.format_version == 2
        with pytest.raises(BundleVersionError) as err:
            reader.read_layer("l")
    assert str(err.value) == (
        f"{path}: layer 'l' lists no stages, as bundles before duquant-packs 0.3 did, which this runtime no "
        f"longer reads: {REBUILD}"
    )
    assert (err.value.layer, err.value.field) == ("l", "stages")


def test_a_tiled_rotation_whose_block_does_not_tile_the_width_is_refused(tmp_path):
    """The reader asks the kind for the shape: a [B, B] block that does not divide the width
    is a damaged bundle, refused before any forward could silently drop channels."""
    import dataclasses

    from duquant_runtime.bundle_reader import BundleReader
    from duquant_runtime.bundle_writer import BundleWriter
    from duquant_runtime.errors import BundleReadError

    rng = np.random.default_rng(5)
    pack = pack_of(outlier_weight(rng, 20, 64), **METHODS["hadamard"])
    bad = dataclasses.replace(pack, stage_values={"r_in": np.eye(24, dtype=np.float32)})
    for name, p in (("good.h5", pack), ("bad.h5", bad)):
        with BundleWriter(tmp_path / name) as writer:
            writer.add(p)
            writer.finish(
                fingerprint_doc={"config": {}, "source": []},
                config={},
                provenance={},
                tool_version="test",
                created_at="now",
            )
    with BundleReader(tmp_path / "good.h5") as reader:
        assert reader.read_layer("l").stage_values["r_in"].shape == (16, 16)
    with BundleReader(tmp_path / "bad.h5") as reader, pytest.raises(BundleReadError, match="r_in"):
        reader.read_layer("l")
