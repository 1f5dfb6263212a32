"""`duquant-packs`: build, check and inspect DuQuant pack bundles.

Every expected failure is one sentence on stderr and a non-zero exit (2 for bad input,
1 for a bundle that does not verify), never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
from duquant_runtime import __version__
from duquant_runtime.config import DuQuantConfig, SelectConfig, preset_names, resolve
from duquant_runtime.env import apply_env, blame, env_overrides
from duquant_runtime.errors import BundleReadError, ConfigError, DuQuantError
from duquant_runtime.locate import locate_bundle

from .process import Stopped, StopSignals
from .report import human, quality_summary, summary_lines

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our own exceptions into one sentence and exit 2; Ctrl-C into exit 130, SIGTERM into 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DuQuantError as exc:
            _fail(str(exc))
        except KeyboardInterrupt as exc:
            stop = exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
            how = "interrupted" if stop.signum == signal.SIGINT else f"stopped by {signal.Signals(stop.signum).name}"
            click.echo(f"{how}: no bundle was written", err=True)
            sys.exit(stop.exit_code)

    return wrapper


def load_config(config: str, use_env: bool) -> DuQuantConfig:
    """The config, with the seed's environment overrides when asked (one stderr line each),
    checked by its method; a value refused names the variable that set it."""
    from .methods import check

    cfg = resolve(config)
    overrides = env_overrides() if use_env else []
    effective = apply_env(cfg) if overrides else cfg  # names the variable of a value the config refuses
    try:
        effective = check(effective)
    except ConfigError as exc:
        if not overrides:
            raise
        raise ConfigError(f"{exc} (set by {blame(cfg, overrides, check)})") from None
    for override in overrides:  # said once the result is known good: a refusal stays one sentence
        click.echo(override.describe(cfg), err=True)
    return effective


config_option = click.option(
    "--config",
    "-c",
    "config",
    required=True,
    metavar="PRESET|FILE.toml",
    help="A preset name (see `duquant-packs configs`) or a path to a TOML config.",
)
checkpoint_option = click.option(
    "--checkpoint",
    "--ckpt",
    "checkpoint",
    required=True,
    metavar="PATH",
    help="A .safetensors file, a directory holding model.safetensors, or a sharded model.safetensors.index.json.",
)
env_option = click.option(
    "--env/--no-env",
    "use_env",
    default=True,
    show_default=True,
    help="Apply the OPENPI_DUQUANT_* variables (SCOPE, BLOCK, PERMUTE, ...) of the seed, the openpi DuQuant "
    "prototype this tool replaces, on top of the config; each override is said on stderr.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="duquant-packs")
def main() -> None:
    """Build DuQuant W4A8 pack bundles offline, once, and check them before they are used.

    \b
    Typical flow:
      duquant-packs list-layers -c llm_w4a8 --ckpt /ckpt/pi05_libero     # dry run
      duquant-packs build       -c llm_w4a8 --ckpt /ckpt/pi05_libero     # -> artifacts/llm_w4a8/llm_w4a8-<fp12>.h5
      duquant-packs verify artifacts/llm_w4a8/llm_w4a8-<fp12>.h5 -c llm_w4a8 --ckpt /ckpt/pi05_libero

    A bundle's fingerprint binds it to the exact config and checkpoint it was built from.
    """


@main.command()
@config_option
@checkpoint_option
@click.option(
    "--out",
    "out_dir",
    default="artifacts",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Bundles go to OUT/<config name>/<name>-<fp12>.h5.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(min=1),
    default=None,
    help="Parallel workers (default: in-process below 250 M selected weights, where starting "
    "workers costs more than it saves; else the number of cores).",
)
@click.option(
    "--backend",
    type=click.Choice(["loky", "threading", "sequential", "dask"]),
    default="loky",
    show_default=True,
    help="Where layers are packed: loky worker processes, threads, one by one, or a dask.distributed "
    "cluster (see --scheduler).",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="With --backend dask: the scheduler to connect to, e.g. tcp://10.0.0.5:8786. Its workers must see "
    "the checkpoint (and --calib file) at the same path: a shared filesystem. Without it, a local cluster of "
    "--jobs worker processes is started.",
)
@click.option("--force", is_flag=True, help="Rebuild even when a verified bundle already exists.")
@click.option(
    "--calib",
    default=None,
    metavar="STATS.h5",
    type=click.Path(dir_okay=False),
    help="Calibration statistics from duquant_runtime.capture_stats: the per-layer choice measures output "
    "error on the captured sample and tries SmoothQuant strengths (transform.smooth_search), smoothing "
    "(transform.smooth_alpha), GPTQ (quant.gptq), static activation scales stored in the bundle "
    "(quant.act_mode = per_channel_static) and each layer's output SQNR. Enters the fingerprint.",
)
@click.option(
    "--min-sqnr",
    "min_sqnr",
    type=click.FloatRange(min=0.0, max=100.0),
    default=None,
    metavar="DB",
    help="Pack at 8 bits every layer whose measured SQNR (output SQNR with --calib, else the weight's) stays "
    "below DB; sets quant.min_sqnr_db, so it is fingerprinted. `inspect` lists those layers.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@env_option
@friendly
def build(
    config: str,
    checkpoint: str,
    out_dir: str,
    jobs: int | None,
    backend: str,
    scheduler: str | None,
    force: bool,
    calib: str | None,
    min_sqnr: float | None,
    quiet: bool,
    use_env: bool,
) -> None:
    """Compute every selected layer's pack and write one bundle atomically.

    With the presets each layer's transform is chosen by measured error among a few
    candidates (equalization strengths, block Hadamard or none; SmoothQuant strengths with
    --calib), never worse than plain round-to-nearest by that measure. An identical bundle
    that already exists and verifies is reused in seconds. The bundle's path is the last
    line printed on stdout.
    """
    from tqdm import tqdm

    from .build import build_bundle
    from .process import keep_large_temporaries

    if scheduler and backend != "dask":
        _fail("--scheduler is for --backend dask: add --backend dask, or drop --scheduler")
    cfg = load_config(config, use_env)
    keep_large_temporaries()  # this process is the CLI's own: tune its allocator for in-process jobs
    if min_sqnr is not None:
        cfg = cfg.replace("quant", min_sqnr_db=min_sqnr)
    bar: tqdm | None = None
    stop = StopSignals()

    def progress(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        nonlocal bar
        stop.check()
        if quiet:
            return
        if bar is None:
            bar = tqdm(
                total=total,
                unit="layer",
                desc=f"packing {cfg.name}",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0,
            )
        bar.update(done - bar.n)
        bar.set_postfix_str(f"{human(done_bytes)}/{human(total_bytes)} of weights", refresh=False)

    try:
        with stop:
            result = build_bundle(
                cfg,
                checkpoint,
                out_dir,
                jobs=jobs,
                backend=backend,
                force=force,
                progress=progress,
                calib=calib,
                scheduler=scheduler,
            )
    except BaseException:
        if stop.received is not None:  # whatever surfaced first (a worker killed by the same signal...)
            raise Stopped(stop.received) from None
        raise
    finally:
        if bar is not None:
            bar.close()
    verb = "reused verified" if result.skipped else "built"
    click.echo(
        f"{verb} {cfg.name}: {result.layers} layers, {human(result.weight_bytes)} of weights, "
        f"fingerprint {result.fingerprint[:12]}, {result.seconds:.1f} s" + _prefix_note(result.name_prefix),
        err=True,
    )
    for line in summary_lines(quality_summary(result.quality)):
        click.echo(f"  {line}", err=True)
    click.echo(str(result.path))


@main.command("list-layers")
@config_option
@checkpoint_option
@env_option
@friendly
def list_layers(config: str, checkpoint: str, use_env: bool) -> None:
    """Dry run: print every layer the config selects, with its shape and bits, and the total."""
    from .checkpoint import Checkpoint
    from .select import select_layers

    cfg = load_config(config, use_env)
    layers = select_layers(cfg, Checkpoint.open(checkpoint))
    width = max(len(la.name) for la in layers)
    for la in layers:
        click.echo(f"{la.name:<{width}}  {la.out_features:>6} x {la.in_features:<6}  w{la.bits}  {la.dtype}")
    total = sum(la.weight_bytes for la in layers)
    click.echo(
        f"{len(layers)} layers selected by {cfg.name} ({human(total)} of weights){_prefix_note(layers[0].prefix)}"
    )


def _prefix_note(prefix: str) -> str:
    return f"; names under {prefix!r} (detected)" if prefix else ""


@main.command()
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
    """Exit 0 when BUNDLE is intact (and matches); otherwise exit 1 and say what differs."""
    from .verify import verify_bundle

    cfg = load_config(config, use_env) if config else None
    with contextlib.suppress(BundleReadError):  # else verify_bundle says what is wrong with it
        bundle = str(locate_bundle(bundle))  # a folder holding one bundle: name the file checked
    problems = [str(p) for p in verify_bundle(bundle, config=cfg, checkpoint=checkpoint, every_tensor=every_tensor)]
    if problems:
        for line in problems:
            click.echo(line if line.startswith("  ") else f"MISMATCH {line}", err=True)
        count = sum(not line.startswith("  ") for line in problems)
        click.echo(f"{bundle}: does not verify ({count} problem(s))", err=True)
        sys.exit(1)
    checked = ["integrity"] + (["config"] if cfg else []) + (["checkpoint"] if checkpoint else [])
    click.echo(f"{bundle}: OK ({', '.join(checked)})")


@main.command()
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
@friendly
def inspect(bundle: str, as_json: bool, worst: int | None) -> None:
    """Config, fingerprint, layers, bytes per component (checkpoint weights vs bundle), quality
    per component, and provenance. Reads metadata only: instant on any bundle."""
    from .report import print_report, read_report, worst_layers

    info = read_report(bundle)
    if as_json:
        if worst is not None:
            info["worst"] = worst_layers(info["quality"], worst)
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    print_report(info, worst, click.echo)


@main.command()
def configs() -> None:
    """List the preset configs and what each one selects."""
    for name in preset_names():
        cfg = resolve(name)
        t = cfg.transform
        click.echo(
            f"{name:<16} scope={cfg.select.scope!r:<58} w{cfg.quant.weight_bits}a{cfg.quant.act_bits} "
            f"block={t.block_size} permute={int(t.permute)} row_rot={t.row_rot} method={t.method} "
            f"weights={cfg.quant.weight_search}{'+gptq' if cfg.quant.gptq else ''}"
            f"{f' smooth={t.smooth_alpha}' if t.smooth_alpha else ''}"
            f"{f' per-layer: eq={list(t.equalize)}' if t.equalize else ''}"
            f"{f' smooth={list(t.smooth_search)}' if t.smooth_search else ''}"
            f"{' +no-rotation' if t.rtn_candidate else ''}{_selection_note(cfg.select)}"
        )


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


@main.command("demo-checkpoint")
@click.option("--out", "out_dir", default="artifacts/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--full-size", is_flag=True, help="Real pi0.5 widths (~6.5 GB bf16), streamed tensor by tensor.")
@click.option(
    "--size",
    type=click.Choice(["small", "demo", "mid", "full"]),
    default=None,
    help="Widths for benchmarks: full_w4a8 selects ~7 M (small), ~30 M (demo, the default), ~114 M (mid) "
    "or ~2.7 G (full, same as --full-size) weights.",
)
@click.option("--dtype", type=click.Choice(["BF16", "F32"]), default="BF16", show_default=True)
@friendly
def demo_checkpoint(out_dir: str, full_size: bool, size: str | None, dtype: str) -> None:
    """Write the deterministic pi0.5-shaped demo checkpoint (kept if already there)."""
    from tqdm import tqdm

    from .demo import SIZES, tensor_specs, write_demo_checkpoint

    size = size or ("full" if full_size else "demo")
    n = len(tensor_specs(SIZES[size]))
    with tqdm(total=n, unit="tensor", desc="demo checkpoint", file=sys.stderr, disable=size != "full") as bar:
        path = write_demo_checkpoint(out_dir, size=size, dtype=dtype, on_tensor=lambda name, nbytes: bar.update(1))
    click.echo(str(path))


if __name__ == "__main__":  # pragma: no cover
    main()
