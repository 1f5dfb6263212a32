"""The config schema shared by the pipeline and the runtime.

A config is three small frozen dataclasses (select, quant, transform) under a name.
Presets are TOML files shipped as package data of the runtime (``runtime/presets/``), so an
eval environment can resolve a bundle's preset without the pipeline installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SelectionError

ROW_ROT_MODES = ("0", "restore")
ACT_MODES = ("per_token_dynamic", "per_channel_static")
WEIGHT_SEARCHES = ("alpha", "mse")


@dataclass(frozen=True)
class SelectConfig:
    """Which Linear layers a config quantizes (matched on module names)."""

    scope: str = ""
    include: str = r".*(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj).*"
    exclude: str = r"(?:^|\.)(norm|ln|layernorm|emb)(?:\.|$)"
    layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantConfig:
    weight_bits: int = 4
    act_bits: int = 8  # 0 turns activation quantization off (the seed's ABITS=0)
    act_mode: str = "per_token_dynamic"
    act_percentile: float = 99.9
    calib_steps: int = 32
    # "alpha": the seed's 5 clip ratios; "mse": 9 clip ratios (5 coarse, 4 refined), activation-weighted with --calib
    weight_search: str = "mse"
    gptq: bool = False  # GPTQ error compensation (needs --calib statistics)
    gptq_damp: float = 0.01
    # Layers whose measured SQNR (output SQNR with --calib, else the weight's) stays below
    # this are packed at 8 bits instead; 0 = off.
    min_sqnr_db: float = 0.0
    # Sorted (layer name, bits) pairs: a tuple keeps the dataclass hashable and canonical.
    per_layer_weight_bits: tuple[tuple[str, int], ...] = ()

    def bits_for(self, layer: str) -> int:
        return dict(self.per_layer_weight_bits).get(layer, self.weight_bits)


@dataclass(frozen=True)
class TransformConfig:
    """Defaults are the recommended settings (README "Presets"); the seed's are in
    ``full_w4a8_seed.toml``."""

    block_size: int = 64
    block_out_size: int = 16
    permute: bool = False
    row_rot: str = "0"
    lambda_smooth: float = 0.15
    method: str = "hadamard"  # a handler of duquant_pipeline.methods
    hadamard_signs: bool = False  # hadamard: a seeded random +-1 diagonal before H
    max_rotation_step: int = 16  # duquant: greedy steps per rotation
    seed: int = 0  # hadamard signs and duquant's random inner rotations
    smooth_alpha: float = 0.0  # SmoothQuant migration strength with --calib; 0 = off
    # Per-layer choice (build keeps the candidate with the lowest measured error):
    # data-free equalization strengths beta tried (column scale ||W_:,j||^-beta; 0 = none),
    equalize: tuple[float, ...] = (0.0, 0.5, 1.0)
    # SmoothQuant strengths alpha tried with --calib (chosen by output error on the sample),
    smooth_search: tuple[float, ...] = ()
    # and whether "no rotation" (plain per-row round-to-nearest, after equalization) competes.
    rtn_candidate: bool = True


# The fingerprint document's config schema. 1 (bundles of 0.1 and 0.2): fields added after
# the first release appear only when they differ from the value they had before they
# existed (LATER_FIELDS). 2: every field, always. Schema-1 documents stay reproducible, so
# older bundles keep verifying against a config.
CONFIG_SCHEMA = 2
LATER_FIELDS = {
    "quant": {"weight_search": "alpha", "gptq": False, "gptq_damp": 0.01, "min_sqnr_db": 0.0},
    "transform": {
        "hadamard_signs": False,
        "max_rotation_step": 16,
        "seed": 0,
        "smooth_alpha": 0.0,
        "equalize": [],
        "smooth_search": [],
        "rtn_candidate": False,
    },
}


@dataclass(frozen=True)
class DuQuantConfig:
    name: str
    select: SelectConfig = field(default_factory=SelectConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able form (lists and tables instead of tuples)."""
        d = dataclasses.asdict(self)
        d["select"]["layers"] = list(self.select.layers)
        d["quant"]["per_layer_weight_bits"] = dict(self.quant.per_layer_weight_bits)
        d["transform"]["equalize"] = list(self.transform.equalize)
        d["transform"]["smooth_search"] = list(self.transform.smooth_search)
        return d

    @property
    def per_layer_choice(self) -> bool:
        """Does build choose each layer's transform among several candidates?"""
        t = self.transform
        return bool(t.equalize or t.smooth_search or t.rtn_candidate)

    def fingerprint_fields(self, schema: int = CONFIG_SCHEMA) -> dict[str, Any]:
        """Every field that changes the packs or the runtime numerics: all but the name,
        as config schema ``schema`` writes them."""
        d = self.to_dict()
        del d["name"]
        if schema == 1:
            for section, defaults in LATER_FIELDS.items():
                for key, default in defaults.items():
                    if d[section][key] == default:
                        del d[section][key]
        return d

    def replace(self, section: str | None = None, **changes: Any) -> DuQuantConfig:
        if section is None:
            return dataclasses.replace(self, **changes)
        sub = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: sub})


