"""The config schema shared by the pipeline and the runtime: what a config holds and allows.

A config is three small frozen dataclasses (select, quant, transform) under a name, each
value checked by ``validate``. Reading one from a preset or a TOML file is ``config.py``'s job.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ROW_ROT_MODES = ("0", "restore")
ACT_MODES = ("per_token_dynamic", "per_channel_static", "per_step_static")
STATIC_ACT_MODES = ("per_channel_static", "per_step_static")
MAX_FLOW_STEPS = 1000
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
    # per_step_static: one scale row per denoising step, at flow times 1, 1 - 1/n, ..., 1/n
    # (openpi's and LeRobot's schedule for n = flow_steps).
    flow_steps: int = 10
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
    # Sorted (regular expression, bits) pairs for the layers no exact name lists: a layer
    # matched (re.search) by several takes the most bits of them.
    weight_bits_by_pattern: tuple[tuple[str, int], ...] = ()

    @property
    def per_step(self) -> bool:
        """Do the layers keep a static scale row per denoising step (and so need the step clock)?"""
        return self.act_mode == "per_step_static" and self.act_bits > 0

    def bits_for(self, layer: str) -> int:
        exact = dict(self.per_layer_weight_bits)
        if layer in exact:
            return exact[layer]
        matched = [bits for pattern, bits in self.weight_bits_by_pattern if re.search(pattern, layer)]
        return max(matched) if matched else self.weight_bits


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
    # Data-free: rank the candidates by their output error on each layer's activation sizes
    # estimated from the checkpoint (its norm's gains, its producer's rows: pipeline/proxy.py),
    # and try SmoothQuant on that estimate at these strengths (layers with no estimate: neither).
    act_proxy: bool = True
    proxy_smooth: tuple[float, ...] = (0.5,)
    # and, where the method's rotation leads (hadamard), it again at these block sizes with the
    # leader's pre-transform; a layer keeps the block its measurements prefer.
    block_search: tuple[int, ...] = (16,)


@dataclass(frozen=True)
class EmbedConfig:
    """Which embedding tables a config quantizes (weight-only: their outputs are a gather, so
    there is no activation to quantize), matched with ``re.search`` on module names;
    ``include = ""`` quantizes none. Rows are stored as ``bits``-bit codes with one float32
    scale per ``group_size`` columns of a row (0: one scale per row)."""

    include: str = ""
    bits: int = 8
    group_size: int = 0


# The fingerprint document's config schema: every field, always. Schema 1 (bundles of 0.1
# and 0.2) left later fields out at their old defaults; it is no longer written or compared.
CONFIG_SCHEMA = 2
SCHEMA_1_REFUSED = (
    "config schema 1 (bundles of duquant-packs 0.1 and 0.2) is no longer compared: rebuild the bundle "
    "with `duquant-packs build`"
)


@dataclass(frozen=True)
class DuQuantConfig:
    name: str
    select: SelectConfig = field(default_factory=SelectConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    transform: TransformConfig = field(default_factory=TransformConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able form (lists and tables instead of tuples)."""
        d = dataclasses.asdict(self)
        d["select"]["layers"] = list(self.select.layers)
        d["quant"]["per_layer_weight_bits"] = dict(self.quant.per_layer_weight_bits)
        d["quant"]["weight_bits_by_pattern"] = dict(self.quant.weight_bits_by_pattern)
        d["transform"]["equalize"] = list(self.transform.equalize)
        d["transform"]["smooth_search"] = list(self.transform.smooth_search)
        d["transform"]["proxy_smooth"] = list(self.transform.proxy_smooth)
        d["transform"]["block_search"] = list(self.transform.block_search)
        return d

    @property
    def per_layer_choice(self) -> bool:
        """Does build choose each layer's transform among several candidates?"""
        t = self.transform
        return bool(t.equalize or t.smooth_search or t.rtn_candidate)

    def fingerprint_fields(self, schema: int = CONFIG_SCHEMA) -> dict[str, Any]:
        """Every field that changes the packs or the runtime numerics: all but the name."""
        if schema != CONFIG_SCHEMA:
            raise ConfigError(
                SCHEMA_1_REFUSED if schema == 1 else f"config schema {schema!r} is not one this tool writes"
            )
        d = self.to_dict()
        del d["name"]
        # Fields added in 0.6, left out at the value that does what every config before did:
        # bundles of those configs keep their fingerprints.
        if not self.embed.include:
            del d["embed"]
        if not self.quant.weight_bits_by_pattern:
            del d["quant"]["weight_bits_by_pattern"]
        if self.quant.act_mode != "per_step_static":  # 0.8: only per-step tables have steps
            del d["quant"]["flow_steps"]
        return d

    def replace(self, section: str | None = None, **changes: Any) -> DuQuantConfig:
        if section is None:
            return dataclasses.replace(self, **changes)
        sub = dataclasses.replace(getattr(self, section), **changes)
        return dataclasses.replace(self, **{section: sub})


