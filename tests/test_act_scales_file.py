"""The activation-scales file, fast: what ``save_act_scales`` writes (checked against scales
computed here with torch.quantile), what ``load_bundle(..., act_scales=)`` restores, and
every refusal of ``apply_act_scales``, each on a file written here with h5py."""

from __future__ import annotations

import copy
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import outlier_weight
from duquant_runtime import DuQuantError, DuQuantLinear, calibrate, h5file, load_bundle, save_act_scales
from duquant_runtime.config import resolve
from duquant_runtime.errors import ActScalesError
from safetensors.torch import save_file
from torch import nn

STATIC_CONFIG = """name = "static"
[select]
scope = "net."
[quant]
act_mode = "per_channel_static"
act_percentile = 90.0
calib_steps = 2
[transform]
block_size = 16
"""
DYNAMIC_CONFIG = """name = "dynamic"
[select]
scope = "net."
[transform]
block_size = 16
"""
NAMES = ("net.fc1", "net.fc2")  # the bundle's layer names (scope "net.", no prefix)
SCALES_MAGIC = b"duquant-scales\x00\x02"  # the 16 bytes the seal of a scales file starts with


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.net = nn.Module()
        self.net.fc1 = nn.Linear(32, 48, bias=False)
        self.net.fc2 = nn.Linear(48, 16, bias=False)
        with torch.no_grad():
            self.net.fc1.weight.copy_(torch.from_numpy(outlier_weight(rng, 48, 32)))
            self.net.fc2.weight.copy_(torch.from_numpy(outlier_weight(rng, 16, 48)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(torch.relu(self.net.fc1(x)))


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(40, 32, generator=g) for _ in range(2)] + [100.0 * torch.randn(40, 32, generator=g)]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    from duquant_pipeline.build import build_bundle

    root = tmp_path_factory.mktemp("act_scales")
    save_file({k: v.contiguous() for k, v in TwoLayers().state_dict().items()}, str(root / "model.safetensors"))
    out = {}
    for kind, text in (("static", STATIC_CONFIG), ("dynamic", DYNAMIC_CONFIG)):
        (root / f"{kind}.toml").write_text(text)
        out[kind] = build_bundle(resolve(root / f"{kind}.toml"), root, root / kind, jobs=1).path
    return out


def _fingerprint(bundle: Path) -> str:
    """The bundle's fingerprint, read here from its HDF5 attribute."""
    with h5py.File(bundle, "r") as f:
        value = f.attrs["fingerprint"]
    return value.decode() if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def calibrated(bundles):
    """A model calibrated on three batches (calib_steps = 2), the scales the static rule gives
    (per channel, torch.quantile of |x_t| over each of the first two batches' rows, the larger
    of the two, over qmax 127), and a probe input with its output."""
    model = TwoLayers()
    load_bundle(model, bundles["static"])
    layers = {n: model.get_submodule(n) for n in NAMES}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in NAMES}
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: seen[n].append(a[0].detach().clone()))
        for n, m in layers.items()
    ]
    with torch.no_grad(), calibrate(model):
        for b in _batches():
            model(b)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        want = {
            n: torch.stack([torch.quantile(layers[n].rotate_input(x).abs(), 0.9, dim=0) for x in seen[n][:2]]).amax(0)
            / 127.0
            for n in NAMES
        }
    for n in NAMES:
        torch.testing.assert_close(layers[n].act_scale, want[n], rtol=1e-5, atol=1e-7)
    probe = torch.randn(7, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        output = model(probe)
    return {"model": model, "want": want, "probe": probe, "output": output}


@pytest.fixture
def saved(calibrated, tmp_path) -> dict:
    """The calibrated model's scales file, saved afresh for each test: mutmut credits a function
    only to the tests during which it ran, so a module-scoped save would leave the checks of
    the file's contents out of the runs that mutate ``save_act_scales``."""
    directory = tmp_path / "saved"
    directory.mkdir()
    path = directory / "scales.h5"
    return {"path": path, "returned": save_act_scales(calibrated["model"], str(path))}


def _write(
    path: Path,
    fingerprint: str,
    scales: dict[str, np.ndarray],
    *,
    fmt: str | None = "duquant-packs-act-scales",
    version: int = 2,
    sealed: bool = True,
    crc: dict[str, int] | None = None,
) -> Path:
    """A scales file written here: sealed (user block + the production seal) or plain HDF5."""
    with h5file.create(path) if sealed else h5py.File(path, "w") as f:
        if fmt is not None:
            f.attrs["format"] = fmt
        f.attrs["format_version"] = version
        f.attrs["bundle_fingerprint"] = fingerprint
        g = f.create_group("scales")
        for name, data in scales.items():
            ds = g.create_dataset(name, data=data)
            ds.attrs["crc32"] = (crc or {}).get(name, zlib.crc32(np.ascontiguousarray(data).tobytes()))
    if sealed:
        h5file.seal(path, SCALES_MAGIC)
    return path


def _good_scales(calibrated) -> dict[str, np.ndarray]:
    return {n: calibrated["want"][n].numpy().astype(np.float32) for n in NAMES}


def _refusal(model: nn.Module, bundle: Path, scales: Path) -> ActScalesError:
    with pytest.raises(ActScalesError) as info:
        load_bundle(model, bundle, act_scales=scales)
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())  # the model is untouched
    return info.value