_SECTIONS: dict[str, type] = {
    "select": SelectConfig,
    "quant": QuantConfig,
    "transform": TransformConfig,
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DuQuantConfig) -> None:
    """Refuse values that would build wrong or meaningless packs, with one sentence each."""
    s, q, t = cfg.select, cfg.quant, cfg.transform
    _check(bool(cfg.name) and isinstance(cfg.name, str), "config name must be a non-empty string")
    for key in ("include", "exclude"):
        pattern = getattr(s, key)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"select.{key} is not a valid regular expression ({exc}): {pattern!r}") from None
    _check(2 <= q.weight_bits <= 8, f"quant.weight_bits must be between 2 and 8, got {q.weight_bits}")
    _check(
        q.act_bits == 0 or 2 <= q.act_bits <= 16,
        f"quant.act_bits must be 0 (off) or between 2 and 16, got {q.act_bits}",
    )
    _check(q.act_mode in ACT_MODES, f"quant.act_mode must be one of {', '.join(ACT_MODES)}, got {q.act_mode!r}")
    _check(0.0 < q.act_percentile <= 100.0, f"quant.act_percentile must be in (0, 100], got {q.act_percentile}")
    _check(q.calib_steps >= 1, f"quant.calib_steps must be at least 1, got {q.calib_steps}")
    for layer, bits in q.per_layer_weight_bits:
        _check(2 <= bits <= 8, f"quant.per_layer_weight_bits[{layer!r}] must be between 2 and 8, got {bits}")
    _check(t.block_size >= 2, f"transform.block_size must be at least 2, got {t.block_size}")
    _check(t.block_out_size >= 2, f"transform.block_out_size must be at least 2, got {t.block_out_size}")
    _check(
        t.row_rot != "propagate",
        "transform.row_rot = 'propagate' is refused: it rotates a layer's output basis without "
        "telling the next layer, which gives wrong numbers; use 'restore' or '0'",
    )
    _check(t.row_rot in ROW_ROT_MODES, f"transform.row_rot must be '0' or 'restore', got {t.row_rot!r}")
    _check(0.0 <= t.lambda_smooth <= 1.0, f"transform.lambda_smooth must be in [0, 1], got {t.lambda_smooth}")
    # The method's own rules live with its handler (duquant_pipeline.methods), which the
    # pipeline runs on every config it builds with; the runtime only applies stages.
    _check(bool(re.fullmatch(r"[a-z][a-z0-9_]*", t.method)), f"transform.method must be a name, got {t.method!r}")
    _check(
        0 <= t.max_rotation_step <= 4096,
        f"transform.max_rotation_step must be in [0, 4096], got {t.max_rotation_step}",
    )
    _check(0.0 <= t.smooth_alpha <= 1.0, f"transform.smooth_alpha must be in [0, 1], got {t.smooth_alpha}")
    _check(
        q.weight_search in WEIGHT_SEARCHES,
        f"quant.weight_search must be one of {', '.join(WEIGHT_SEARCHES)}, got {q.weight_search!r}",
    )
    _check(0.0 < q.gptq_damp <= 1.0, f"quant.gptq_damp must be in (0, 1], got {q.gptq_damp}")
    _check(0.0 <= q.min_sqnr_db <= 100.0, f"quant.min_sqnr_db must be in [0, 100] dB (0 = off), got {q.min_sqnr_db}")
    for key, values in (("equalize", t.equalize), ("smooth_search", t.smooth_search)):
        _check(
            all(0.0 <= v <= 1.0 for v in values) and len(set(values)) == len(values),
            f"transform.{key} must be distinct strengths in [0, 1], got {list(values)}",
        )
    _check(
        not (t.smooth_search and t.smooth_alpha > 0),
        "transform.smooth_alpha and transform.smooth_search are exclusive: give one strength, or the list to search",
    )
    _check(
        not (cfg.per_layer_choice and t.row_rot != "0"),
        "the per-layer choice (equalize / smooth_search / rtn_candidate) needs transform.row_rot = '0'",
    )


