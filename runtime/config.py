"""A config from where it is written: a preset by name, a TOML file, ``base =`` resolution.

Presets are TOML files shipped as package data of the runtime (``runtime/presets/``), so an
eval environment can resolve a bundle's preset without the pipeline installed. The schema
itself is ``schema.py`` and the selection rule ``selection.py``; both are re-exported here,
where the pipeline and clients have always imported them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config_checks import validate
from .config_sections import (
    ACT_MODES,
    ROW_ROT_MODES,
    WEIGHT_SEARCHES,
    EmbedConfig,
    QuantConfig,
    SelectConfig,
    TransformConfig,
)
from .errors import ConfigError
from .schema import CONFIG_SCHEMA, SECTIONS, DuQuantConfig
from .selection import COMPONENTS, NEVER_UNLESS_LISTED, component_of, matches

__all__ = [
    "ACT_MODES",
    "COMPONENTS",
    "CONFIG_SCHEMA",
    "NEVER_UNLESS_LISTED",
    "ROW_ROT_MODES",
    "WEIGHT_SEARCHES",
    "DuQuantConfig",
    "EmbedConfig",
    "QuantConfig",
    "SelectConfig",
    "TransformConfig",
    "component_of",
    "from_dict",
    "load_toml",
    "matches",
    "preset_names",
    "presets_dir",
    "resolve",
    "validate",
]


def _typed(section: str, key: str, value: Any, default: Any, annotation: str) -> Any:
    """Coerce a TOML/JSON value to the field's type (``annotation``, as the schema writes it),
    refusing anything ambiguous."""
    where = f"{section}.{key}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if isinstance(value, bool | int) and key == "row_rot":
            # The seed wrote ROW_ROT=0; accept the TOML integer 0 too.
            value = str(int(value))
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if annotation == "tuple[float, ...]":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if annotation == "tuple[int, ...]":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return tuple(value)
    if annotation == "tuple[str, ...]":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of layer names, got {value!r}")
        return tuple(value)
    if annotation == "tuple[tuple[str, int], ...]":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of layer name -> bits, got {value!r}")
        pairs = []
        for name, bits in value.items():
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise ConfigError(f"{where}[{name!r}] must be an integer, got {bits!r}")
            pairs.append((str(name), bits))
        return tuple(sorted(pairs))
    if annotation == "tuple[tuple[str, str], ...]":
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where} must be a table of layer name pattern -> activation mode, got {value!r}")
        return tuple(sorted((str(k), v) for k, v in value.items()))
    raise ConfigError(f"unsupported field {where}")  # pragma: no cover - schema bug


def from_dict(data: Mapping[str, Any], *, default_name: str | None = None, here: Path | None = None) -> DuQuantConfig:
    """Build a config from a parsed TOML/JSON mapping; unknown keys are refused.

    ``base = "<preset>"`` (or ``"<path>.toml"``, relative to ``here``, the folder of the file
    the mapping was read from) starts from that config's fields (its name aside), so a config
    says only what differs from it; anything else starts from the schema's defaults."""
    unknown = set(data) - {"name", "base", *SECTIONS}
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; "
            f"allowed top-level keys are name, base, {', '.join(SECTIONS)}"
        )
    data = _with_base(data, set(), here)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError("config needs a non-empty string 'name'")
    sections: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {raw!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(raw) - set(fields)
        if bad:
            raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(bad))}; allowed: {', '.join(fields)}")
        defaults = cls()
        kwargs = {k: _typed(section, k, v, getattr(defaults, k), str(fields[k].type)) for k, v in raw.items()}
        sections[section] = cls(**kwargs)
    return DuQuantConfig(name=name, **sections)


def _with_base(data: Mapping[str, Any], seen: set[str], here: Path | None = None) -> Mapping[str, Any]:
    """``data`` with its ``base``'s sections merged under it (recursively). ``base`` is a
    preset name or a path to a TOML file, relative to the folder of the file naming it
    (``here``; the working directory for a config not read from a file)."""
    base = data.get("base")
    if base is None:
        return data
    source = _base_file(base, here)
    key = str(source.resolve())
    if key in seen:
        raise ConfigError(f"configs extend each other in a cycle through base {base!r}")
    parent = _with_base(_read_toml(source), seen | {key}, source.parent)
    merged: dict[str, Any] = {k: data[k] for k in ("name",) if k in data}
    for section in SECTIONS:
        parent_section, own = parent.get(section, {}), data.get(section, {})
        if not isinstance(own, Mapping) or not isinstance(parent_section, Mapping):
            raise ConfigError(f"[{section}] must be a table")
        merged[section] = {**parent_section, **own}
    return merged


def _base_file(base: object, here: Path | None) -> Path:
    if isinstance(base, str) and (presets_dir() / f"{base}.toml").is_file():
        return presets_dir() / f"{base}.toml"
    if isinstance(base, str) and base.endswith(".toml"):
        path = Path(base) if Path(base).is_absolute() or here is None else here / base
        if path.is_file():
            return path
        raise ConfigError(f"base {base!r}: no such file {path}")
    raise ConfigError(f"base must name a preset ({', '.join(preset_names())}) or a .toml file, got {base!r}")


def presets_dir() -> Path:
    """Where the preset TOMLs live: the runtime's own package data."""
    return Path(__file__).resolve().parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_toml(path: str | Path) -> DuQuantConfig:
    path = Path(path)
    return from_dict(_read_toml(path), default_name=path.stem, here=path.parent)


def resolve(config: str | Path | DuQuantConfig) -> DuQuantConfig:
    """A preset name, a TOML path or a config object -> a config object."""
    if isinstance(config, DuQuantConfig):
        return config
    text = str(config)
    if text.endswith(".toml") or Path(text).is_file():
        return load_toml(text)
    preset = presets_dir() / f"{text}.toml"
    if preset.is_file():
        return load_toml(preset)
    raise ConfigError(
        f"unknown config {text!r}: give a preset name ({', '.join(preset_names())}) or a path to a .toml file"
    )
