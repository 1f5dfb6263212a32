"""`duquant-packs verify` and `inspect`: the commands that read a bundle already built."""

from __future__ import annotations

import json
import sys

import click
from duquant_runtime.locate import locate_bundle

from .cli_common import env_option, friendly, load_config

EXIT_DOES_NOT_VERIFY = 1


@click.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--config",
    "-c",
    "config",
    default=None,
    metavar="PRESET|FILE.toml",
    help="Also check the bundle was built for this config.",
)
@click.option(
    "--checkpoint",
    "--ckpt",
    "checkpoint",
    default=None,
    metavar="PATH",
    help="Also check the bundle was built from this checkpoint's weights.",
)
@click.option(
    "--all", "every_tensor", is_flag=True, help="With --ckpt: list every differing tensor, not the first few."
)
@env_option
@friendly
def verify(bundle: str, config: str | None, checkpoint: str | None, every_tensor: bool, use_env: bool) -> None:
    """Exit 0 when BUNDLE is intact (and matches); exit 1 and say what differs when it is damaged
    or was built for another config or checkpoint; exit 2 when BUNDLE, the config or the
    checkpoint cannot be found or read."""
    from .verify import verify_bundle

    cfg = load_config(config, use_env) if config else None
    # A folder holding one bundle: name the file checked. No such path, or a folder holding none
    # or several, is a usage error (exit 2); a file that is no intact bundle does not verify (1).
    bundle = str(locate_bundle(bundle))
    problems = [str(p) for p in verify_bundle(bundle, config=cfg, checkpoint=checkpoint, every_tensor=every_tensor)]
    if problems:
        for line in problems:  # an indented line details the problem above it
            click.echo(line if line.startswith("  ") else f"MISMATCH {line}", err=True)
        count = sum(not line.startswith("  ") for line in problems)
        click.echo(f"{bundle}: does not verify ({count} problem(s))", err=True)
        sys.exit(EXIT_DOES_NOT_VERIFY)
    checked = ["integrity"] + (["config"] if cfg else []) + (["checkpoint"] if checkpoint else [])
    click.echo(f"{bundle}: OK ({', '.join(checked)})")


@click.command()
@click.argument("bundle", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--quality",
    "worst",
    type=click.IntRange(min=0),
    default=None,
    is_flag=False,
    flag_value=10,
    metavar="[N]",
    help="List the N (default 10; 0: every layer) worst layers by SQNR recorded at build (output SQNR when "
    "built with --calib, else weight SQNR): candidates for quant.per_layer_weight_bits or exclusion.",
)
@click.option(
    "--plot",
    "plot_to",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw each layer's SQNR against depth per component, marked by choice (hollow: more bits), "
    "RTN's beside it, and the embedding tables', into this file (.png, .pdf, .svg, ...): where the "
    "quantization hurts, at a glance.",
)
@friendly
def inspect(bundle: str, as_json: bool, worst: int | None, plot_to: str | None) -> None:
    """Config, fingerprint, layers, bytes per component (checkpoint weights vs bundle), quality
    per component, and provenance. Reads metadata only: instant on any bundle."""
    from .report import read_report, worst_layers
    from .report_text import print_report

    if plot_to is not None:
        from .plot import check_plot_path, plot_report

        check_plot_path(plot_to)  # a wrong path is said before the bundle is read
    info = read_report(bundle)
    if plot_to is not None:
        plot_report(info, plot_to)
        click.echo(f"plot written to {plot_to}", err=True)  # stderr: --json keeps stdout one document
    if as_json:
        if worst is not None:
            info["worst"] = worst_layers(info["quality"], worst)
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    print_report(info, worst, click.echo)