# pi0.5's components by a marker in the module name (openpi's names; LeRobot's sit under
# "model."), for bytes per component in inspect and the load report.
COMPONENTS = {"vision": ".vision_tower.", "llm": ".language_model.", "expert": ".gemma_expert."}


def component_of(name: str) -> str:
    return next((c for c, marker in COMPONENTS.items() if marker in "." + name), "other")


# The policy's last layer is quantized only when named in select.layers.
NEVER_UNLESS_LISTED = re.compile(r"(?:^|\.)action_out_proj$")


def matches(select: SelectConfig, names: Iterable[str]) -> list[str]:
    """The names a selection picks, sorted — the one implementation of the rules:

    * ``select.layers`` non-empty: exactly those names, each of which must be among ``names``
      (a missing one is refused, with the nearest real name);
    * otherwise: starts with ``scope``, matches ``include`` and not ``exclude`` (re.search),
      and is never the policy's last layer (``action_out_proj``) unless whitelisted.
    """
    names = list(names)
    if select.layers:
        known = set(names)
        missing = [n for n in select.layers if n not in known]
        if missing:
            near = difflib.get_close_matches(missing[0], names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SelectionError(
                f"select.layers names {len(missing)} layer(s) that are not Linear layers here, "
                f"e.g. {missing[0]!r}{hint}"
            )
        return sorted(set(select.layers))
    include, exclude = re.compile(select.include), re.compile(select.exclude) if select.exclude else None
    return sorted(
        n
        for n in names
        if n.startswith(select.scope)
        and include.search(n)
        and not (exclude and exclude.search(n))
        and not NEVER_UNLESS_LISTED.search(n)
    )


def _typed(section: str, key: str, value: Any, default: Any) -> Any:
    """Coerce a TOML/JSON value to the field's type, refusing anything ambiguous."""
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
    if key in ("equalize", "smooth_search"):
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return tuple(float(v) for v in value)
    if key == "layers":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of layer names, got {value!r}")
        return tuple(value)
    if key == "per_layer_weight_bits":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a table of layer name -> bits, got {value!r}")
        pairs = []
        for name, bits in value.items():
            if isinstance(bits, bool) or not isinstance(bits, int):
                raise ConfigError(f"{where}[{name!r}] must be an integer, got {bits!r}")
            pairs.append((str(name), bits))
        return tuple(sorted(pairs))
    raise ConfigError(f"unsupported field {where}")  # pragma: no cover - schema bug


def from_dict(data: Mapping[str, Any], *, default_name: str | None = None, here: Path | None = None) -> DuQuantConfig:
    """Build a config from a parsed TOML/JSON mapping; unknown keys are refused.

    ``base = "<preset>"`` (or ``"<path>.toml"``, relative to ``here``, the folder of the file
    the mapping was read from) starts from that config's fields (its name aside), so a config
    says only what differs from it; anything else starts from the schema's defaults."""
    unknown = set(data) - {"name", "base", *_SECTIONS}
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(sorted(unknown))}; "
            f"allowed top-level keys are name, base, {', '.join(_SECTIONS)}"
        )
    data = _with_base(data, set(), here)
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name:
        raise ConfigError("config needs a non-empty string 'name'")
    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, Mapping):
            raise ConfigError(f"[{section}] must be a table, got {raw!r}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        bad = set(raw) - set(fields)
        if bad:
            raise ConfigError(f"unknown key(s) in [{section}]: {', '.join(sorted(bad))}; allowed: {', '.join(fields)}")
        defaults = cls()
        kwargs = {k: _typed(section, k, v, getattr(defaults, k)) for k, v in raw.items()}
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
    for section in _SECTIONS:
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
