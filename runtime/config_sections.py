"""The sections of a config: small frozen dataclasses of fields with their defaults (the
recommended settings), and the values some fields take. ``schema.py`` puts them under a name
as a ``DuQuantConfig``; ``config_checks.py`` checks their values."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    # Sorted (regular expression, act_mode) pairs: a layer matched (re.search) runs that mode
    # instead of act_mode (full_w4a4: the expert per step, the LLM and vision per channel).
    act_mode_by_pattern: tuple[tuple[str, str], ...] = ()
    # With --calib: a layer at act_bits < 8 whose best candidate's output SQNR on the held-out
    # half of the captured sample stays below this is built at 8-bit activations; 0 = off.
    a4_min_sqnr_db: float = 0.0
    # and, with it, one whose best measures under plain round-to-nearest W4A8 of the same layer
    # (per-row absmax weights, per-token 8-bit activations) on the same rows is kept at A8 too.
    a4_vs_rtn_w4a8: bool = False
    # ... unless it beats that by at least this many dB (the held-out sample is small: a margin
    # keeps layers at A8 whose gain over RTN W4A8 may not survive other inputs)
    a4_rtn_margin_db: float = 0.0

    @property
    def modes(self) -> set[str]:
        """Every activation mode the config names: ``act_mode`` and its patterns'."""
        return {self.act_mode, *(mode for _, mode in self.act_mode_by_pattern)}

    @property
    def per_step(self) -> bool:
        """Does any layer keep a static scale row per denoising step (and so need the step clock)?"""
        return "per_step_static" in self.modes and self.act_bits > 0

    def runs_per_step(self, layer: str) -> bool:
        """Does ``layer`` keep a scale row per denoising step (and so read the step clock)?"""
        return self.per_step and self.mode_for(layer) == "per_step_static"

    def mode_for(self, layer: str) -> str:
        """The layer's activation mode: the one its ``act_mode_by_pattern`` entries name, else
        ``act_mode``. Patterns naming different modes for one layer are refused."""
        named = {mode for pattern, mode in self.act_mode_by_pattern if re.search(pattern, layer)}
        if len(named) > 1:
            raise ConfigError(
                f"quant.act_mode_by_pattern gives layer {layer} several modes ({', '.join(sorted(named))}): "
                "make its patterns exclusive"
            )
        return named.pop() if named else self.act_mode

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
    # leader's pre-transform; a layer keeps the block its measurements prefer. 0: the layer's
    # full width, where it is a power of two (one rotation spreading an outlier over every channel).
    block_search: tuple[int, ...] = (16,)

    @property
    def per_layer_choice(self) -> bool:
        """Does build choose each layer's transform among several candidates?"""
        return bool(self.equalize or self.smooth_search or self.rtn_candidate)


@dataclass(frozen=True)
class EmbedConfig:
    """Which embedding tables a config quantizes (weight-only: their outputs are a gather, so
    there is no activation to quantize), matched with ``re.search`` on module names;
    ``include = ""`` quantizes none. Rows are stored as ``bits``-bit codes with one float32
    scale per ``group_size`` columns of a row (0: one scale per row)."""

    include: str = ""
    bits: int = 8
    group_size: int = 0
