"""What a config allows: the values each field may take, and ``validate``, which refuses the
others with one sentence each (run by every ``DuQuantConfig`` when it is made)."""

from __future__ import annotations

import re

from .config_sections import (
    ACT_MODES,
    MAX_FLOW_STEPS,
    ROW_ROT_MODES,
    WEIGHT_SEARCHES,
    EmbedConfig,
    QuantConfig,
    SelectConfig,
    TransformConfig,
)
from .errors import ConfigError


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(name: str, s: SelectConfig, q: QuantConfig, t: TransformConfig, e: EmbedConfig) -> None:
    """Refuse values that would build wrong or meaningless packs, with one sentence each."""
    _check(bool(name) and isinstance(name, str), "config name must be a non-empty string")
    _validate_select(s)
    _validate_quant(q)
    _validate_transform(t)
    _validate_choice(q, t)
    _validate_embed(e)


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
    for pattern, mode in q.act_mode_by_pattern:
        _check(
            mode in ACT_MODES,
            f"quant.act_mode_by_pattern[{pattern!r}] must be one of {', '.join(ACT_MODES)}, got {mode!r}",
        )
        _check_pattern(pattern, "quant.act_mode_by_pattern")
    _check(
        0.0 <= q.a4_min_sqnr_db <= 100.0,
        f"quant.a4_min_sqnr_db must be in [0, 100] dB (0 = off), got {q.a4_min_sqnr_db}",
    )
    _check(
        q.a4_min_sqnr_db > 0 or not q.a4_vs_rtn_w4a8,
        "quant.a4_vs_rtn_w4a8 compares what quant.a4_min_sqnr_db measures: set a4_min_sqnr_db too",
    )
    _check(
        0.0 <= q.a4_rtn_margin_db <= 20.0 and (q.a4_vs_rtn_w4a8 or not q.a4_rtn_margin_db),
        f"quant.a4_rtn_margin_db must be in [0, 20] dB, with quant.a4_vs_rtn_w4a8 on, got {q.a4_rtn_margin_db}",
    )
    for pattern, bits in q.weight_bits_by_pattern:
        _check(2 <= bits <= 8, f"quant.weight_bits_by_pattern[{pattern!r}] must be between 2 and 8, got {bits}")
        _check_pattern(pattern, "quant.weight_bits_by_pattern")


def _check_pattern(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{where} key {pattern!r} is not a regular expression ({exc})") from None


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


def _validate_choice(q: QuantConfig, t: TransformConfig) -> None:
    """The weight search and the per-layer choice (checked last: fields added after the first release)."""
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
        all(b == 0 or (b >= 2 and not b & (b - 1)) for b in t.block_search)
        and len(set(t.block_search)) == len(t.block_search),
        "transform.block_search must be distinct powers of two, or 0 for the layer's full width "
        f"(e.g. [16, 0]), got {list(t.block_search)}",
    )
    _check(
        not (t.smooth_search and t.smooth_alpha > 0),
        "transform.smooth_alpha and transform.smooth_search are exclusive: give one strength, or the list to search",
    )
    _check(
        not (t.per_layer_choice and t.row_rot != "0"),
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
