"""The one place that maps the seed's ``OPENPI_DUQUANT_*`` variables onto a config.

Existing eval scripts keep working: each variable overrides one field of a base
config, and the fingerprint reflects the effective (overridden) config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import DuQuantConfig, resolve
from .errors import ConfigError

PREFIX = "OPENPI_DUQUANT_"
DEFAULT_BASE = "dit_w4a8"  # the seed's default scope was the action expert

# variable suffix -> (section, field, parser name)
_FIELDS: dict[str, tuple[str, str, str]] = {
    "SCOPE": ("select", "scope", "str"),
    "INCLUDE": ("select", "include", "str"),
    "EXCLUDE": ("select", "exclude", "str"),
    "LAYERS": ("select", "layers", "names"),
    "WBITS_DEFAULT": ("quant", "weight_bits", "int"),
    "WBITS": ("quant", "per_layer_weight_bits", "bits_map"),
    "ABITS": ("quant", "act_bits", "int"),
    "ACT_MODE": ("quant", "act_mode", "str"),
    "ACT_PCT": ("quant", "act_percentile", "float"),
    "CALIB_STEPS": ("quant", "calib_steps", "int"),
    "BLOCK": ("transform", "block_size", "int"),
    "BLOCK_OUT": ("transform", "block_out_size", "int"),
    "PERMUTE": ("transform", "permute", "bool"),
    "ROW_ROT": ("transform", "row_rot", "str"),
    "LS": ("transform", "lambda_smooth", "float"),
    "METHOD": ("transform", "method", "str"),
}


def _parse(var: str, kind: str, raw: str) -> Any:
    text = raw.strip()
    try:
        if kind == "str":
            return text
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError  # the message is built below, from the raw value
        if kind == "names":
            return tuple(n.strip() for n in text.split(",") if n.strip())
        if kind == "bits_map":
            pairs = []
            for item in filter(None, (p.strip() for p in text.split(","))):
                name, _, bits = item.rpartition(":")
                if not name:
                    raise ValueError
                pairs.append((name.strip(), int(bits)))
            return tuple(sorted(pairs))
    except ValueError:
        raise ConfigError(f"{var}={raw!r} cannot be read as {_EXPECTED[kind]}") from None
    raise AssertionError(kind)  # pragma: no cover, no mutate


_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "0 or 1",
    "names": "a comma-separated list of layer names",
    "bits_map": "'layer.name:bits,other.name:bits'",
}


@dataclass(frozen=True)
class Override:
    """One ``OPENPI_DUQUANT_*`` variable and the config fields it sets."""

    var: str
    raw: str
    section: str
    changes: dict[str, Any]  # field -> value; the seed's BLOCK also sets block_out_size

    def describe(self, config: DuQuantConfig) -> str:
        """E.g. `OPENPI_DUQUANT_BLOCK=32 overrides llm_w4a8's transform.block_size (64 → 32)`."""
        current = getattr(config, self.section)
        fields = " and ".join(
            f"{self.section}.{name} ({_shown(getattr(current, name))} → {_shown(value)})"
            for name, value in self.changes.items()
        )
        return f"{self.var}={self.raw} overrides {config.name}'s {fields}"


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value) or "none"
    return repr(value) if isinstance(value, str) else str(value)


def env_overrides(environ: Mapping[str, str] | None = None) -> list[Override]:
    """The ``OPENPI_DUQUANT_*`` variables set, each parsed into the fields it overrides."""
    env = os.environ if environ is None else environ
    found: list[Override] = []
    for suffix, (section, name, kind) in _FIELDS.items():
        var = PREFIX + suffix
        if var in env:
            changes = {name: _parse(var, kind, env[var])}
            if suffix == "BLOCK" and PREFIX + "BLOCK_OUT" not in env:
                changes["block_out_size"] = changes[name]  # the seed's BLOCK set both block sizes
            found.append(Override(var, env[var], section, changes))
    return found


def _applied(config: DuQuantConfig, overrides: list[Override]) -> DuQuantConfig:
    for o in overrides:
        config = config.replace(o.section, **o.changes)
    return config


def apply_env(config: DuQuantConfig, environ: Mapping[str, str] | None = None) -> DuQuantConfig:
    """``config`` with every ``OPENPI_DUQUANT_*`` override applied (and validated). A value
    the config refuses is refused naming the variable that set it."""
    overrides = env_overrides(environ)
    try:
        return _applied(config, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (set by {blame(config, overrides)})") from None


def blame(
    config: DuQuantConfig,
    overrides: list[Override],
    check: Callable[[DuQuantConfig], object] = lambda c: c,
) -> str:
    """The variable(s) behind a refused effective config: the first one refused on its own
    (by the config's rules, then ``check``'s), else all of them (refused only together)."""
    for o in overrides:
        try:
            check(_applied(config, [o]))
        except ConfigError:
            return f"{o.var}={o.raw}"
    return ", ".join(f"{o.var}={o.raw}" for o in overrides) or "no OPENPI_DUQUANT_* variable"


def config_from_env(base: str | DuQuantConfig | None = None, environ: Mapping[str, str] | None = None) -> DuQuantConfig:
    """The effective config: ``base`` (or ``OPENPI_DUQUANT_CONFIG``, else dit_w4a8) plus overrides."""
    env = os.environ if environ is None else environ
    chosen = base if base is not None else env.get(PREFIX + "CONFIG", DEFAULT_BASE)
    return apply_env(resolve(chosen), env)


@dataclass(frozen=True)
class EnvRequest:
    """What the environment asks the runtime to load."""

    bundle: str | None  # OPENPI_DUQUANT_BUNDLE
    packdir: str | None  # OPENPI_DUQUANT_PACKDIR
    act_scales: str | None  # OPENPI_DUQUANT_ACT_SCALES
    config_given: bool  # OPENPI_DUQUANT_CONFIG or any field override is set


def request_from_env(environ: Mapping[str, str] | None = None) -> EnvRequest:
    env = os.environ if environ is None else environ
    return EnvRequest(
        bundle=env.get(PREFIX + "BUNDLE") or None,
        packdir=env.get(PREFIX + "PACKDIR") or None,
        act_scales=env.get(PREFIX + "ACT_SCALES") or None,
        config_given=PREFIX + "CONFIG" in env or any(PREFIX + suffix in env for suffix in _FIELDS),
    )
