"""Per-step static activation scales (``quant.act_mode = "per_step_static"``): the step comes from
the flow time given to ``denoise_step`` on openpi's and LeRobot's real call signatures and loops
(``flow_standin.py``); every path that could fall back silently raises instead.

Scales are checked against a reference computed here: per step, each layer's inputs recorded
with a hook, moved to the layer's transformed basis, then ``torch.quantile`` over the rows.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from duquant_pipeline.build import build_bundle
from duquant_runtime import (
    AlreadyCalibratedError,
    DuQuantError,
    NoStepError,
    NotCalibratedError,
    StatsError,
    StepOutOfTableError,
    UnknownFlowTimeError,
    calibrate,
    capture_stats,
    flow_step,
    instrument,
    load_bundle,
    save_act_scales,
)
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import load_toml
from duquant_runtime.flowsteps import StepClock, StepTable
from flow_standin import PER_STEP_CONFIG, LeRobotPolicy, OpenpiStandIn, flow_inputs
from safetensors.torch import save_model

LAYERS = ("gemma_expert.fc1", "gemma_expert.fc2")
CALIB_SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("flowsteps")
    (out / "per_step.toml").write_text(PER_STEP_CONFIG)
    config = load_toml(out / "per_step.toml")
    float_model = OpenpiStandIn().eval()
    save_model(float_model, str(out / "model.safetensors"))
    model = copy.deepcopy(float_model)
    instrument(model)
    with capture_stats(model, config, step_rows=512) as stats:
        for seed in CALIB_SEEDS:
            model.sample_actions(*flow_inputs(seed=seed))
    stats.save(out / "stats.h5")
    calibrated = build_bundle(config, out / "model.safetensors", out / "built", jobs=1, calib=out / "stats.h5")
    bare = build_bundle(config, out / "model.safetensors", out / "bare", jobs=1)
    return {"out": out, "config": config, "float": float_model, "calib": calibrated.path, "bare": bare.path}


def _loaded(setup: dict, bundle: str = "calib") -> OpenpiStandIn:
    model = copy.deepcopy(setup["float"])
    instrument(model)
    load_bundle(model, setup[bundle], expect_config=setup["config"])
    return model


def _inputs_per_step(model: OpenpiStandIn, seeds: tuple[int, ...], num_steps: int = 10) -> dict[str, list[list]]:
    """Each layer's inputs, per call of denoise_step in order (the k-th call is step k)."""
    modules = dict(model.named_modules())
    seen: dict[str, list[list]] = {n: [[] for _ in range(num_steps)] for n in LAYERS}
    calls = {"n": 0}
    original = type(model).denoise_step

    def counting(self, *args):
        out = original(self, *args)
        calls["n"] += 1
        return out

    hooks = [
        modules[n].register_forward_pre_hook(
            lambda _m, a, n=n: seen[n][calls["n"] % num_steps].append(a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for n in LAYERS
    ]
    model.denoise_step = counting.__get__(model)
    try:
        for seed in seeds:
            model.sample_actions(*flow_inputs(seed=seed), num_steps=num_steps)
    finally:
        for h in hooks:
            h.remove()
        del model.denoise_step
    return seen


def test_openpi_float32_times_each_find_their_own_step() -> None:
    table = StepTable(10, StepClock())
    time, dt, found = torch.tensor(1.0), torch.tensor(-0.1), []
    while time >= -dt / 2:  # openpi's accumulation: 0.9, 0.8, ... drift in float32
        found.append(table.index_of(float(time), "layer"))
        time += dt
    assert found == list(range(10))
    with pytest.raises(UnknownFlowTimeError, match=r"flow time 0\.95"):
        table.index_of(0.95, "layer")


def test_the_bundle_holds_one_scale_row_per_step_from_each_steps_inputs(setup: dict) -> None:
    """Build --calib: act_scale [10, in], row k = 99th percentile of |x_t| at step k / 127."""
    loaded = _loaded(setup)
    seen = _inputs_per_step(copy.deepcopy(setup["float"]), CALIB_SEEDS)
    with BundleReader(setup["calib"]) as reader:
        for name in LAYERS:
            stored = reader.read_layer(name).act_scale
            layer = dict(loaded.named_modules())[name]
            assert stored.shape == (10, layer.in_features)
            for step in range(10):
                x_t = layer.rotate_input(torch.cat(seen[name][step]).double()).abs()
                want = torch.quantile(x_t, 0.99, dim=0) / 127
                np.testing.assert_allclose(stored[step], want.float().numpy(), rtol=1e-4, atol=1e-7)
            rows = torch.from_numpy(stored)
            assert (rows.amax(0) / rows.amin(0)).max() > 2  # the steps really differ


def test_each_step_quantizes_with_its_own_row(setup: dict) -> None:
    """The loaded model's actions equal a reference applying row k by hand at step k."""
    loaded = _loaded(setup)
    context, noise = flow_inputs(seed=7)
    got = loaded.sample_actions(context, noise)
    layers = [dict(loaded.named_modules())[n] for n in LAYERS]
    x_t, time, dt = noise, torch.tensor(1.0), torch.tensor(-0.1)
    for step in range(10):  # openpi's float32 times, each step's row named by index
        with flow_step(loaded, index=step):
            v_t = loaded.velocity(context, x_t, time.expand(noise.shape[0]))
        x_t, time = x_t + dt * v_t, time + dt
    torch.testing.assert_close(got, x_t, rtol=1e-4, atol=1e-5)
    with flow_step(loaded, index=0):
        row0 = layers[0](torch.ones(2, 32))
    with flow_step(loaded, index=9):
        row9 = layers[0](torch.ones(2, 32))
    assert not torch.equal(row0, row9)  # the row matters: a fallback to one table would tie them


def test_a_repeated_call_at_one_time_uses_the_same_row(setup: dict) -> None:
    loaded = _loaded(setup)
    context, noise = flow_inputs(seed=3)
    t = torch.full((noise.shape[0],), 0.7)
    first = loaded.denoise_step(None, None, context, noise, t)
    again = loaded.denoise_step(None, None, context, noise, t)
    with flow_step(loaded, index=3):
        by_index = loaded.velocity(context, noise, t)
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, by_index)


def test_a_layer_called_outside_a_step_names_itself(setup: dict) -> None:
    loaded = _loaded(setup)
    with pytest.raises(NoStepError, match=r"gemma_expert\.fc1") as caught:
        loaded.gemma_expert.fc1(torch.randn(2, 32))
    assert caught.value.layer == "gemma_expert.fc1"


def test_another_number_of_steps_is_an_unknown_flow_time(setup: dict) -> None:
    loaded = _loaded(setup)
    with pytest.raises(UnknownFlowTimeError, match=r"gemma_expert.fc1: flow time 0.95") as caught:
        loaded.sample_actions(*flow_inputs(seed=1), num_steps=20)
    assert caught.value.step == pytest.approx(0.95)


def test_a_step_beyond_the_table_is_refused(setup: dict) -> None:
    loaded = _loaded(setup)
    with flow_step(loaded, index=10), pytest.raises(StepOutOfTableError, match="step 10 is outside") as caught:
        loaded.gemma_expert.fc2(torch.randn(2, 64))
    assert (caught.value.layer, caught.value.step) == ("gemma_expert.fc2", 10)


def test_a_model_without_instrumentation_is_refused_at_load_untouched(setup: dict) -> None:
    model = copy.deepcopy(setup["float"])
    with pytest.raises(NoStepError, match=r"not instrumented: call duquant_runtime\.instrument"):
        load_bundle(model, setup["calib"])
    assert type(model.gemma_expert.fc1) is torch.nn.Linear


def test_capture_on_a_model_without_instrumentation_is_refused(setup: dict) -> None:
    model = copy.deepcopy(setup["float"])
    with pytest.raises(NoStepError, match="not instrumented"), capture_stats(model, setup["config"]):
        pass


def test_a_capture_missing_a_step_refuses_to_save(setup: dict, tmp_path: Path) -> None:
    model = copy.deepcopy(setup["float"])
    instrument(model)
    with capture_stats(model, setup["config"]) as stats:
        model.sample_actions(*flow_inputs(seed=0), num_steps=5)  # t = 1, 0.8, ...: steps 1, 3, ... never run
    with pytest.raises(StatsError, match=r"no rows at denoising step 1 \(flow time 0.9\)"):
        stats.save(tmp_path / "stats.h5")
    assert not (tmp_path / "stats.h5").exists()


def test_a_capture_a_layer_never_saw_refuses_to_save(setup: dict, tmp_path: Path) -> None:
    model = copy.deepcopy(setup["float"])
    instrument(model)
    with capture_stats(model, setup["config"]) as stats:
        pass
    with pytest.raises(StatsError, match="saw no input"):
        stats.save(tmp_path / "stats.h5")


def test_statistics_without_steps_are_refused_by_a_per_step_build(setup: dict, tmp_path: Path) -> None:
    flat = setup["config"].replace("quant", act_mode="per_channel_static")
    model = copy.deepcopy(setup["float"])
    with capture_stats(model, flat) as stats:
        model.sample_actions(*flow_inputs(seed=0))
    stats.save(tmp_path / "flat.h5")
    with pytest.raises(StatsError, match="holds no denoising steps"):
        build_bundle(setup["config"], setup["out"] / "model.safetensors", tmp_path, jobs=1, calib=tmp_path / "flat.h5")


def test_runtime_calibration_fills_every_step_and_round_trips(setup: dict, tmp_path: Path) -> None:
    """A bundle built without --calib: calibrate() over the instrumented loop gives the
    reference's rows (the largest of the per-batch percentiles over calib_steps batches)."""
    loaded = _loaded(setup, "bare")
    fc1 = loaded.gemma_expert.fc1
    seen: list[torch.Tensor] = []  # fc1's inputs in call order: call k of each loop is step k
    hook = fc1.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, 32)))
    with calibrate(loaded):
        for seed in CALIB_SEEDS:
            loaded.sample_actions(*flow_inputs(seed=seed))
    hook.remove()
    assert len(seen) == 10 * len(CALIB_SEEDS)
    for step in range(10):
        per_batch = [torch.quantile(fc1.rotate_input(x.double()).abs(), 0.99, dim=0) for x in seen[step::10]]
        want = torch.stack(per_batch).amax(0) / 127
        np.testing.assert_allclose(fc1.act_scale[step].numpy(), want.numpy(), rtol=1e-4)
    saved = save_act_scales(loaded, tmp_path / "scales.h5")
    again = copy.deepcopy(setup["float"])
    instrument(again)
    load_bundle(again, setup["bare"], act_scales=saved)
    torch.testing.assert_close(again.gemma_expert.fc2.act_scale, loaded.gemma_expert.fc2.act_scale)


