"""`duquant-packs list-layers`, `configs`, `demo-checkpoint` and `demo-stats`: the commands about a build's
inputs (what a config selects in a checkpoint, the presets, the demo checkpoint)."""

from __future__ import annotations

import sys

import click
from duquant_runtime.config import EmbedConfig, QuantConfig, SelectConfig, preset_names, resolve

from .cli_common import checkpoint_option, config_option, env_option, friendly, load_config, prefix_note
from .demo_specs import MODELS
from .report import human


@click.command("list-layers")
@config_option
@checkpoint_option
@env_option
@friendly
def list_layers(config: str, checkpoint: str, use_env: bool) -> None:
    """Dry run: print every layer the config selects, with its shape and bits, and the total."""
    from .checkpoint import Checkpoint
    from .select import build_notes, select_layers

    cfg = load_config(config, use_env)
    ckpt = Checkpoint.open(checkpoint)
    layers = select_layers(cfg, ckpt)
    width = max(len(la.name) for la in layers)
    for la in layers:
        click.echo(f"{la.name:<{width}}  {la.out_features:>6} x {la.in_features:<6}  w{la.bits}  {la.dtype}")
    total = sum(la.weight_bytes for la in layers)
    click.echo(
        f"{len(layers)} layers selected by {cfg.name} ({human(total)} of weights){prefix_note(layers[0].prefix)}"
    )
    for note in build_notes(cfg, ckpt, layers):
        click.echo(note, err=True)


@click.command()
def configs() -> None:
    """List the preset configs and what each one selects."""
    from .recipe import describe

    for name in preset_names():
        cfg = resolve(name)
        t = cfg.transform
        click.echo(
            f"{name:<16} scope={cfg.select.scope!r:<58} w{cfg.quant.weight_bits}a{cfg.quant.act_bits}"
            f"{_act_note(cfg.quant)} block={t.block_size} permute={int(t.permute)} row_rot={t.row_rot} "
            f"{describe(cfg)}{_selection_note(cfg.select)}{_embed_note(cfg.embed)}"
        )


def _act_note(quant: QuantConfig) -> str:
    """The activation scales, where they are static: they need calibration before a forward;
    the modes given by pattern, and the A8 fallback."""
    if not quant.act_bits:
        return ""
    modes = {
        "per_step_static": f"per-step static, {quant.flow_steps} steps",
        "per_channel_static": "per-channel static",
        "per_token_dynamic": "per-token dynamic",
    }
    parts = [modes[quant.act_mode]] + [f"{modes[m]} on {p!r}" for p, m in quant.act_mode_by_pattern]
    if quant.a4_min_sqnr_db:
        return f" ({'; '.join(parts)}; A8 under {quant.a4_min_sqnr_db:g} dB held out: needs build --calib)"
    if quant.modes & {"per_step_static", "per_channel_static"}:
        return f" ({'; '.join(parts)}: needs calibration, or build --calib)"
    return ""


def _embed_note(embed: EmbedConfig) -> str:
    """The embedding tables a preset quantizes too, when any."""
    if not embed.include:
        return ""
    group = f"groups of {embed.group_size}" if embed.group_size else "a scale per row"
    return f"  + token table int{embed.bits} ({group}): embed.include={embed.include!r}"


def _selection_note(select: SelectConfig) -> str:
    """What a preset selects besides its scope, where it departs from the defaults."""
    default = SelectConfig()
    notes = []
    if select.exclude.startswith(default.exclude + "|"):
        notes.append(f"also excludes {select.exclude[len(default.exclude) + 1 :]!r}")
    elif select.exclude != default.exclude:
        notes.append(f"exclude={select.exclude!r}")
    if select.include != default.include:
        notes.append(f"include={select.include!r}")
    if select.layers:
        notes.append(f"only {len(select.layers)} listed layers")
    return "".join(f"  {n}" for n in notes)


@click.command("demo-checkpoint")
@click.option("--out", "out_dir", default="artifacts/demo", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--model",
    type=click.Choice(MODELS),
    default=MODELS[0],
    show_default=True,
    help="Whose module tree: pi0.5's (adaptive-norm expert, time_mlp_*) or pi0's (plain-norm expert, "
    "state_proj, action_time_mlp_*). Same depths and widths.",
)
@click.option("--full-size", is_flag=True, help="Real pi0.5 / pi0 widths (~6.5 GB bf16), streamed tensor by tensor.")
@click.option(
    "--size",
    type=click.Choice(["small", "demo", "mid", "full"]),
    default=None,
    help="Widths for benchmarks: full_w4a8 selects ~7 M (small), ~30 M (demo, the default), ~114 M (mid) "
    "or ~2.7 G (full, same as --full-size) weights.",
)
@click.option("--dtype", type=click.Choice(["BF16", "F32"]), default="BF16", show_default=True)
@friendly
def demo_checkpoint(out_dir: str, model: str, full_size: bool, size: str | None, dtype: str) -> None:
    """Write the deterministic pi0.5-shaped (or, with --model pi0, pi0-shaped) demo checkpoint
    (kept if already there)."""
    from tqdm import tqdm

    from .demo import SIZES, tensor_specs, write_demo_checkpoint

    size = size or ("full" if full_size else "demo")
    n = len(tensor_specs(SIZES[size], model))
    # Only the full size takes long enough to want a bar.
    with tqdm(total=n, unit="tensor", desc="demo checkpoint", file=sys.stderr, disable=size != "full") as bar:
        path = write_demo_checkpoint(
            out_dir, size=size, dtype=dtype, model=model, on_tensor=lambda name, nbytes: bar.update(1)
        )
    click.echo(str(path))


@click.command("demo-stats")
@config_option
@checkpoint_option
@click.option(
    "--out", default=None, type=click.Path(dir_okay=False), help="Default: artifacts/stats/<config>-<demo folder>.h5"
)
@env_option
@friendly
def demo_stats(config: str, checkpoint: str, out: str | None, use_env: bool) -> None:
    """Capture calibration statistics on a demo checkpoint, for `build --calib` (a preset such as
    full_w4a4 or full_w4a8_calib needs them): its vision tower, LLM and action expert run on the
    demo's inputs (the expert once per denoising step), as capture_stats records a real model.

    \b
      duquant-packs demo-stats -c full_w4a4 --ckpt artifacts/demo
      duquant-packs build      -c full_w4a4 --ckpt artifacts/demo --calib artifacts/stats/full_w4a4-demo.h5
    """
    from pathlib import Path

    from .demo_stats import capture_demo_stats

    cfg = load_config(config, use_env)
    path = Path(out or f"artifacts/stats/{cfg.name}-{Path(checkpoint).resolve().name}.h5")
    click.echo(str(capture_demo_stats(checkpoint, cfg, path)))
