"""The slim runtime: ``duquant_runtime`` loads a bundle with only torch, numpy and h5py.

The child process makes click, joblib, tqdm, safetensors and numba (the ``[build]`` extra) and the
pipeline unimportable, then loads a bundle onto a model and runs it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import torch
from conftest import outlier_weight, write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_runtime.config import from_dict

BLOCKED = ("click", "joblib", "tqdm", "safetensors", "numba", "duquant_pipeline", "loky", "distributed", "dask")

CHILD = textwrap.dedent(
    """
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ModuleNotFoundError(f"blocked in this test: {{name}}")
            return None

    sys.meta_path.insert(0, Refuse())
    import torch
    from torch import nn
    from duquant_runtime import load_bundle, DuQuantLinear

    model = nn.Module()
    model.net = nn.Module()
    model.net.up_proj = nn.Linear(48, 64, bias=False)
    model.net.down_proj = nn.Linear(64, 40, bias=True)
    model.load_state_dict(torch.load({weights!r}))
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    want = model.net.down_proj(model.net.up_proj(x))
    report = load_bundle(model, {bundle!r}, expect_config={config!r})
    got = model.net.down_proj(model.net.up_proj(x))
    assert isinstance(model.net.up_proj, DuQuantLinear) and len(report.replaced) == 2
    assert (got - want).norm() / want.norm() < 0.2, float((got - want).norm() / want.norm())
    assert not [m for m in sys.modules if m.split(".")[0] in {blocked!r}]
    print("ok", report)
    """
)


def test_runtime_loads_without_the_build_extra(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "net.up_proj.weight": outlier_weight(rng, 64, 48),
        "net.down_proj.weight": outlier_weight(rng, 40, 64),
        "net.down_proj.bias": rng.standard_normal(40),
    }
    ckpt = write_checkpoint(tmp_path / "model.safetensors", tensors)
    config = tmp_path / "slim.toml"
    config.write_text('name = "slim"\n[select]\nscope = "net."\n[transform]\nblock_size = 16\n')
    result = build_bundle(
        from_dict({"name": "slim", "select": {"scope": "net."}, "transform": {"block_size": 16}}),
        ckpt,
        tmp_path,
        jobs=1,
    )
    weights = tmp_path / "weights.pt"
    torch.save({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}, weights)
    code = CHILD.format(blocked=BLOCKED, weights=str(weights), bundle=str(result.path), config=str(config))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("ok duquant: 2 layers")
