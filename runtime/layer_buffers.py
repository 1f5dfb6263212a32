"""The tensors a ``DuQuantLinear`` holds: from a bundle layer's arrays, each made once in its final
dtype and device (arrays identical across the layers of one load held as one tensor), or as
placeholders that ``load_state_dict`` fills.

Also the integer codes' unpacking, which the layer runs on every int4 forward.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import stages as st
from .actquant import ACT_EPS
from .bundle import LayerPack
from .stages import StageSpec

# Kept across one load: (shape, dtype, crc32, torch dtype) or ("object", id, torch dtype) ->
# (the array, its tensor); ("uniform", id(tensor), width) -> (the tensor, is it uniform).
SharedTensors = dict[tuple[Any, ...], tuple[Any, Any]]


def unpack_codes(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    """Stored codes (uint8 nibble pairs or int8) -> int8 codes [out, in_features]."""
    if stored.dtype == torch.int8:
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(stored.shape[0], -1)[:, :in_features]


class _Shared:
    """Tensors of one load, found again by the array's identity or, failing that, its value."""

    def __init__(self, cache: SharedTensors, device: torch.device | str | None) -> None:
        self.cache, self.device = cache, device

    def tensor(self, array: np.ndarray, to: torch.dtype) -> torch.Tensor:
        # A reader returns one array object per dataset stored once (/shared): found by
        # identity. Bundles before 0.4 store copies: found by value.
        hit = self.cache.get(("object", id(array), to))
        if hit is not None and hit[0] is array:
            return hit[1]
        key = (array.shape, str(array.dtype), zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B")), to)
        hit = self.cache.get(key)
        if hit is None or not np.array_equal(hit[0], array):
            hit = self.cache[key] = (array, torch.from_numpy(array).to(dtype=to, device=self.device))
        self.cache[("object", id(array), to)] = (array, hit[1])
        return hit[1]

    def uniform(self, value: torch.Tensor, width: int) -> bool:
        key = ("uniform", id(value), width)
        if key not in self.cache:
            self.cache[key] = (value, st.is_uniform(value, width))  # holds value: its id stays unique
        return self.cache[key][1]


def stage_tensors(
    pack: LayerPack, dtype: torch.dtype, device: torch.device | str | None, shared: SharedTensors
) -> tuple[dict[str, torch.Tensor], frozenset[str]]:
    """Each stage's tensor by key, and the rotations whose blocks are all one matrix."""
    cache = _Shared(shared, device)
    tensors: dict[str, torch.Tensor] = {}
    uniform = set()
    for spec in (*pack.stages, *pack.out_stages):
        value = pack.stage_values[spec.key]
        if spec.kind == "perm":
            tensors[spec.key] = cache.tensor(value.astype(np.int32, copy=False), torch.int32)
        elif spec.kind == "scale":
            tensors[spec.key] = torch.from_numpy(value).to(dtype=torch.float32, device=device)
        else:
            tensors[spec.key] = blocks = cache.tensor(value, dtype)
            width = pack.out_features if spec in pack.out_stages else pack.in_features
            if cache.uniform(blocks, width):
                uniform.add(spec.key)
    return tensors, frozenset(uniform)


def weight_tensors(
    pack: LayerPack, weight_storage: str, dtype: torch.dtype, device: torch.device | str | None
) -> dict[str, torch.Tensor]:
    """``qweight`` + ``w_scale`` (int4: the codes stay packed), or ``w_t`` (dequant: unpacked once)."""
    if weight_storage == "int4":
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
    """Does a layer of this activation setting hold static per-channel scales (``act_scale``)?"""
    return act_mode == "per_channel_static" and act_bits > 0


def _stage_placeholder(spec: StageSpec, width: int, block: int, fkw: dict[str, Any]) -> torch.Tensor:
    if spec.kind == "perm":  # int32 indices: half the bytes of int64, and index_select accepts them
        return torch.zeros(width, dtype=torch.int32, device=fkw["device"])
    if spec.kind == "scale":
        return torch.ones(width, dtype=torch.float32, device=fkw["device"])
    return torch.zeros(-(-width // block), block, block, **fkw)


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
            made[spec.key] = lambda s=spec, w=width: _stage_placeholder(s, w, blocks.get(s.key, 1), fkw)
    packed = layer.weight_storage == "int4"
    cols = in_features if layer.weight_bits > 4 else (in_features + 1) // 2
    code_dtype = torch.int8 if layer.weight_bits > 4 else torch.uint8
    made["qweight"] = lambda: torch.zeros(out_features, cols, dtype=code_dtype, device=device) if packed else None
    made["w_scale"] = lambda: torch.zeros(out_features, dtype=torch.float32, device=device) if packed else None
    made["w_t"] = lambda: None if packed else torch.zeros(out_features, in_features, **fkw)
    made["bias"] = lambda: torch.zeros(out_features, **fkw) if bias else None
    static = uses_static_scales(layer.act_mode, layer.act_bits)
    made["act_scale"] = lambda: torch.ones(in_features, dtype=torch.float32, device=device) if static else None
    return made
