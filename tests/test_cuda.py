"""The runtime on a CUDA device (marked ``cuda``: skipped without one; ``make gpu-check`` runs them).

Each result on the GPU is checked against the same bundle loaded on the CPU in float32, the
independent reference here being the CPU path the rest of the suite checks against its own
references: a bundle's numbers must not depend on where it is loaded.
"""

from __future__ import annotations

import copy

import pytest
import torch
from duquant_pipeline.build import build_bundle
from duquant_runtime import capture_stats, instrument, load_bundle
from duquant_runtime.config import load_toml
from flow_standin import PER_STEP_CONFIG, OpenpiStandIn, flow_inputs
from safetensors.torch import save_model
from torch._dynamo.utils import counters

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)"),
]
DYNAMIC_CONFIG = PER_STEP_CONFIG.replace('name = "per_step"', 'name = "dynamic"').replace(
    'act_mode = "per_step_static"', 'act_mode = "per_token_dynamic"'
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("cuda")
    float_model = OpenpiStandIn().eval()
    save_model(float_model, str(out / "model.safetensors"))
    configs = {}
    for name, text in (("per_step", PER_STEP_CONFIG), ("dynamic", DYNAMIC_CONFIG)):
        (out / f"{name}.toml").write_text(text)
        configs[name] = load_toml(out / f"{name}.toml")
    capturing = copy.deepcopy(float_model)
    instrument(capturing)
    with capture_stats(capturing, configs["per_step"]) as stats:
        for seed in range(4):
            capturing.sample_actions(*flow_inputs(seed=seed))
    calib = stats.save(out / "stats.h5")
    paths = {
        "per_step": build_bundle(configs["per_step"], out / "model.safetensors", out, jobs=1, calib=calib).path,
        "dynamic": build_bundle(configs["dynamic"], out / "model.safetensors", out, jobs=1).path,
    }
    return {"float": float_model, "paths": paths}


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