SECTIONS: dict[str, type] = {
    "select": SelectConfig,
    "quant": QuantConfig,
    "transform": TransformConfig,
    "embed": EmbedConfig,
}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: DuQuantConfig) -> None:
    """Refuse values that would build wrong or meaningless packs, with one sentence each."""
    _check(bool(cfg.name) and isinstance(cfg.name, str), "config name must be a non-empty string")
    _validate_select(cfg.select)
    _validate_quant(cfg.quant)
    _validate_transform(cfg.transform)
    _validate_choice(cfg)
    _validate_embed(cfg.embed)


def _validate_select(s: SelectConfig) -> None:
    for key in ("include", "exclude"):
        pattern = getattr(s, key)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"select.{key} is not a valid regular expression ({exc}): {pattern!r}") from None


def _validate_quant(q: QuantConfig) -> None:
    _check(2 <= q.weight_bits <= 8, f"quant.weight_bits must be between 2 and 8, got {q.weight_bits}")
    _check(
        q.act_bits == 0 or 2 <= q.act_bits <= 16,
        f"quant.act_bits must be 0 (off) or between 2 and 16, got {q.act_bits}",
    )
    _check(q.act_mode in ACT_MODES, f"quant.act_mode must be one of {', '.join(ACT_MODES)}, got {q.act_mode!r}")
    _check(0.0 < q.act_percentile <= 100.0, f"quant.act_percentile must be in (0, 100], got {q.act_percentile}")
    _check(
        1 <= q.flow_steps <= MAX_FLOW_STEPS,
        f"quant.flow_steps must be between 1 and {MAX_FLOW_STEPS}, got {q.flow_steps}",
    )
    _check(q.calib_steps >= 1, f"quant.calib_steps must be at least 1, got {q.calib_steps}")
    for layer, bits in q.per_layer_weight_bits:
        _check(2 <= bits <= 8, f"quant.per_layer_weight_bits[{layer!r}] must be between 2 and 8, got {bits}")
    for pattern, bits in q.weight_bits_by_pattern:
        _check(2 <= bits <= 8, f"quant.weight_bits_by_pattern[{pattern!r}] must be between 2 and 8, got {bits}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(
                f"quant.weight_bits_by_pattern key {pattern!r} is not a regular expression ({exc})"
            ) from None


def _validate_transform(t: TransformConfig) -> None:
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


def _validate_choice(cfg: DuQuantConfig) -> None:
    """The weight search and the per-layer choice (checked last: fields added after the first release)."""
    q, t = cfg.quant, cfg.transform
    _check(
        q.weight_search in WEIGHT_SEARCHES,
        f"quant.weight_search must be one of {', '.join(WEIGHT_SEARCHES)}, got {q.weight_search!r}",
    )
    _check(0.0 < q.gptq_damp <= 1.0, f"quant.gptq_damp must be in (0, 1], got {q.gptq_damp}")
    _check(0.0 <= q.min_sqnr_db <= 100.0, f"quant.min_sqnr_db must be in [0, 100] dB (0 = off), got {q.min_sqnr_db}")
    for key, values in (("equalize", t.equalize), ("smooth_search", t.smooth_search), ("proxy_smooth", t.proxy_smooth)):
        _check(
            all(0.0 <= v <= 1.0 for v in values) and len(set(values)) == len(values),
            f"transform.{key} must be distinct strengths in [0, 1], got {list(values)}",
        )
    _check(
        all(b >= 2 and not b & (b - 1) for b in t.block_search) and len(set(t.block_search)) == len(t.block_search),
        f"transform.block_search must be distinct powers of two (e.g. [16]), got {list(t.block_search)}",
    )
    _check(
        not (t.smooth_search and t.smooth_alpha > 0),
        "transform.smooth_alpha and transform.smooth_search are exclusive: give one strength, or the list to search",
    )
    _check(
        not (cfg.per_layer_choice and t.row_rot != "0"),
        "the per-layer choice (equalize / smooth_search / rtn_candidate) needs transform.row_rot = '0'",
    )


def _validate_embed(e: EmbedConfig) -> None:
    try:
        re.compile(e.include)
    except re.error as exc:
        raise ConfigError(f"embed.include is not a valid regular expression ({exc}): {e.include!r}") from None
    _check(e.bits in (4, 8), f"embed.bits must be 8 or 4, got {e.bits}")
    _check(
        e.group_size == 0 or (e.group_size >= 2 and e.group_size % 2 == 0),
        f"embed.group_size must be 0 (one scale per row) or an even number of columns, got {e.group_size}",
    )