def test_calibration_missing_a_step_is_refused(setup: dict) -> None:
    loaded = _loaded(setup, "bare")
    missing = r"saw no batch at denoising step 1 \(flow time 0.9\)"
    with pytest.raises(DuQuantError, match=missing), calibrate(loaded):
        loaded.sample_actions(*flow_inputs(seed=0), num_steps=5)


def test_lerobot_policy_is_instrumented_through_its_model(setup: dict) -> None:
    """LeRobot calls denoise_step by keyword on policy.model; the bundle's names carry no prefix."""
    policy = LeRobotPolicy()
    policy.model.load_state_dict(setup["float"].state_dict())
    reference = copy.deepcopy(policy)
    clock = instrument(policy)
    assert instrument(policy.model) is clock  # one clock, found again
    report = load_bundle(policy, setup["calib"])
    assert report.prefix == "model."
    fc2 = policy.model.gemma_expert.fc2
    rows: list[int] = []
    fc2.register_forward_pre_hook(lambda layer, _a: rows.append(layer.step_table.row("fc2")))
    context, noise = flow_inputs(seed=5)
    got = policy.model.sample_actions(context, noise)
    assert rows == list(range(10))
    want = reference.model.sample_actions(context, noise)
    assert 0 < float((got - want).norm() / want.norm()) < 0.2