# ---------------------------------------------------------------- save_act_scales refusals


def test_save_refuses_a_model_without_static_layers(bundles, tmp_path):
    message = "save_act_scales(): the model has no static-activation DuQuantLinear layer"
    with pytest.raises(DuQuantError) as info:
        save_act_scales(TwoLayers(), tmp_path / "a.h5")
    assert str(info.value) == message
    dynamic = TwoLayers()
    load_bundle(dynamic, bundles["dynamic"])
    with pytest.raises(DuQuantError) as info:
        save_act_scales(dynamic, tmp_path / "b.h5")
    assert str(info.value) == message
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_layers_not_calibrated_yet(bundles, tmp_path):
    model = TwoLayers()
    load_bundle(model, bundles["static"])
    with pytest.raises(DuQuantError) as info:
        save_act_scales(model, tmp_path / "s.h5")
    assert str(info.value) == (
        "save_act_scales(): 2 layer(s) are not calibrated yet (e.g. net.fc1); run `with calibrate(model): ...` first"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fingerprints", [(None, None), ("a" * 64, "b" * 64)], ids=["no-bundle", "two-bundles"])
def test_save_refuses_layers_not_from_one_loaded_bundle(calibrated, tmp_path, fingerprints):
    model = copy.deepcopy(calibrated["model"])
    for name, fp in zip(NAMES, fingerprints, strict=True):
        model.get_submodule(name).bundle_fingerprint = fp
    with pytest.raises(DuQuantError) as info:
        save_act_scales(model, tmp_path / "s.h5")
    assert str(info.value) == "save_act_scales(): the static layers do not come from one loaded bundle"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what the file holds


def test_the_saved_file_holds_each_layers_scales_bound_to_the_bundle(bundles, calibrated, saved):
    path = saved["path"]
    assert saved["returned"] == path and isinstance(saved["returned"], Path)
    assert [p.name for p in path.parent.iterdir()] == ["scales.h5"]  # written atomically: no temp file left
    assert h5file.check_seal(path, SCALES_MAGIC) is True
    raw = path.read_bytes()
    assert raw.startswith(SCALES_MAGIC) and raw[h5file.USERBLOCK : h5file.USERBLOCK + 8] == b"\x89HDF\r\n\x1a\n"
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        assert attrs == {
            "format": "duquant-packs-act-scales",
            "format_version": 2,
            "bundle_fingerprint": _fingerprint(bundles["static"]),
        }
        assert list(f) == ["scales"] and sorted(f["scales"]) == list(NAMES)
        for name in NAMES:
            ds = f[f"scales/{name}"]
            assert ds.dtype == np.float32 and ds.shape == (calibrated["model"].get_submodule(name).in_features,)
            torch.testing.assert_close(torch.from_numpy(ds[()]), calibrated["want"][name], rtol=1e-5, atol=1e-7)
            assert torch.equal(torch.from_numpy(ds[()]), calibrated["model"].get_submodule(name).act_scale)
            per_token = int(calibrated["model"].get_submodule(name).act_per_token)  # the layer's measured choice
            assert dict(ds.attrs) == {"crc32": zlib.crc32(ds[()].tobytes()), "per_token": per_token}


def test_load_restores_the_scales_and_the_calibrated_output(bundles, calibrated, saved):
    model = TwoLayers()
    load_bundle(model, bundles["static"], act_scales=saved["path"])
    for name in NAMES:
        layer = model.get_submodule(name)
        assert isinstance(layer, DuQuantLinear) and layer.act_calibrated
        assert layer.act_scale.dtype == torch.float32
        torch.testing.assert_close(layer.act_scale, calibrated["want"][name], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(model(calibrated["probe"]), calibrated["output"])


def test_an_unsealed_version_1_file_with_good_checksums_loads(bundles, calibrated, tmp_path):
    path = _write(
        tmp_path / "v1.h5", _fingerprint(bundles["static"]), _good_scales(calibrated), version=1, sealed=False
    )
    assert h5file.check_seal(path, SCALES_MAGIC) is False
    model = TwoLayers()
    load_bundle(model, bundles["static"], act_scales=path)
    for name in NAMES:
        assert model.get_submodule(name).act_calibrated
        assert torch.equal(model.get_submodule(name).act_scale, calibrated["want"][name])


def test_a_sealed_file_is_vouched_for_by_its_seal_not_per_dataset_crcs(bundles, calibrated, tmp_path):
    scales = _good_scales(calibrated)
    wrong = {n: zlib.crc32(a.tobytes()) ^ 1 for n, a in scales.items()}
    path = _write(tmp_path / "s.h5", _fingerprint(bundles["static"]), scales, crc=wrong)
    model = TwoLayers()
    load_bundle(model, bundles["static"], act_scales=path)
    for name in NAMES:
        assert torch.equal(model.get_submodule(name).act_scale, calibrated["want"][name])


# ---------------------------------------------------------------- apply refusals


def test_a_missing_file_is_refused(bundles, tmp_path):
    path = tmp_path / "absent.h5"
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"activation scales file not found: {path}"


def test_a_bundle_given_as_scales_is_told_what_it_is(bundles):
    path = bundles["static"]
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == (
        f"{path}: this is a bundle (written by `duquant-packs build`), not an activation-scales file "
        "(written by `calibrate`)"
    )


def test_a_file_that_is_not_hdf5_is_one_sentence(bundles, tmp_path):
    path = tmp_path / "junk.h5"
    path.write_bytes(b"not an hdf5 file at all\n" * 40)
    err = _refusal(TwoLayers(), bundles["static"], path)
    text = str(err)
    assert text.startswith(f"{path}: cannot read the activation scales (")
    assert text.endswith("); the file is damaged — calibrate again")


def test_a_damaged_sealed_file_fails_its_seal(bundles, saved, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copy(saved["path"], path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err).startswith(f"{path}: the file fails its checksum (crc32 ")
    assert str(err).endswith("; it is damaged — calibrate again")


@pytest.mark.parametrize("fmt", ["duquant-packs-stats", None], ids=["other-format", "no-format"])
def test_a_file_of_another_format_is_refused(bundles, calibrated, tmp_path, fmt):
    path = _write(tmp_path / "other.h5", _fingerprint(bundles["static"]), _good_scales(calibrated), fmt=fmt)
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"{path} is not a duquant activation-scales file"
    assert err.field == "format" and err.layer is None


@pytest.mark.parametrize("version", [2, 3])
def test_a_file_that_lost_its_seal_is_refused(bundles, calibrated, tmp_path, version):
    path = _write(
        tmp_path / "unsealed.h5",
        _fingerprint(bundles["static"]),
        _good_scales(calibrated),
        version=version,
        sealed=False,
    )
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"{path} has lost its seal; the file is damaged — calibrate again"
    assert err.field == "format" and err.layer is None


def test_the_scales_of_another_bundle_are_refused(bundles, saved):
    ours, theirs = _fingerprint(bundles["dynamic"]), _fingerprint(bundles["static"])
    assert ours != theirs
    path = saved["path"]
    err = _refusal(TwoLayers(), bundles["dynamic"], path)
    assert str(err) == (
        f"{path} holds activation scales calibrated for bundle {theirs[:12]}, not for "
        f"this bundle {ours[:12]}: recalibrate with this bundle"
    )
    assert err.field == "bundle_fingerprint" and err.layer is None


def test_a_layer_missing_from_the_file_is_named(bundles, calibrated, tmp_path):
    scales = _good_scales(calibrated)
    del scales["net.fc2"]
    path = _write(tmp_path / "partial.h5", _fingerprint(bundles["static"]), scales)
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"{path} has no scales for layer net.fc2"
    assert err.layer == "net.fc2" and err.field == "scales"


@pytest.mark.parametrize("shape", [(31,), (1, 32)])
def test_scales_of_a_wrong_shape_are_refused(bundles, calibrated, tmp_path, shape):
    scales = _good_scales(calibrated)
    scales["net.fc1"] = np.full(shape, 0.5, dtype=np.float32)
    path = _write(tmp_path / "shape.h5", _fingerprint(bundles["static"]), scales)
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"{path}: scales of layer net.fc1 are damaged"
    assert err.layer == "net.fc1" and err.field == "scales"


def test_an_unsealed_version_1_file_with_a_bad_checksum_is_refused(bundles, calibrated, tmp_path):
    scales = _good_scales(calibrated)
    crc = {"net.fc2": zlib.crc32(scales["net.fc2"].tobytes()) ^ 1}
    path = _write(tmp_path / "v1.h5", _fingerprint(bundles["static"]), scales, version=1, sealed=False, crc=crc)
    err = _refusal(TwoLayers(), bundles["static"], path)
    assert str(err) == f"{path}: scales of layer net.fc2 are damaged"
    assert err.layer == "net.fc2" and err.field == "scales"


def test_scales_for_a_bundle_without_static_layers_are_refused(bundles, tmp_path):
    path = _write(tmp_path / "dyn.h5", _fingerprint(bundles["dynamic"]), {})
    err = _refusal(TwoLayers(), bundles["dynamic"], path)
    assert str(err) == f"act_scales={path} given, but the bundle's layers use no static activation scales"
    assert err.field == "act_mode" and err.layer is None
