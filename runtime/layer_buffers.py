"""The tensors a ``DuQuantLinear`` holds: from a bundle layer's arrays, each made once in its final
dtype and device (an array the bundle stores once for many layers held as one tensor), or as
placeholders that ``load_state_dict`` fills.

Also the integer codes' unpacking, which the layer runs on every int4 forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .actquant import ACT_EPS
from .bundle import LayerPack
from .config_sections import STATIC_ACT_MODES
from .errors import NotCalibratedError
from .flowsteps import StepTable

# Kept across one load: (where the bundle stores an array shared by layers, torch dtype) -> its
# tensor, so every layer linked to one stored array holds one tensor.
SharedTensors = dict[tuple[Any, ...], torch.Tensor]


def unpack_codes(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    """Stored codes (uint8 nibble pairs or int8) -> int8 codes [out, in_features]."""
    if stored.dtype == torch.int8:
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(stored.shape[0], -1)[:, :in_features]


def stage_tensors(
    pack: LayerPack, dtype: torch.dtype, device: torch.device | str | None, shared: SharedTensors
) -> dict[str, torch.Tensor]:
    """Each stage's tensor by key, as its kind holds it; one tensor per stored shared array."""
    tensors: dict[str, torch.Tensor] = {}
    for spec in (*pack.stages, *pack.out_stages):
        value = pack.stage_values[spec.key]
        where = pack.shared.get(spec.key)
        if where is None:
            tensors[spec.key] = spec.kind.tensor(value, dtype, device)
            continue
        key = (where, dtype)
        if key not in shared:
            shared[key] = spec.kind.tensor(value, dtype, device)
        tensors[spec.key] = shared[key]
    return tensors


def weight_tensors(
    pack: LayerPack, weight_storage: str, dtype: torch.dtype, device: torch.device | str | None
) -> dict[str, torch.Tensor]:
    """``qweight`` + ``w_scale`` (codes: they stay packed), or ``w_t`` (dequant: unpacked once)."""
    if weight_storage == "codes":
        return {
            "qweight": torch.from_numpy(pack.qweight).to(device=device),
            "w_scale": torch.from_numpy(pack.w_scale).to(device=device),
        }
    codes = unpack_codes(torch.from_numpy(pack.qweight), pack.in_features)
    return {"w_t": (codes.float() * torch.from_numpy(pack.w_scale)[:, None]).to(dtype=dtype, device=device)}


def static_act_scale(scale: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """Static activation scales as the layer holds them: float32, floored at ``ACT_EPS``."""
    return scale.detach().to(device=device, dtype=torch.float32).clamp_min(ACT_EPS)


def uses_static_scales(act_mode: str, act_bits: int) -> bool:
    """Does a layer of this activation setting hold static per-channel or per-step scales (``act_scale``)?"""
    return act_mode in STATIC_ACT_MODES and act_bits > 0


def not_calibrated(name: str | None, act_mode: str) -> NotCalibratedError:
    """The refusal of a static layer run before it has scales: the layer, its mode, and the fix."""
    layer = f"layer {name}" if name else "this DuQuantLinear"
    if act_mode == "per_step_static":
        return NotCalibratedError(
            f"{layer} uses per-step static activation scales (quant.act_mode = 'per_step_static') and has none "
            "yet: call duquant_runtime.calibrate(model) over the denoising loop (the model instrumented) before "
            "the first forward, pass act_scales= to load_bundle, or build the bundle with --calib",
            layer=name,
        )
    return NotCalibratedError(
        f"{layer} uses per-channel static activation scales (quant.act_mode = '{act_mode}') and has none yet: "
        "run batches inside `with duquant_runtime.calibrate(model): ...` before the first forward, pass "
        "act_scales= to load_bundle, or build the bundle with --calib",
        layer=name,
    )


def placeholders(
    layer: Any, blocks: dict[str, int], bias: bool, dtype: torch.dtype, device: torch.device | str | None
) -> dict[str, Callable[[], torch.Tensor | None]]:
    """Every buffer of ``layer`` by name, in registration order, each as the function making its
    placeholder (zeros, ones for scales; None for a buffer its settings leave out) — called only
    for the buffers not given ready, so nothing is allocated twice."""
    fkw: dict[str, Any] = {"dtype": dtype, "device": device}
    out_features, in_features = layer.out_features, layer.in_features
    # An empty tensor in the compute dtype: it follows .to() like every buffer, so the
    # layer knows its dtype even when it holds no float buffer of that dtype (int4 RTN).
    made: dict[str, Callable[[], torch.Tensor | None]] = {"dtype_ref": lambda: torch.empty(0, **fkw)}
    for specs, width in ((layer.stages, in_features), (layer.out_stages, out_features)):
        for spec in specs:
            made[spec.key] = lambda s=spec, w=width: s.kind.placeholder(w, blocks.get(s.key, 1), dtype, device)
    packed = layer.weight_storage == "codes"
    cols = in_features if layer.weight_bits > 4 else (in_features + 1) // 2
    code_dtype = torch.int8 if layer.weight_bits > 4 else torch.uint8
    made["qweight"] = lambda: torch.zeros(out_features, cols, dtype=code_dtype, device=device) if packed else None
    made["w_scale"] = lambda: torch.zeros(out_features, dtype=torch.float32, device=device) if packed else None
    made["w_t"] = lambda: None if packed else torch.zeros(out_features, in_features, **fkw)
    made["bias"] = lambda: torch.zeros(out_features, **fkw) if bias else None
    static = uses_static_scales(layer.act_mode, layer.act_bits)
    act_shape = act_scale_shape(in_features, getattr(layer, "step_table", None))
    made["act_scale"] = lambda: torch.ones(act_shape, dtype=torch.float32, device=device) if static else None
    return made


def act_scale_shape(in_features: int, steps: StepTable | None) -> tuple[int, ...]:
    """[in] static scales, or [steps, in] per-step ones (a row per time of ``steps``)."""
    return (in_features,) if steps is None else (steps.steps, in_features)


def checked_act_scale(scale: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(scale.shape) != shape:
        raise ValueError(f"act scale must have shape {shape}, got {tuple(scale.shape)}")
    return scale
