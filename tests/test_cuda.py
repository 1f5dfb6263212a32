"""The runtime on a CUDA device (marked ``cuda``: skipped without one; ``make gpu-check`` runs them).

Each result on the GPU is checked against the same bundle loaded on the CPU in float32, the
independent reference here being the CPU path the rest of the suite checks against its own
references: a bundle's numbers must not depend on where it is loaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from duquant_runtime import instrument, load_bundle
from flow_standin import OpenpiStandIn, flow_inputs, standin_bundles
from torch._dynamo.utils import counters

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)"),
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return standin_bundles(tmp_path_factory.mktemp("cuda"))


def _loaded(built: dict, kind: str, device: str, dtype: torch.dtype, **options: object) -> OpenpiStandIn:
    model = copy.deepcopy(built["float"]).to(device=device, dtype=dtype)
    instrument(model)
    load_bundle(model, built["paths"][kind], **options)
    return model


def _actions(model: OpenpiStandIn, device: str, dtype: torch.dtype) -> torch.Tensor:
    context, noise = (t.to(device=device, dtype=dtype) for t in flow_inputs(seed=9))
    return model.sample_actions(context, noise).float().cpu()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", ["dynamic", "per_step"])
@pytest.mark.parametrize("storage", ["codes", "dequant"])
def test_a_bundle_on_cuda_gives_the_cpu_numbers(built: dict, kind: str, storage: str) -> None:
    cpu = _actions(_loaded(built, kind, "cpu", torch.float32, weight_storage=storage), "cpu", torch.float32)
    gpu = _actions(_loaded(built, kind, "cuda", torch.float32, weight_storage=storage), "cuda", torch.float32)
    assert _rel(gpu, cpu) < 1e-3  # TF32 off by default for matmuls; rounding may flip a rare code


def test_bf16_on_cuda_stays_near_fp32(built: dict) -> None:
    fp32 = _actions(_loaded(built, "per_step", "cuda", torch.float32), "cuda", torch.float32)
    bf16 = _actions(_loaded(built, "per_step", "cuda", torch.bfloat16), "cuda", torch.bfloat16)
    assert _rel(bf16, fp32) < 0.05


def test_load_onto_a_cpu_model_with_device_cuda_moves_the_layers(built: dict) -> None:
    model = copy.deepcopy(built["float"])
    instrument(model)
    load_bundle(model, built["paths"]["dynamic"], device="cuda")
    assert model.gemma_expert.fc1.dtype_ref.device.type == "cuda"
    assert model.gemma_expert.fc1.weight.device.type == "cuda"


@pytest.mark.slow
def test_a_compiled_per_step_loop_on_cuda_adds_no_graph(built: dict) -> None:
    """openpi's order on the GPU with inductor: float and per-step counts equal, nothing recompiled."""
    seen = {}
    for kind in ("float", "per_step"):
        model = copy.deepcopy(built["float"]).cuda()
        model.sample_actions = torch.compile(model.sample_actions)
        if kind != "float":
            instrument(model)
            load_bundle(model, built["paths"][kind])
        torch._dynamo.reset()
        counters.clear()
        calls = []
        for _ in range(2):
            actions = _actions(model, "cuda", torch.float32)
            calls.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
        seen[kind] = calls
        if kind == "per_step":
            eager = _actions(_loaded(built, "per_step", "cuda", torch.float32), "cuda", torch.float32)
            assert _rel(actions, eager) < 1e-3
    assert seen["per_step"] == seen["float"]
    assert seen["float"][0] == seen["float"][1]
