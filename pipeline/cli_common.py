"""What every `duquant-packs` command shares: one-sentence failures, config loading and the
options several commands take (--config, --checkpoint, --env)."""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Any

import click
from duquant_runtime.config import DuQuantConfig, resolve
from duquant_runtime.env import apply_env, blame, env_overrides
from duquant_runtime.errors import ConfigError, DuQuantError

from .process import Stopped

EXIT_BAD_INPUT = 2


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Say `message` as one sentence on stderr and exit with `code`."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our own exceptions into one sentence and exit 2; Ctrl-C into exit 130, SIGTERM into 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DuQuantError as exc:
            fail(str(exc))
        except KeyboardInterrupt as exc:
            stop = exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
            how = "interrupted" if stop.signum == signal.SIGINT else f"stopped by {signal.Signals(stop.signum).name}"
            click.echo(f"{how}: no bundle was written", err=True)
            sys.exit(stop.exit_code)

    return wrapper


def load_config(config: str, use_env: bool) -> DuQuantConfig:
    """The config, with the seed's environment overrides when asked (one stderr line each),
    checked by its method; a value refused names the variable that set it."""
    from .rotations import check

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


def prefix_note(prefix: str) -> str:
    """The tail of a summary line naming a detected name prefix (LeRobot's `model.`), if any."""
    return f"; names under {prefix!r} (detected)" if prefix else ""


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
