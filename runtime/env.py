"""The one place that maps the seed's ``OPENPI_DUQUANT_*`` variables onto a config.

Existing eval scripts keep working: each variable overrides one field of a base
config, and the fingerprint reflects the effective (overridden) config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
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
            raise ValueError(text)
        if kind == "names":
            return tuple(n.strip() for n in text.split(",") if n.strip())
        if kind == "bits_map":
            pairs = []
            for item in filter(None, (p.strip() for p in text.split(","))):
                name, _, bits = item.rpartition(":")
                if not name:
                    raise ValueError(item)
                pairs.append((name.strip(), int(bits)))
            return tuple(sorted(pairs))
    except ValueError:
        raise ConfigError(f"{var}={raw!r} cannot be read as {_EXPECTED[kind]}") from None
    raise AssertionError(kind)  # pragma: no cover


_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "0 or 1",
    "names": "a comma-separated list of layer names",
    "bits_map": "'layer.name:bits,other.name:bits'",
}


def overrides_from_env(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """The config fields set by ``OPENPI_DUQUANT_*`` variables, by section."""
    env = os.environ if environ is None else environ
    out: dict[str, dict[str, Any]] = {}
    for suffix, (section, name, kind) in _FIELDS.items():
        var = PREFIX + suffix
        if var in env:
            out.setdefault(section, {})[name] = _parse(var, kind, env[var])
    # The seed's BLOCK set both block sizes unless BLOCK_OUT was given.
    transform = out.get("transform", {})
    if "block_size" in transform and "block_out_size" not in transform:
        transform["block_out_size"] = transform["block_size"]
    return out


def apply_env(config: DuQuantConfig, environ: Mapping[str, str] | None = None) -> DuQuantConfig:
    """``config`` with every ``OPENPI_DUQUANT_*`` override applied (and validated)."""
    for section, changes in overrides_from_env(environ).items():
        config = config.replace(section, **changes)
    return config


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
