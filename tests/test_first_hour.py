"""What a new user meets in the first hour, on their own small model: messages that say what
a file is, what an environment variable changed, where a bundle is, and what a build measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight
from duquant_pipeline.cli import main
from duquant_runtime import capture_stats
from safetensors.torch import save_model
from torch import nn

CONFIG = """name = "tiny"
[select]
scope = "net."
[transform]
block_size = 16
"""


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


class Mlp(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.net = nn.Module()
        self.net.fc1 = nn.Linear(48, 64, bias=False)
        self.net.fc2 = nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            self.net.fc1.weight.copy_(torch.from_numpy(outlier_weight(rng, 64, 48)))
            self.net.fc2.weight.copy_(torch.from_numpy(outlier_weight(rng, 32, 64)))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(torch.relu(self.net.fc1(x)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer MLP checkpoint (F32), its config file, statistics and bundle."""
    root = tmp_path_factory.mktemp("first_hour")
    model = Mlp()
    save_model(model, str(root / "model.safetensors"))
    (root / "tiny.toml").write_text(CONFIG)
    with torch.no_grad(), capture_stats(model, str(root / "tiny.toml")) as cap:
        model(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))
    stats = cap.save(root / "stats.h5")
    code, out, err = _cli("build", "-c", str(root / "tiny.toml"), "--ckpt", str(root), "--out", str(root / "out"), "-q")
    assert code == 0, err
    return {"root": root, "config": root / "tiny.toml", "stats": stats, "bundle": Path(out.strip().splitlines()[-1])}


# item 3: a file of another kind is named, not called damaged


def test_a_statistics_file_given_as_a_bundle_is_named(tiny):
    code, _, err = _cli("inspect", str(tiny["stats"]))
    assert code == 2
    assert "this is a statistics file" in err and "not a bundle" in err
    assert "damaged" not in err
    code, out, err = _cli("verify", str(tiny["stats"]))
    assert code != 0 and "this is a statistics file" in out + err and "damaged" not in out + err


def test_a_bundle_given_as_statistics_is_named(tiny):
    code, _, err = _cli(
        "build", "-c", str(tiny["config"]), "--ckpt", str(tiny["root"]), "--out", str(tiny["root"] / "o2"),
        "--calib", str(tiny["bundle"]), "-q",
    )  # fmt: skip
    assert code == 2
    assert "this is a bundle" in err and "not a statistics file" in err and "damaged" not in err
    assert not (tiny["root"] / "o2").exists() or not list((tiny["root"] / "o2").glob("*.h5"))
