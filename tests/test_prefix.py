"""Checkpoints whose names carry a parent prefix (LeRobot's policy holds pi0.5 as `model`):
the preset's selection finds the layers under it, the bundle stores them without it, and the
same bundle loads into the prefixed model with `expect_config`."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from duquant_pipeline.cli import main
from duquant_pipeline.demo_model import load_demo_model
from duquant_runtime import capture_stats, load_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import from_dict
from duquant_runtime.errors import SelectionError
from duquant_runtime.prefix import selection_prefix
from safetensors.torch import load_file, save_file


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def lerobot_ckpt(demo_ckpt, tmp_path_factory):
    """The demo checkpoint with every tensor renamed under `model.`, as LeRobot saves pi0.5."""
    path = tmp_path_factory.mktemp("lerobot") / "model.safetensors"
    save_file({f"model.{k}": v for k, v in load_file(str(demo_ckpt)).items()}, str(path))
    return path


class Policy(torch.nn.Module):
    """LeRobot's shape: the pi0.5 module tree is the policy's `model` attribute."""

    def __init__(self, ckpt) -> None:
        super().__init__()
        self.model = load_demo_model(ckpt)


def test_a_model_prefixed_checkpoint_builds_with_the_preset_and_loads_with_expect_config(
    demo_ckpt, lerobot_ckpt, tmp_path
):
    code, out, err = _cli("build", "-c", "full_w4a8", "--ckpt", str(lerobot_ckpt), "--out", str(tmp_path), "-q")
    assert code == 0, err
    assert "names under 'model.' (detected)" in err
    bundle = out.strip().splitlines()[-1]
    with BundleReader(bundle) as reader:
        names = reader.header.layer_names
        assert reader.header.fingerprint_doc["name_prefix"] == "model."
    assert names and not any(n.startswith("model.") for n in names)

    code, out, err = _cli("verify", bundle, "--config", "full_w4a8", "--ckpt", str(lerobot_ckpt))
    assert code == 0, out + err

    policy = Policy(demo_ckpt)
    x = torch.randn(2, 5, policy.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj.in_features)
    report = load_bundle(policy, bundle, expect_config="full_w4a8")
    assert report.prefix == "model." and "names under 'model.' (detected)" in str(report)
    assert len(report.replaced) == len(names)
    up = policy.model.paligemma_with_expert.gemma_expert.model.layers[0].mlp.up_proj
    assert type(up).__name__ == "DuQuantLinear" and up(x).isfinite().all()


def test_the_prefix_leaves_the_fingerprint_of_unprefixed_checkpoints_alone(demo_ckpt, lerobot_ckpt, tmp_path):
    """Same weights, two names: two bundles with the same layers, told apart by the recorded prefix."""
    code_a, out_a, _ = _cli("build", "-c", "dit_w4a8", "--ckpt", str(demo_ckpt), "--out", str(tmp_path / "a"), "-q")
    code_b, out_b, _ = _cli("build", "-c", "dit_w4a8", "--ckpt", str(lerobot_ckpt), "--out", str(tmp_path / "b"), "-q")
    assert code_a == code_b == 0
    with BundleReader(out_a.strip()) as a, BundleReader(out_b.strip()) as b:
        assert "name_prefix" not in a.header.fingerprint_doc
        assert a.header.layer_names == b.header.layer_names
        assert a.header.fingerprint != b.header.fingerprint


def test_capture_stats_names_layers_as_the_build_does(demo_ckpt, lerobot_ckpt, tmp_path):
    policy = Policy(demo_ckpt)
    with capture_stats(policy, "dit_w4a8") as stats:
        pass
    recorded = set(stats._observers)
    code, out, err = _cli("list-layers", "-c", "dit_w4a8", "--ckpt", str(lerobot_ckpt))
    assert code == 0, err
    listed = {line.split()[0] for line in out.splitlines()[:-1]}
    assert recorded == listed and not any(n.startswith("model.") for n in recorded)
    assert "names under 'model.' (detected)" in out.splitlines()[-1]


def test_selection_prefix_refuses_two_copies_and_keeps_a_dot_boundary():
    select = from_dict({"name": "t", "select": {"scope": "net."}}).select
    assert selection_prefix(select, ["net.q_proj", "x.net.q_proj"]) == ""  # picks as they are: nothing stripped
    assert selection_prefix(select, ["model.net.q_proj", "model.head"]) == "model."
    assert selection_prefix(select, ["modelnet.q_proj"]) == ""  # "net." must start a dotted part
    with pytest.raises(SelectionError, match="several name prefixes"):
        selection_prefix(select, ["a.net.q_proj", "b.net.q_proj"])
    listed = from_dict({"name": "t", "select": {"layers": ["net.fc1"]}}).select
    assert selection_prefix(listed, ["model.net.fc1", "model.net.fc2"]) == "model."
