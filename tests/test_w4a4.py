"""W4A4 for the whole policy (full_w4a4, llm_w4a4): per-layer activation modes, the A8 fallback
by measurement on held-out rows, and the refusal without --calib.

A layer kept at A8 is checked against the percentile rule written out here (at qmax 127, on the
whole sample), and a per-step layer's output against its step's row applied by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_pipeline.cli import main
from duquant_pipeline.select import select_layers
from duquant_runtime import DuQuantLinear, StatsError, capture_stats, flow_step, load_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import ConfigError, from_dict, resolve
from duquant_runtime.stats import StatsReader
from torch import nn

HEADS = ("state_proj", "action_in_proj", "action_out_proj", "time_mlp", "multi_modal_projector")


class TwoParts(nn.Module):
    """An "llm" Linear fed once per sample, an "expert" Linear fed once per denoising step."""

    def __init__(self, rng: np.random.Generator, width: int = 64) -> None:
        super().__init__()
        self.llm, self.expert = nn.Module(), nn.Module()
        self.llm.fc = nn.Linear(width, 48, bias=False)
        self.expert.fc = nn.Linear(width, 48, bias=False)
        with torch.no_grad():
            for fc in (self.llm.fc, self.expert.fc):
                fc.weight.copy_(torch.from_numpy(rng.standard_normal((48, width)) / math.sqrt(width)))
            self.llm.fc.weight /= CHANNEL_SIZES  # each channel's share of the output alike


# The llm's input channels span two decades, each undone on the weight's column: a rotation
# mixes a block's small channels under its largest, where no 4-bit grid keeps them (8 bits does).
CHANNEL_SIZES = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(5))]


def _rows(seed: int, tokens: int = 64, width: int = 64, spread: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=g)
    return x * CHANNEL_SIZES if spread else x


def _config(**quant: object):
    return from_dict(
        {
            "name": "two_w4a4",
            "select": {"include": r"\.fc$", "exclude": ""},
            "quant": {"act_bits": 4, "act_mode": "per_channel_static", "act_percentile": 99.0, **quant},
            # one candidate (Hadamard 16): what the fallback measures is the activations' bits
            "transform": {"block_size": 16, "block_search": [], "equalize": [0.0], "rtn_candidate": False},
        }
    )


@pytest.fixture(scope="module")
def two_parts(tmp_path_factory):
    rng = np.random.default_rng(0)
    model = TwoParts(rng).float()
    ckpt = write_checkpoint(
        tmp_path_factory.mktemp("two") / "m.safetensors", {k: v.numpy() for k, v in model.state_dict().items()}
    )
    return ckpt, model


def _capture(model: nn.Module, cfg, path, steps: int = 0):
    from duquant_runtime import attach_clock

    attach_clock(model)
    with torch.no_grad(), capture_stats(model, cfg, sample_rows=256, step_rows=128) as cap:
        for seed in range(4):
            model.llm.fc(_rows(seed, spread=True))
            for k in range(steps):
                with flow_step(model, index=k):
                    model.expert.fc(_rows(100 * (k + 1) + seed))
            if not steps:
                model.expert.fc(_rows(1000 + seed))
    return cap.save(path)


def test_a_layer_under_the_threshold_is_kept_at_a8(two_parts, tmp_path):
    ckpt, model = two_parts
    stats = _capture(model, _config(), tmp_path / "s.h5")
    probe = build_bundle(_config(), ckpt, tmp_path / "probe", calib=stats, jobs=1)  # no fallback
    with BundleReader(probe.path) as reader:
        held = {n: reader.read_layer(n).quality["held_out_sqnr_db"] for n in reader.header.layer_names}
        assert {reader.read_layer(n).act_bits for n in held} == {4}
    assert held["llm.fc"] + 3.0 < held["expert.fc"]  # the spread channels measure far worse at A4
    threshold = (held["llm.fc"] + held["expert.fc"]) / 2
    result = build_bundle(_config(a4_min_sqnr_db=threshold), ckpt, tmp_path / "b", calib=stats, jobs=1)
    with BundleReader(result.path) as reader:
        kept, other = reader.read_layer("llm.fc"), reader.read_layer("expert.fc")
    assert (kept.act_bits, other.act_bits) == (8, 4)
    assert "+a8" in kept.choice and "+a8" not in other.choice
    assert kept.quality["a4_held_out_sqnr_db"] == pytest.approx(held["llm.fc"], abs=1e-3)
    assert "a4_held_out_sqnr_db" not in other.quality
    loaded = TwoParts(np.random.default_rng(0)).float()
    load_bundle(loaded, result.path, _config(a4_min_sqnr_db=threshold))
    fc = loaded.llm.fc
    assert isinstance(fc, DuQuantLinear) and fc.act_bits == 8 and loaded.expert.fc.act_bits == 4
    if kept.act_mode == "per_channel_static":  # static at 8 bits: the percentile rule over qmax 127
        sample = torch.from_numpy(StatsReader(stats).layer("llm.fc").sample).float()
        with torch.no_grad():
            want = torch.quantile(fc.rotate_input(sample).abs(), 0.99, dim=0) / 127.0
        torch.testing.assert_close(fc.act_scale.float(), want.clamp_min(1e-8), rtol=1e-5, atol=1e-8)
    r = CliRunner().invoke(main, ["inspect", str(result.path), "--quality", "0"])
    assert r.exit_code == 0, r.output
    assert (
        f"A8 fallback  {threshold:g} dB held out: 1 layer(s) kept at 8-bit activations" in r.stdout
    )  # no RTN rule set
    assert "  llm.fc (" in r.stdout and "a8 " in r.stdout
    from duquant_pipeline.plot import plot_report
    from duquant_pipeline.report import read_report

    info = read_report(result.path)
    assert info["act_fallback"] and info["act_fallback"][0].startswith("llm.fc (")
    fig = plot_report(info, tmp_path / "q.png")
    crossed = [len(c.get_offsets()) for ax in fig.axes for c in ax.collections if c.get_gid() == "a8"]
    assert crossed == [1]


def test_every_layer_falls_back_under_a_threshold_above_every_figure(two_parts, tmp_path):
    ckpt, model = two_parts
    stats = _capture(model, _config(), tmp_path / "s.h5")
    result = build_bundle(_config(a4_min_sqnr_db=99.0), ckpt, tmp_path, calib=stats, jobs=1)
    with BundleReader(result.path) as reader:
        packs = [reader.read_layer(n) for n in reader.header.layer_names]
    assert {p.act_bits for p in packs} == {8} and all("+a8" in p.choice for p in packs)
    # each chosen again at A8, and measured so: better than its A4 figure
    assert all(p.quality["held_out_sqnr_db"] > p.quality["a4_held_out_sqnr_db"] + 1 for p in packs)


def test_per_step_and_per_channel_layers_in_one_bundle(two_parts, tmp_path):
    """act_mode_by_pattern: the expert per step (a row per step from its own rows), the llm per
    channel; only the per-step layer reads the clock, and its statistics are per step."""
    ckpt, model = two_parts
    cfg = _config(act_mode_by_pattern={r"^expert\.": "per_step_static"}, flow_steps=4)
    stats = _capture(model, cfg, tmp_path / "s.h5", steps=4)
    reader = StatsReader(stats)
    assert "step_tokens" in reader.meta["expert.fc"] and "step_tokens" not in reader.meta["llm.fc"]
    result = build_bundle(cfg, ckpt, tmp_path / "b", calib=stats, jobs=1)
    with BundleReader(result.path) as bundle:
        expert, llm = bundle.read_layer("expert.fc"), bundle.read_layer("llm.fc")
    assert expert.act_mode == "per_step_static" and expert.act_scale.shape == (4, 64)
    assert llm.act_mode in ("per_channel_static", "per_token_dynamic")
    loaded = TwoParts(np.random.default_rng(0)).float()
    from duquant_runtime import attach_clock

    attach_clock(loaded)
    load_bundle(loaded, result.path, cfg)
    assert loaded.expert.fc.step_table is not None and loaded.llm.fc.step_table is None
    with torch.no_grad():
        loaded.llm.fc(_rows(7))  # outside any step: fine for a per-channel layer
        rows = [_rows(9)]
        for k in range(4):
            with flow_step(loaded, index=k):
                out = loaded.expert.fc(rows[0])
            # the row of step k, applied by hand: x_t quantized with that row's scales
            x_t = loaded.expert.fc.rotate_input(rows[0])
            scale = torch.from_numpy(expert.act_scale[k]).float()
            xq = torch.clamp(torch.round(x_t / scale), -8, 7) * scale
            want = xq @ loaded.expert.fc.dequantized_weight(torch.float32).t()
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_patterns_naming_two_modes_for_a_layer_are_refused(two_parts, tmp_path):
    ckpt, _ = two_parts
    cfg = _config(act_mode_by_pattern={"fc": "per_step_static", "llm": "per_token_dynamic"})
    with pytest.raises(ConfigError, match="several modes"):
        build_bundle(cfg, ckpt, tmp_path, jobs=1)


@pytest.mark.parametrize("preset", ["full_w4a4", "llm_w4a4"])
def test_w4a4_presets_refuse_a_build_without_calib(preset, demo_ckpt, tmp_path):
    with pytest.raises(StatsError, match=rf"capture_stats\(model, '{preset}'\)"):
        build_bundle(resolve(preset), demo_ckpt, tmp_path, jobs=1)
    r = CliRunner().invoke(main, ["build", "-c", preset, "--ckpt", str(demo_ckpt), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "quant.a4_min_sqnr_db" in r.output and "--calib" in r.output and "capture_stats" in r.output
    assert not list(tmp_path.rglob("*.h5"))


def test_full_w4a4_selects_the_policy_but_its_heads_and_runs_the_expert_per_step(demo_ckpt):
    from duquant_pipeline.checkpoint import Checkpoint

    cfg = resolve("full_w4a4")
    layers = select_layers(cfg, Checkpoint.open(demo_ckpt))
    names = [la.name for la in layers]
    assert not [n for n in names if any(h in n for h in HEADS)]
    tables = [la for la in layers if la.kind == "embedding"]
    assert [t.name for t in tables] == ["paligemma_with_expert.paligemma.model.language_model.embed_tokens"]
    assert cfg.embed.bits == 8
    modes = {la.name.split(".")[1] if "gemma_expert" in la.name else la.name.split(".")[3]: set() for la in layers}
    for la in layers:
        part = la.name.split(".")[1] if "gemma_expert" in la.name else la.name.split(".")[3]
        modes[part].add(cfg.quant.mode_for(la.name))
    assert modes == {
        "gemma_expert": {"per_step_static"},
        "language_model": {"per_token_dynamic"},
        "vision_tower": {"per_token_dynamic"},
    }
    assert cfg.quant.act_bits == 4 and cfg.quant.a4_min_sqnr_db > 0 and cfg.quant.gptq


@pytest.mark.parametrize("margin", [0.0, 20.0])
def test_a_layer_under_rtn_w4a8_is_kept_at_a8(two_parts, tmp_path, margin):
    """quant.a4_vs_rtn_w4a8: the floor is also plain round-to-nearest W4A8 of the layer (per-row
    absmax weights, per-token int8 activations, no transform) on the same rows, written out here,
    plus quant.a4_rtn_margin_db."""
    ckpt, model = two_parts
    stats = _capture(model, _config(), tmp_path / "s.h5")
    config = _config(a4_min_sqnr_db=0.1, a4_vs_rtn_w4a8=True, a4_rtn_margin_db=margin)
    result = build_bundle(config, ckpt, tmp_path, calib=stats, jobs=1)
    x = torch.from_numpy(StatsReader(stats).layer("expert.fc").sample).double()
    w = model.expert.fc.weight.detach().double()
    w_scale = w.abs().amax(dim=1, keepdim=True) / 7.0
    w_q = torch.clamp(torch.round(w / w_scale), -8, 7) * w_scale
    x_scale = x.abs().amax(dim=1, keepdim=True) / 127.0
    x_q = torch.clamp(torch.round(x / x_scale), -128, 127) * x_scale
    ref = x @ w.t()
    rtn = 10.0 * math.log10(float(ref.square().sum()) / float((x_q @ w_q.t() - ref).square().sum()))
    with BundleReader(result.path) as reader:
        expert = reader.read_layer("expert.fc")
    assert expert.quality["rtn_w4a8_held_out_sqnr_db"] == pytest.approx(rtn, abs=0.01)
    a4 = expert.quality.get("a4_held_out_sqnr_db", expert.quality["held_out_sqnr_db"])
    assert (expert.act_bits == 8) == (a4 < rtn + margin)
    if margin > 10:  # far over what A4 reaches here
        assert expert.act_bits == 8 and "+a8" in expert.choice


def test_build_prints_the_layers_kept_at_a8(two_parts, tmp_path):
    ckpt, model = two_parts
    stats = _capture(model, _config(), tmp_path / "s.h5")
    toml = tmp_path / "two_w4a4.toml"
    toml.write_text(
        'name = "two_w4a4"\n[select]\ninclude = \'\\.fc$\'\nexclude = ""\n'
        '[quant]\nact_bits = 4\nact_mode = "per_channel_static"\nact_percentile = 99.0\na4_min_sqnr_db = 99.0\n'
        "[transform]\nblock_size = 16\nblock_search = []\nequalize = [0.0]\nrtn_candidate = false\n"
    )
    args = ["build", "-c", str(toml), "--ckpt", str(ckpt), "--calib", str(stats), "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "A8 fallback: 2 of 2 layers kept at 8-bit activations (held-out SQNR under 99 dB at A4): " in r.stderr
    assert "expert.fc, llm.fc" in r.stderr


def test_a_config_whose_per_step_pattern_selects_nothing_needs_no_clock(two_parts, tmp_path):
    """llm_w4a4 inherits full_w4a4's expert pattern but selects no expert layer: neither the
    capture nor the load asks for a step clock."""
    ckpt, _ = two_parts
    model = TwoParts(np.random.default_rng(0)).float()  # no clock attached
    cfg = _config(act_mode_by_pattern={r"^nothing\.": "per_step_static"}, a4_min_sqnr_db=1.0)
    assert cfg.quant.per_step
    with torch.no_grad(), capture_stats(model, cfg, sample_rows=64) as cap:
        for seed in range(2):
            model.llm.fc(_rows(seed))
            model.expert.fc(_rows(10 + seed))
    stats = cap.save(tmp_path / "s.h5")
    result = build_bundle(cfg, ckpt, tmp_path, calib=stats, jobs=1)
    fresh = TwoParts(np.random.default_rng(0)).float()
    load_bundle(fresh, result.path, cfg)
    assert fresh.llm.fc.step_table is None and fresh.expert.fc.step_table is None
