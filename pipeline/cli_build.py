"""`duquant-packs build`: its options, its progress bar on stderr, and the lines it ends with."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from .cli_common import checkpoint_option, config_option, env_option, fail, friendly, load_config, prefix_note
from .process import Stopped, StopSignals
from .report import calibration_needed, human, quality_summary, summary_lines
from .report_text import table_line

if TYPE_CHECKING:
    from duquant_runtime.config import DuQuantConfig, QuantConfig
    from tqdm import tqdm

    from .build import BuildResult

# In --help order: --config, --checkpoint, then the build's own, then --env.
_BUILD_OPTIONS = (
    config_option,
    checkpoint_option,
    click.option(
        "--out",
        "out_dir",
        default="artifacts",
        show_default=True,
        type=click.Path(file_okay=False),
        help="Bundles go to OUT/<config name>/<name>-<fp12>.h5.",
    ),
    click.option(
        "--jobs",
        "-j",
        type=click.IntRange(min=1),
        default=None,
        help="Parallel workers (default: in-process below 250 M selected weights, where starting "
        "workers costs more than it saves; else the number of cores).",
    ),
    click.option(
        "--backend",
        type=click.Choice(["loky", "threading", "sequential", "dask"]),
        default="loky",
        show_default=True,
        help="Where layers are packed: loky worker processes, threads, one by one, or a dask.distributed "
        "cluster (see --scheduler).",
    ),
    click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="With --backend dask: the scheduler to connect to, e.g. tcp://10.0.0.5:8786. Its workers must see "
        "the checkpoint (and --calib file) at the same path: a shared filesystem. Without it, a local cluster of "
        "--jobs worker processes is started.",
    ),
    click.option("--force", is_flag=True, help="Rebuild even when a verified bundle already exists."),
    click.option(
        "--calib",
        default=None,
        metavar="STATS.h5",
        type=click.Path(dir_okay=False),
        help="Calibration statistics from duquant_runtime.capture_stats: the per-layer choice measures output "
        "error on the captured sample and adds the candidates that need data; the config fields that need "
        "statistics (docs/configuration.md marks them) refuse to build without them; static activation scales "
        "are stored in the bundle (quant.act_mode = per_channel_static, or per_step_static: one row per "
        "denoising step, from statistics captured on an instrumented model), so no calibrate() is needed at "
        "run time, and each layer's output SQNR is recorded. Enters the fingerprint.",
    ),
    click.option(
        "--min-sqnr",
        "min_sqnr",
        type=click.FloatRange(min=0.0, max=100.0),
        default=None,
        metavar="DB",
        help="Pack at 8 bits every layer whose measured SQNR (output SQNR with --calib, else the weight's) stays "
        "below DB; sets quant.min_sqnr_db, so it is fingerprinted. `inspect` lists those layers.",
    ),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
    env_option,
)


def build_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Apply the build command's options; the last decorator applied is the first listed."""
    for option in reversed(_BUILD_OPTIONS):
        fn = option(fn)
    return fn


@click.command()
@build_options
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
    candidates (pre-transform strengths with the method or no rotation; more with --calib),
    never worse than plain round-to-nearest by that measure. An identical bundle
    that already exists and verifies is reused in seconds. The bundle's path is the last
    line printed on stdout.
    """
    from .build import build_bundle
    from .process import keep_large_temporaries

    if scheduler and backend != "dask":
        fail("--scheduler is for --backend dask: add --backend dask, or drop --scheduler")
    cfg = load_config(config, use_env)
    keep_large_temporaries()  # this process is the CLI's own: tune its allocator for in-process jobs
    if min_sqnr is not None:
        cfg = cfg.replace("quant", min_sqnr_db=min_sqnr)
    run = functools.partial(
        build_bundle,
        cfg,
        checkpoint,
        out_dir,
        jobs=jobs,
        backend=backend,
        force=force,
        calib=calib,
        scheduler=scheduler,
    )
    result = run_until_stopped(run, BuildProgress(cfg.name, quiet))
    say_result(cfg, result, calib)


class BuildProgress:
    """The build's progress callback: raises a stop signal received (so none is lost), and
    draws a bar on stderr from the first call on, unless quiet."""

    def __init__(self, config_name: str, quiet: bool) -> None:
        from tqdm import tqdm

        self._new_bar = tqdm
        self.config_name = config_name
        self.quiet = quiet
        self.stop = StopSignals()
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        self.stop.check()
        if self.quiet:
            return
        if self.bar is None:
            self.bar = self._new_bar(
                total=total,
                unit="layer",
                desc=f"packing {self.config_name}",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5 if sys.stderr.isatty() else 5.0,  # a log file gets few lines
            )
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(f"{human(done_bytes)}/{human(total_bytes)} of weights", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_until_stopped(run: Callable[..., BuildResult], progress: BuildProgress) -> BuildResult:
    """`run(progress=progress)` with SIGINT and SIGTERM turned into :class:`Stopped`; once a
    stop signal came, whatever failure surfaced first is reported as that stop."""
    try:
        with progress.stop:
            return run(progress=progress)
    except BaseException:
        if progress.stop.received is not None:  # whatever surfaced first (a worker killed by the same signal...)
            raise Stopped(progress.stop.received) from None
        raise
    finally:
        progress.close()


def act_fallback_line(cfg: DuQuantConfig, quality: dict[str, dict[str, float]]) -> str:
    """How many layers quant.a4_min_sqnr_db kept at 8-bit activations, and which (the first few)."""
    kept = sorted(n for n, q in quality.items() if "a4_held_out_sqnr_db" in q)
    more = f", ... ({len(kept) - 5} more: inspect --quality 0 lists them)" if len(kept) > 5 else ""
    names = f": {', '.join(kept[:5])}{more}" if kept else ""
    q = cfg.quant
    return (
        f"A8 fallback: {len(kept)} of {len(quality)} layers kept at 8-bit activations "
        f"(held-out SQNR under {q.a4_min_sqnr_db:g} dB{_rtn_floor(q) if q.a4_vs_rtn_w4a8 else ''} "
        f"at A{q.act_bits}){names}"
    )


def _rtn_floor(q: QuantConfig) -> str:
    return f" or within {q.a4_rtn_margin_db:g} dB of RTN W4A8" if q.a4_rtn_margin_db else " or under RTN W4A8"


def say_result(cfg: DuQuantConfig, result: BuildResult, calib: str | None = None) -> None:
    """The summary line, quality lines (the Linears' per component, then each table's) and notes
    on stderr, then the bundle's path, last, on stdout."""
    verb = "reused verified" if result.skipped else "built"
    click.echo(
        f"{verb} {cfg.name}: {result.layers} layers, {human(result.weight_bytes)} of weights, "
        f"fingerprint {result.fingerprint[:12]}, {result.seconds:.1f} s" + prefix_note(result.name_prefix),
        err=True,
    )
    linears = {n: q for n, q in result.quality.items() if n not in result.tables}
    for line in summary_lines(quality_summary(linears)):
        click.echo(f"  {line}", err=True)
    for name in result.tables:
        table = {"layer": name, "bits": cfg.embed.bits, "group_size": cfg.embed.group_size}
        click.echo(f"  {table_line({**table, **result.quality.get(name, {})})}", err=True)
    if cfg.quant.a4_min_sqnr_db:
        click.echo(f"  {act_fallback_line(cfg, linears)}", err=True)
    for note in result.notes:
        click.echo(note, err=True)
    if needed := calibration_needed(cfg.to_dict(), calib):
        click.echo(f"note: this bundle holds {needed}", err=True)
    click.echo(str(result.path))