def test_a_batch_of_mixed_flow_times_is_refused(setup: dict) -> None:
    loaded = _loaded(setup)
    context, noise = flow_inputs(seed=3)
    with pytest.raises(DuQuantError, match="different flow times across the batch"):
        loaded.denoise_step(None, None, context, noise, torch.tensor([1.0, 0.9, 0.9]))


def test_instrument_names_a_missing_method_or_argument() -> None:
    with pytest.raises(DuQuantError, match="has a method 'denoise'"):
        instrument(OpenpiStandIn(), method="denoise")
    with pytest.raises(DuQuantError, match="no argument 't'"):
        instrument(OpenpiStandIn(), timestep_arg="t")


def test_a_compiled_layer_follows_the_step_and_still_refuses(setup: dict) -> None:
    """torch.compile guards on the clock: each step gets its own row, no stale graph reuses one."""
    loaded = _loaded(setup)
    layer = loaded.gemma_expert.fc1
    compiled = torch.compile(layer, backend="eager")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    for step in (0, 9, 0):
        with flow_step(loaded, index=step):
            torch.testing.assert_close(compiled(x), layer(x))
    with pytest.raises(NoStepError):
        compiled(x)


# ---------------------------------------------------------------- issue 40: what a new user met


def test_an_uncalibrated_per_step_bundle_names_the_layer_its_mode_and_the_fix(setup: dict) -> None:
    loaded = _loaded(setup, "bare")
    with pytest.raises(NotCalibratedError) as caught:
        loaded.sample_actions(*flow_inputs(seed=0))
    assert str(caught.value) == (
        "layer gemma_expert.fc1 uses per-step static activation scales (quant.act_mode = 'per_step_static') and "
        "has none yet: call duquant_runtime.calibrate(model) over the denoising loop (the model instrumented) "
        "before the first forward, pass act_scales= to load_bundle, or build the bundle with --calib"
    )
    assert caught.value.layer == "gemma_expert.fc1"
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # one exception, not a chain


