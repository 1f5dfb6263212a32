"""Per-step bundles under torch.compile, as openpi runs them: ``PI0Pytorch.__init__`` wraps
``sample_actions`` in ``torch.compile`` before anything else touches the model, and its loop is
``while time >= -dt / 2`` on tensors (``flow_standin.OpenpiStandIn`` copies it).

A per-step bundle must compile as the float model does: no extra graph, no extra graph break,
nothing compiled again on the second call, the same actions as eager (within what a per-token
dynamic bundle, which has no step state, gets). Counts come from dynamo's own counters, and the
eager backend is checked as well as inductor (what openpi's modes use).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from duquant_pipeline.build import build_bundle
from duquant_runtime import UnknownFlowTimeError, capture_stats, instrument, load_bundle
from flow_standin import OpenpiStandIn, flow_inputs, standin_bundles
from torch._dynamo.utils import counters

BACKENDS = ("eager", "inductor")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return standin_bundles(tmp_path_factory.mktemp("compile"))


def _model(bundles: dict, kind: str, compile_with: str | None) -> OpenpiStandIn:
    """The stand-in as openpi builds it: sample_actions compiled first, then instrumented and loaded."""
    model = copy.deepcopy(bundles["float"])
    if compile_with is not None:
        model.sample_actions = torch.compile(model.sample_actions, backend=compile_with)
    if kind != "float":
        instrument(model)
        load_bundle(model, bundles["paths"][kind], expect_config=bundles["configs"][kind])
    return model


def _compiled_calls(model: OpenpiStandIn, calls: int = 2) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """(unique graphs, graph breaks) after each call, and the last call's actions."""
    torch._dynamo.reset()
    counters.clear()
    seen = []
    for _ in range(calls):
        actions = model.sample_actions(*flow_inputs(seed=11))
        seen.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    return seen, actions


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_per_step_bundle_compiles_as_the_float_model(bundles: dict, backend: str) -> None:
    float_counts, _ = _compiled_calls(_model(bundles, "float", backend))
    counts, gaps = {}, {}
    for kind in ("dynamic", "per_step"):
        counts[kind], actions = _compiled_calls(_model(bundles, kind, backend))
        gaps[kind] = _rel(actions, _model(bundles, kind, None).sample_actions(*flow_inputs(seed=11)))
    assert float_counts[0] == float_counts[1]  # the float model itself compiles once
    assert counts["per_step"] == float_counts, "the per-step bundle added graphs or graph breaks, or recompiled"
    assert counts["dynamic"] == float_counts
    # Compiled arithmetic may round an activation across a code boundary now and then; the
    # per-step layers may differ from eager by no more than the dynamic ones do.
    assert gaps["per_step"] <= max(gaps["dynamic"], 1e-5), gaps


def test_denoise_step_compiles_fullgraph_once_for_every_step(bundles: dict) -> None:
    """``torch.compile(denoise_step, fullgraph=True)`` on the instrumented model (two input widths,
    32 and 64): one graph serves all ten steps, each with its own row, as eager."""
    model = _model(bundles, "per_step", None)
    eager = _model(bundles, "per_step", None)
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(model.denoise_step, fullgraph=True, backend="eager")
    context, x_t = flow_inputs(seed=5)
    time, dt = torch.tensor(1.0), torch.tensor(-0.1)
    with torch.no_grad():  # as openpi's sample_actions
        while time >= -dt / 2:
            t = time.expand(x_t.shape[0])
            got = step(None, None, context, x_t, t)
            torch.testing.assert_close(got, eager.denoise_step(None, None, context, x_t, t), rtol=1e-5, atol=1e-6)
            x_t, time = x_t + dt * got, time + dt
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_an_off_schedule_time_still_stops_a_compiled_loop(bundles: dict) -> None:
    """Eagerly the first per-step layer names itself and the time; compiled, the step's
    assertion (no graph break, no host sync) stops the run with the schedule in its message."""
    eager = _model(bundles, "per_step", None)
    with pytest.raises(UnknownFlowTimeError, match=r"gemma_expert\.fc1: flow time 0\.95"):
        eager.sample_actions(*flow_inputs(seed=1), num_steps=20)
    compiled = _model(bundles, "per_step", "eager")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match=r"none of the 10 steps its per-step activation scales"):
        compiled.sample_actions(*flow_inputs(seed=1), num_steps=20)


def test_a_mixed_batch_of_times_stops_a_compiled_step(bundles: dict) -> None:
    model = _model(bundles, "per_step", None)
    torch._dynamo.reset()
    step: Callable = torch.compile(model.denoise_step, fullgraph=True, backend="eager")
    context, x_t = flow_inputs(seed=2)
    with torch.no_grad():
        step(None, None, context, x_t, torch.full((3,), 0.9))
        with pytest.raises(RuntimeError, match="different flow times across the batch"):
            step(None, None, context, x_t, torch.tensor([0.9, 0.8, 0.9]))


def test_the_clock_is_unset_after_a_compiled_loop(bundles: dict, tmp_path: Path) -> None:
    """The compiled loop's clock writes are replayed after the graph: outside a step, a layer
    still refuses to run (no stale step left set by a graph)."""
    from duquant_runtime import NoStepError

    model = _model(bundles, "per_step", "eager")
    torch._dynamo.reset()
    model.sample_actions(*flow_inputs(seed=3))
    with pytest.raises(NoStepError):
        model.gemma_expert.fc1(torch.randn(2, 32))


def test_capture_and_calibration_run_eagerly_inside_a_compiled_policy(bundles: dict, tmp_path: Path) -> None:
    """openpi's policy is compiled before the user captures statistics or calibrates: both see
    every step's call (as on an eager copy), and the policy compiles again afterwards."""
    from duquant_runtime import calibrate
    from duquant_runtime.stats import StatsReader

    config = bundles["configs"]["per_step"]
    paths = {}
    for label, compile_with in (("eager", None), ("compiled", "eager")):
        model = _model(bundles, "float", compile_with)
        instrument(model)
        with capture_stats(model, config) as stats:
            model.sample_actions(*flow_inputs(seed=0))
        paths[label] = stats.save(tmp_path / f"{label}.h5")
    eager, compiled = (StatsReader(paths[k]).layer("gemma_expert.fc1") for k in ("eager", "compiled"))
    torch.testing.assert_close(torch.from_numpy(compiled.step_sample), torch.from_numpy(eager.step_sample))
    bare = build_bundle(config, bundles["checkpoint"], tmp_path, jobs=1)
    scales = {}
    for label, compile_with in (("eager", None), ("compiled", "eager")):
        model = copy.deepcopy(bundles["float"])
        if compile_with:
            model.sample_actions = torch.compile(model.sample_actions, backend=compile_with)
        instrument(model)
        load_bundle(model, bare.path)
        with calibrate(model):
            for seed in range(4):
                model.sample_actions(*flow_inputs(seed=seed))
        scales[label] = model.gemma_expert.fc2.act_scale.clone()
    torch.testing.assert_close(scales["compiled"], scales["eager"])
    torch._dynamo.reset()
    counters.clear()
    model.sample_actions(*flow_inputs(seed=1))  # the stance is back: it compiles
    assert counters["stats"]["unique_graphs"] > 0
