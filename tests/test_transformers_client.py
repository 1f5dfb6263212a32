"""Issue 12: the runtime inside a real model stack — transformers' PaliGemma (SigLIP + Gemma) and
a Gemma action expert under pi0.5's names, saved the way openpi's converter does."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", reason="the transformers test client needs transformers (dev extra)")
sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

from duquant_pipeline.build import build_bundle
from duquant_runtime import (
    DuQuantLinear,
    ModelMismatchError,
    QuantEmbedding,
    attach_clock,
    calibrate,
    capture_stats,
    flow_step,
    load_bundle,
)
from duquant_runtime.config import matches, preset_names, resolve
from testbeds import COMPONENT_PREFIX, build_pi05, linear_names, pi05_inputs

PRESETS = [p for p in preset_names()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """The float model, its checkpoint (safetensors.torch.save_model) and a bundle per preset."""
    from safetensors.torch import save_model

    work = tmp_path_factory.mktemp("client")
    model = build_pi05(seed=2, coupled=True, layers=2)
    save_model(model, str(work / "model.safetensors"))
    stats = work / "stats.h5"
    with torch.no_grad(), capture_stats(model, "full_w4a8_calib") as capture:
        for seed in range(1, 4):
            model.components(pi05_inputs(batch=2, seed=seed))
    capture.save(stats)

    def calib(name: str) -> Path | None:
        if resolve(name).quant.a4_min_sqnr_db:  # W4A4: the expert's layers per step
            return stepped_stats(model, name, work / f"stats-{name}.h5")
        return stats if "calib" in name else None

    bundles = {
        name: build_bundle(resolve(name), work, work / "out", jobs=1, calib=calib(name)).path for name in PRESETS
    }
    return model, bundles


def stepped_stats(model: nn.Module, name: str, path: Path) -> Path:
    """``name``'s statistics with the expert run once per denoising step (this testbed has no loop)."""
    probe = copy.deepcopy(model)
    attach_clock(probe)
    with torch.no_grad(), capture_stats(probe, name) as capture:
        for seed in range(1, 4):
            inputs = pi05_inputs(batch=2, seed=seed)
            probe.vision(inputs["vision"]), probe.llm(inputs["llm"])
            for step in range(resolve(name).quant.flow_steps):
                with flow_step(probe, index=step):
                    probe.expert(pi05_inputs(batch=2, seed=100 * seed + step)["expert"])
    return capture.save(path)


def components_of(config_scope: str, exclude: str) -> set[str]:
    inside = {c for c, prefix in COMPONENT_PREFIX.items() if prefix.startswith(config_scope)}
    return {c for c in inside if not (exclude and "vision_tower" in exclude and c == "vision")}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_on_the_transformers_model(client, preset):
    model, bundles = client
    config = resolve(preset)
    quantized = copy.deepcopy(model)
    per_step = config.quant.per_step
    if per_step:  # the expert here runs outside a denoising loop: each step named by hand
        attach_clock(quantized)
    report = load_bundle(quantized, bundles[preset], config, progress=False)
    if per_step and not config.quant.a4_min_sqnr_db:  # dit_w4a4 built without --calib
        with calibrate(quantized):
            for step in range(config.quant.flow_steps):
                with flow_step(quantized, index=step):
                    quantized.components(pi05_inputs(batch=2, seed=step))
    # the replaced set is exactly the selection, all DuQuantLinear now, and the table [embed] picks
    linears = [n for n in report.replaced if isinstance(quantized.get_submodule(n), DuQuantLinear)]
    assert sorted(linears) == matches(config.select, linear_names(model))
    tables = sorted(set(report.replaced) - set(linears))
    assert tables == (
        ["paligemma_with_expert.paligemma.model.language_model.embed_tokens"] if config.embed.include else []
    )
    assert all(isinstance(quantized.get_submodule(n), QuantEmbedding) for n in tables)
    assert report.tied_heads == (["paligemma_with_expert.paligemma.lm_head"] if tables else [])
    inputs = pi05_inputs(batch=2, seed=9)
    with flow_step(quantized, index=3) if per_step else contextlib.nullcontext():
        ref, out = model.components(inputs), quantized.components(inputs)
    touched = components_of(config.select.scope, config.select.exclude)
    for name in ref:
        assert torch.isfinite(out[name]).all()
        if name in touched:  # W4A8 error of a 2-layer component (RTN: ~0.4 vision, ~0.1 llm, ~0.03 expert)
            # the seed's svd is barely better than RTN; W4A4 about twice W4A8's error
            bound = 0.4 if preset.endswith("_seed") else 0.3 if config.quant.a4_min_sqnr_db else 0.15
            assert 0 < rel(out[name], ref[name]) < bound, (name, rel(out[name], ref[name]))
        else:  # out-of-scope components are bit-identical
            assert torch.equal(out[name], ref[name]), name