def test_build_and_inspect_say_a_bundle_without_scales_needs_calibrate(setup: dict, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from duquant_pipeline.cli import main

    needed = (
        "no activation scales (quant.act_mode = 'per_step_static', built without --calib): call "
        "duquant_runtime.calibrate(model) over the denoising loop (after instrument(model) and load_bundle) "
        "before the first forward, or build with --calib STATS.h5"
    )
    config, ckpt = setup["out"] / "per_step.toml", setup["out"] / "model.safetensors"
    built = CliRunner().invoke(main, ["build", "-c", str(config), "--ckpt", str(ckpt), "--out", str(tmp_path), "-q"])
    assert built.exit_code == 0, built.stderr
    assert built.stderr.splitlines()[-1] == f"note: this bundle holds {needed}"
    shown = CliRunner().invoke(main, ["inspect", built.stdout.strip()])
    assert f"calibration  {needed}" in shown.stdout.splitlines()
    calibrated = CliRunner().invoke(main, ["inspect", str(setup["calib"])])
    assert "no activation scales" not in calibrated.stdout
    again = [
        "build",
        "-c",
        str(config),
        "--ckpt",
        str(ckpt),
        "--out",
        str(tmp_path),
        "--calib",
        str(setup["out"] / "stats.h5"),
    ]
    with_calib = CliRunner().invoke(main, [*again, "-q"])
    assert with_calib.exit_code == 0 and "calibrate" not in with_calib.stderr


def test_capture_stats_on_a_quantized_model_says_so(setup: dict) -> None:
    loaded = _loaded(setup)
    with pytest.raises(StatsError) as caught, capture_stats(loaded, setup["config"]):
        pass
    assert str(caught.value) == (
        "this model holds a bundle already (2 of the 2 layers config 'per_step' selects are DuQuantLinear, e.g. "
        "gemma_expert.fc1): capture statistics on the float model, before load_bundle"
    )


def test_a_capture_on_a_shorter_loop_says_how_many_steps_ran(setup: dict, tmp_path: Path) -> None:
    model = copy.deepcopy(setup["float"])
    instrument(model)
    twenty = setup["config"].replace("quant", flow_steps=20)
    with capture_stats(model, twenty) as stats:
        model.sample_actions(*flow_inputs(seed=0), num_steps=10)
    with pytest.raises(StatsError) as caught:
        stats.save(tmp_path / "stats.h5")
    assert str(caught.value).endswith(
        "inside capture_stats (e.g. gemma_expert.fc1): the loop ran 10 steps; this config has flow_steps = 20: "
        "run the loop with 20 steps, or capture with quant.flow_steps = 10"
    )


def test_calibrating_on_another_number_of_steps_says_so_without_calibrated_at(setup: dict) -> None:
    loaded = _loaded(setup, "bare")
    with pytest.raises(DuQuantError) as shorter, calibrate(loaded):
        loaded.sample_actions(*flow_inputs(seed=0), num_steps=5)
    assert str(shorter.value).endswith(
        "the loop ran 5 steps; this bundle has flow_steps = 10: run the loop with 10 steps, or build it with "
        "quant.flow_steps = 5"
    )
    with pytest.raises(UnknownFlowTimeError) as longer, calibrate(loaded):
        loaded.sample_actions(*flow_inputs(seed=0), num_steps=20)
    assert "calibrated at" not in str(longer.value)
    assert str(longer.value).startswith("layer gemma_expert.fc1: flow time 0.95 is none of the 10 flow times")
    assert "the denoising loop runs another number of steps than quant.flow_steps = 10" in str(longer.value)
    assert not loaded.gemma_expert.fc1.act_calibrated  # nothing frozen


def test_calibrate_refuses_to_replace_scales_unless_asked(setup: dict) -> None:
    loaded = _loaded(setup)  # built with --calib: the scales came with the bundle
    stored = loaded.gemma_expert.fc1.act_scale.clone()
    with pytest.raises(AlreadyCalibratedError) as caught, calibrate(loaded):
        pytest.fail("the block must not run")
    assert str(caught.value) == (
        "calibrate(): 2 of 2 static layer(s) hold activation scales already (e.g. gemma_expert.fc1: from a bundle "
        "built with --calib, act_scales= or an earlier calibrate()); pass calibrate(model, overwrite=True) to "
        "replace them"
    )
    torch.testing.assert_close(loaded.gemma_expert.fc1.act_scale, stored)
    with calibrate(loaded, overwrite=True):
        loaded.sample_actions(*flow_inputs(seed=9))
    assert not torch.equal(loaded.gemma_expert.fc1.act_scale, stored)
