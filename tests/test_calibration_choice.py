"""Runtime calibration never loses to the per-token dynamic bundle it starts from.

* static scales combine batches by their largest percentile (a mean clipped every larger batch);
* a layer keeps its static scales only where they beat per-token scales on held-out calibration
  rows; otherwise it quantizes per token, and that choice is saved and reloaded with the scales;
* on the demo's expert (its adaptive norms' Linears read one conditioning row per sample, which
  is what made a mean of percentiles clip), the calibrated static bundle's error on inputs of
  seeds the calibration never saw is at most the dynamic bundle's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from duquant_pipeline.build import build_bundle
from duquant_pipeline.demo_model import component_inputs, load_demo_model
from duquant_runtime import calibrate, load_bundle, save_act_scales
from duquant_runtime.actquant import StaticScaleObserver
from duquant_runtime.calibration import static_layers
from duquant_runtime.config import resolve

CALIB_SEEDS, EVAL_SEEDS = range(1, 9), (0, 100, 101)


def test_batches_combine_by_their_largest_percentile():
    rule = StaticScaleObserver(100.0, 8)
    rule.observe(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))
    rule.observe(torch.tensor([[-4.0, 0.5]]))
    torch.testing.assert_close(rule.scales(), torch.tensor([4.0, 2.0]) / 127)


@pytest.fixture(scope="module")
def expert(demo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo's expert (its adaptive norms' dense Linears included, at 8 bits) as full_w4a8 builds
    it, per token and static (uncalibrated), and the float model."""
    out = tmp_path_factory.mktemp("expert")
    base = (
        resolve("full_w4a8").replace("select", scope="paligemma_with_expert.gemma_expert.").replace("embed", include="")
    )
    dynamic = build_bundle(base.replace(name="expert_dynamic"), demo_ckpt, out, jobs=1).path
    static_cfg = base.replace(name="expert_static").replace("quant", act_mode="per_channel_static")
    static = build_bundle(static_cfg, demo_ckpt, out, jobs=1).path
    return {"float": load_demo_model(demo_ckpt), "dynamic": dynamic, "static": static, "out": out}


def _expert_error(model: torch.nn.Module, float_model: torch.nn.Module) -> float:
    errs = []
    with torch.no_grad():
        for seed in EVAL_SEEDS:
            args = component_inputs(float_model.dims, seed=seed)["expert"]
            want = float_model.expert(*args)
            errs.append(float((model.expert(*args) - want).norm() / want.norm()))
    return sum(errs) / len(errs)


def _calibrated(expert: dict) -> torch.nn.Module:
    model = copy.deepcopy(expert["float"])
    load_bundle(model, expert["static"])
    with torch.no_grad(), calibrate(model, steps=len(CALIB_SEEDS)):
        for seed in CALIB_SEEDS:
            model.expert(*component_inputs(model.dims, seed=seed)["expert"])
    return model


def test_calibrated_static_is_never_worse_than_the_dynamic_bundle(expert: dict):
    dynamic = copy.deepcopy(expert["float"])
    load_bundle(dynamic, expert["dynamic"])
    calibrated = _calibrated(expert)
    assert _expert_error(calibrated, expert["float"]) <= _expert_error(dynamic, expert["float"]) * (1 + 1e-6)
    layers = static_layers(calibrated)
    dense = [layer for name, layer in layers.items() if name.endswith(".dense")]
    assert dense and all(layer.act_per_token for layer in dense)  # their conditioning rows vary per sample
    # Without the per-layer choice the static scales lose: the choice is what holds the line
    for layer in layers.values():
        layer.act_per_token = False
    assert _expert_error(calibrated, expert["float"]) > _expert_error(dynamic, expert["float"]) * 1.05


def test_the_choice_is_saved_and_reloaded_with_the_scales(expert: dict, tmp_path: Path):
    calibrated = _calibrated(expert)
    chosen = {n: layer.act_per_token for n, layer in static_layers(calibrated).items()}
    assert any(chosen.values())
    path = save_act_scales(calibrated, tmp_path / "scales.h5")
    reloaded = copy.deepcopy(expert["float"])
    load_bundle(reloaded, expert["static"], act_scales=path)
    assert {n: layer.act_per_token for n, layer in static_layers(reloaded).items()} == chosen
    args = component_inputs(reloaded.dims, seed=0)["expert"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.expert(*args), calibrated.expert(*args))
