"""The config schema shared by the pipeline and the runtime: what a config holds.

A config is small frozen dataclasses (select, quant, transform, embed) under a name, each
value checked by ``config_checks.validate`` when it is made. Reading one from a preset or a
TOML file is ``config.py``'s job.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config_checks import validate
from .config_sections import EmbedConfig, QuantConfig, SelectConfig, TransformConfig
from .errors import ConfigError

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
        validate(self.name, self.select, self.quant, self.transform, self.embed)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-able form (lists and tables instead of tuples)."""
        d = dataclasses.asdict(self)
        d["select"]["layers"] = list(self.select.layers)
        d["quant"]["per_layer_weight_bits"] = dict(self.quant.per_layer_weight_bits)
        d["quant"]["weight_bits_by_pattern"] = dict(self.quant.weight_bits_by_pattern)
        d["quant"]["act_mode_by_pattern"] = dict(self.quant.act_mode_by_pattern)
        d["transform"]["equalize"] = list(self.transform.equalize)
        d["transform"]["smooth_search"] = list(self.transform.smooth_search)
        d["transform"]["proxy_smooth"] = list(self.transform.proxy_smooth)
        d["transform"]["block_search"] = list(self.transform.block_search)
        return d

    @property
    def per_layer_choice(self) -> bool:
        """Does build choose each layer's transform among several candidates?"""
        return self.transform.per_layer_choice

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
        if "per_step_static" not in self.quant.modes:  # 0.8: only per-step tables have steps
            del d["quant"]["flow_steps"]
        # 0.10: per-layer activation modes and the A8 fallback
        if not self.quant.act_mode_by_pattern:
            del d["quant"]["act_mode_by_pattern"]
        if not self.quant.a4_min_sqnr_db:
            del d["quant"]["a4_min_sqnr_db"]
        if not self.quant.a4_vs_rtn_w4a8:
            del d["quant"]["a4_vs_rtn_w4a8"]
        if not self.quant.a4_rtn_margin_db:
            del d["quant"]["a4_rtn_margin_db"]
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