@pytest.mark.slow
def test_bf16_and_openpi_mixed_precision(client):
    """openpi keeps the model in bf16 with norms in fp32: each replaced layer takes the dtype of
    the Linear it replaces, and its neighbours keep theirs."""
    model, bundles = client
    mixed = copy.deepcopy(model).to(torch.bfloat16)
    for name, module in mixed.named_modules():
        if "norm" in type(module).__name__.lower() and not name.startswith(COMPONENT_PREFIX["vision"]):
            module.float()
    norms = {n: m.weight.dtype for n, m in mixed.named_modules() if "norm" in type(m).__name__.lower()}
    report = load_bundle(mixed, bundles["llm_dit_w4a8"], "llm_dit_w4a8", progress=False)
    for name in report.replaced:
        layer = mixed.get_submodule(name)
        assert layer.weight.dtype == torch.bfloat16 and layer.dtype_ref.dtype == torch.bfloat16
    assert norms == {n: m.weight.dtype for n, m in mixed.named_modules() if "norm" in type(m).__name__.lower()}
    assert torch.float32 in norms.values()
    inputs = pi05_inputs(batch=2, seed=9)
    ref = model.components(inputs)
    out = mixed.components({k: v.to(torch.bfloat16) for k, v in inputs.items()})
    for name in ("llm", "expert"):
        assert torch.isfinite(out[name]).all() and rel(out[name], ref[name]) < 0.2, name
    # plain bf16 everywhere
    plain = copy.deepcopy(model).to(torch.bfloat16)
    load_bundle(plain, bundles["full_w4a8"], "full_w4a8", progress=False)
    out = plain.components({k: v.to(torch.bfloat16) for k, v in inputs.items()})
    for name in ref:
        assert torch.isfinite(out[name]).all() and rel(out[name], ref[name]) < 0.2, name


@pytest.mark.slow
def test_compiled_forward_with_swapped_layers_matches_eager(client):
    model, bundles = client
    quantized = copy.deepcopy(model)
    load_bundle(quantized, bundles["dit_w4a8"], "dit_w4a8", progress=False)
    x = pi05_inputs(batch=1, seed=4)["expert"]
    with torch.no_grad():
        eager = quantized.expert(x)
        compiled = torch.compile(quantized.expert, backend="aot_eager")(x)
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-5)


class LeRobotStyle(nn.Module):
    """LeRobot's pi0/pi05 port: the same tree under ``model.``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.model = inner


def test_model_prefixed_names_load_without_arguments(client):
    model, bundles = client
    wrapped = LeRobotStyle(copy.deepcopy(model))
    report = load_bundle(wrapped, bundles["llm_w4a8"], "llm_w4a8", progress=False)
    assert report.prefix == "model." and report.prefix_detected and "(detected)" in str(report)
    assert all(n.startswith("model.paligemma_with_expert.") for n in report.replaced)
    # an explicit prefix still wins, and a wrong one is refused with the hint
    again = LeRobotStyle(copy.deepcopy(model))
    assert load_bundle(again, bundles["llm_w4a8"], name_prefix="model.", progress=False).prefix_detected is False
    with pytest.raises(ModelMismatchError, match=r"pass name_prefix='model\.'"):
        load_bundle(LeRobotStyle(copy.deepcopy(model)), bundles["llm_w4a8"], name_prefix="", progress=False)


def test_ambiguous_prefix_is_refused_with_the_candidates(client):
    model, bundles = client
    twins = nn.Module()
    twins.a = copy.deepcopy(model)
    twins.b = copy.deepcopy(model)
    before = {k: v.clone() for k, v in twins.state_dict().items()}
    with pytest.raises(ModelMismatchError, match=r"several name prefixes \('a\.', 'b\.'\)"):
        load_bundle(twins, bundles["dit_w4a8"], progress=False)
    assert all(torch.equal(before[k], v) for k, v in twins.state_dict().items())


def test_report_has_bytes_per_component(client):
    model, bundles = client
    report = load_bundle(copy.deepcopy(model), bundles["full_w4a8"], "full_w4a8", progress=False)
    assert set(report.components) == {"vision", "llm", "expert"}
    assert sum(n for n, _, _ in report.components.values()) == len(report.replaced)
    assert sum(a for _, _, a in report.components.values()) == report.bytes_after
    assert all(a < b for _, b, a in report.components.values())


def test_save_model_of_a_loaded_model_round_trips(client, tmp_path):
    """safetensors.torch.save_model saves a loaded model (every state entry is a tensor) and
    load_model restores it into a model with the same bundle loaded."""
    from safetensors.torch import load_model, save_model

    model, bundles = client
    quantized = copy.deepcopy(model)
    load_bundle(quantized, bundles["dit_w4a8"], "dit_w4a8", progress=False)
    save_model(quantized, str(tmp_path / "q.safetensors"))
    restored = copy.deepcopy(model)
    load_bundle(restored, bundles["dit_w4a8"], "dit_w4a8", progress=False)
    for module in restored.modules():
        if isinstance(module, DuQuantLinear):
            module.bundle_fingerprint = None  # must come back from the file
    load_model(restored, str(tmp_path / "q.safetensors"))
    x = pi05_inputs(batch=1, seed=5)
    assert torch.equal(quantized.components(x)["expert"], restored.components(x)["expert"])
    layers = [m for m in restored.modules() if isinstance(m, DuQuantLinear)]
    assert any(s.kind.name == "tiled_rotate" for m in layers for s in m.stages)
    assert all(m.bundle_fingerprint is not None and m.bundle_name for m in layers)  # act scales can be saved


def test_progress_line_on_request(client, capsys):
    model, bundles = client
    load_bundle(copy.deepcopy(model), bundles["dit_w4a8"], "dit_w4a8", progress=True)
    err = capsys.readouterr().err
    assert "loading dit_w4a8-" in err and "14/14 layers" in err
    load_bundle(copy.deepcopy(model), bundles["dit_w4a8"], "dit_w4a8")  # not a TTY: silent by default
    assert capsys.readouterr().err == ""
