"""The activation-scales file on a two-layer static bundle: what save_act_scales writes, that a
load restores exactly the scales computed here with torch.quantile, and each refusal by its
sentence and field. Damaged files are written here with h5py."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import test_guards
import torch
from duquant_runtime import DuQuantError, calibrate, h5file, load_bundle
from duquant_runtime.calibration import SCALES_FORMAT, SEAL_MAGIC, save_act_scales
from duquant_runtime.errors import ActScalesError
from test_guards import TwoLayers, _batches, expected_scales

static_bundle = test_guards.static_bundle  # the fixture, shared


def calibrated(bundle: Path, config: Path) -> tuple[TwoLayers, dict[str, torch.Tensor]]:
    model = TwoLayers()
    load_bundle(model, bundle, expect_config=str(config))
    batches = _batches()[:2]  # calib_steps = 2
    fc2_inputs: list[torch.Tensor] = []
    hook = model.net.fc2.register_forward_pre_hook(lambda mod, args: fc2_inputs.append(args[0].detach().clone()))
    with torch.no_grad():
        with calibrate(model):
            for b in batches:
                model(b)
        hook.remove()
        want = {
            "fc1": expected_scales(model.net.fc1, batches, 90.0),
            "fc2": expected_scales(model.net.fc2, fc2_inputs, 90.0),
        }
    return model, want


@pytest.fixture(scope="module")
def scales_file(static_bundle, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    bundle, config = static_bundle
    model, want = calibrated(bundle, config)
    path = save_act_scales(model, tmp_path_factory.mktemp("scales") / "scales.h5")
    return path, want


def test_the_file_holds_the_fingerprint_and_each_layers_scales_sealed(scales_file, static_bundle):
    path, want = scales_file
    with h5py.File(static_bundle[0], "r") as f:
        fingerprint = f.attrs["fingerprint"]
    assert h5file.check_seal(path, SEAL_MAGIC) is True
    assert [p.name for p in path.parent.iterdir()] == ["scales.h5"]  # no temp file left
    with h5py.File(path, "r") as f:
        assert (f.attrs["format"], int(f.attrs["format_version"]), f.attrs["bundle_fingerprint"]) == (
            SCALES_FORMAT,
            2,
            fingerprint,
        )
        assert sorted(f["scales"]) == ["net.fc1", "net.fc2"]
        for name in ("fc1", "fc2"):
            data = f[f"scales/net.{name}"][()]
            np.testing.assert_allclose(data, want[name].numpy(), rtol=1e-5, atol=1e-8)
            assert int(f[f"scales/net.{name}"].attrs["crc32"]) == h5file.crc32(data)


def test_a_load_with_the_file_restores_the_scales(scales_file, static_bundle):
    path, want = scales_file
    model = TwoLayers()
    load_bundle(model, static_bundle[0], expect_config=str(static_bundle[1]), act_scales=path)
    for name in ("fc1", "fc2"):
        layer = getattr(model.net, name)
        assert layer.act_calibrated
        torch.testing.assert_close(layer.act_scale.float(), want[name], rtol=1e-5, atol=1e-8)


def test_save_refuses_models_it_cannot_describe(static_bundle, tmp_path):
    with pytest.raises(DuQuantError) as err:
        save_act_scales(TwoLayers(), tmp_path / "s.h5")
    assert str(err.value) == "save_act_scales(): the model has no static-activation DuQuantLinear layer"
    model = TwoLayers()
    load_bundle(model, static_bundle[0], expect_config=str(static_bundle[1]))
    with pytest.raises(DuQuantError) as err:
        save_act_scales(model, tmp_path / "s.h5")
    assert str(err.value) == (
        "save_act_scales(): 2 layer(s) are not calibrated yet (e.g. net.fc1); run `with calibrate(model): ...` first"
    )
    with torch.no_grad(), calibrate(model):
        model(_batches()[0])
    model.net.fc2.bundle_fingerprint = "another"
    with pytest.raises(DuQuantError) as err:
        save_act_scales(model, tmp_path / "s.h5")
    assert str(err.value) == "save_act_scales(): the static layers do not come from one loaded bundle"
    assert not list(tmp_path.iterdir())


def rewrite(src: Path, dest: Path, edit, *, seal: bool = True, version: int | None = None, plain: bool = False) -> Path:
    """A copy of the scales file with ``edit(file)`` applied, re-sealed unless told not to."""
    with h5py.File(src, "r") as f:
        attrs = {k: f.attrs[k] for k in f.attrs}
        scales = {k: f[f"scales/{k}"][()] for k in f["scales"]}
        crcs = {k: int(f[f"scales/{k}"].attrs["crc32"]) for k in f["scales"]}
    if version is not None:
        attrs["format_version"] = version
    with h5py.File(dest, "w") if plain else h5file.create(dest) as f:  # plain: no user block
        f.attrs.update(attrs)
        g = f.create_group("scales")
        for k, v in scales.items():
            g.create_dataset(k, data=v).attrs["crc32"] = crcs[k]
        edit(f)
    if seal:
        h5file.seal(dest, SEAL_MAGIC)
    return dest


def refused(bundle: Path, config: Path, scales: Path) -> ActScalesError:
    with pytest.raises(ActScalesError) as err:
        load_bundle(TwoLayers(), bundle, expect_config=str(config), act_scales=scales)
    return err.value


def test_missing_foreign_and_unsealed_files_are_refused(scales_file, static_bundle, tmp_path):
    path, _ = scales_file
    bundle, config = static_bundle
    missing = tmp_path / "none.h5"
    assert str(refused(bundle, config, missing)) == f"activation scales file not found: {missing}"
    other = rewrite(path, tmp_path / "fmt.h5", lambda f: f.attrs.__setitem__("format", "something-else"))
    err = refused(bundle, config, other)
    assert (str(err), err.field) == (f"{other} is not a duquant activation-scales file", "format")
    fingerprint = str(h5py.File(path, "r").attrs["bundle_fingerprint"])
    foreign = rewrite(path, tmp_path / "fp.h5", lambda f: f.attrs.__setitem__("bundle_fingerprint", "f" * 64))
    err = refused(bundle, config, foreign)
    assert err.field == "bundle_fingerprint"
    assert str(err) == (
        f"{foreign} holds activation scales calibrated for bundle ffffffffffff, not for this bundle "
        f"{fingerprint[:12]}: recalibrate with this bundle"
    )
    unsealed = rewrite(path, tmp_path / "u.h5", lambda f: None, seal=False)
    err = refused(bundle, config, unsealed)
    assert (err.field, str(err).endswith("calibrate again")) == ("file", True)
    assert "the file's seal is damaged" in str(err)


def test_a_wrong_or_missing_layer_is_named(scales_file, static_bundle, tmp_path):
    path, _ = scales_file
    bundle, config = static_bundle
    gone = rewrite(path, tmp_path / "gone.h5", lambda f: f.__delitem__("scales/net.fc2"))
    err = refused(bundle, config, gone)
    assert (str(err), err.layer, err.field) == (f"{gone} has no scales for layer net.fc2", "net.fc2", "scales")

    def reshape(f):
        del f["scales/net.fc1"]
        f["scales"].create_dataset("net.fc1", data=np.ones(5, np.float32))

    wrong = rewrite(path, tmp_path / "shape.h5", reshape)
    err = refused(bundle, config, wrong)
    assert (str(err), err.layer, err.field) == (f"{wrong}: scales of layer net.fc1 are damaged", "net.fc1", "scales")


def test_an_unsealed_version_1_file_is_read_and_checked_by_its_crcs(scales_file, static_bundle, tmp_path):
    path, want = scales_file
    bundle, config = static_bundle
    v1 = rewrite(path, tmp_path / "v1.h5", lambda f: None, seal=False, version=1, plain=True)
    model = TwoLayers()
    load_bundle(model, bundle, expect_config=str(config), act_scales=v1)
    torch.testing.assert_close(model.net.fc1.act_scale.float(), want["fc1"], rtol=1e-5, atol=1e-8)

    def damage(f):
        f["scales/net.fc1"][0] = 123.0

    bad = rewrite(path, tmp_path / "bad.h5", damage, seal=False, version=1, plain=True)
    err = refused(bundle, config, bad)
    assert (str(err), err.layer, err.field) == (f"{bad}: scales of layer net.fc1 are damaged", "net.fc1", "scales")


def test_scales_for_a_bundle_without_static_layers_are_refused(scales_file, demo_bundles, demo_ckpt, tmp_path):
    path, _ = scales_file
    from duquant_pipeline.demo_model import load_demo_model

    bundle = demo_bundles["llm_w4a8"]
    with h5py.File(bundle, "r") as f:
        fingerprint = str(f.attrs["fingerprint"])
    matching = rewrite(path, tmp_path / "m.h5", lambda f: f.attrs.__setitem__("bundle_fingerprint", fingerprint))
    model = load_demo_model(demo_ckpt)
    with pytest.raises(ActScalesError) as err:
        load_bundle(model, bundle, expect_config="llm_w4a8", act_scales=matching)
    assert err.value.field == "act_mode"
    assert str(err.value) == (f"act_scales={matching} given, but the bundle's layers use no static activation scales")
