"""DuQuantLinear: a drop-in replacement for nn.Linear whose buffers come straight from a bundle.

Forward (README, "The algorithms"), purely functional (no attribute assignment, no in-place edit
of inputs), so it works under no_grad, autograd and ``torch.compile(fullgraph=True)``::

    x -> the input stages in order (``stages.py``: scale, permutation, block rotation)
      -> activation fake-quant -> linear with the dequantized transformed weight
      -> the output stages (svd's row rotation) -> + bias

Each stage's array is a buffer named by its key (``in_scale``, ``perm``, ``r_in``...), so
a state dict names what a bundle names.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import stages as st
from .actquant import ACT_EPS, fake_quant, per_token_scale
from .bundle import LayerPack
from .errors import NotCalibratedError
from .lazy_weight import LazyWeight
from .stages import StageSpec

WEIGHT_STORAGES = ("int4", "dequant")
__all__ = ["ACT_EPS", "WEIGHT_STORAGES", "DuQuantLinear", "unpack_codes"]


def unpack_codes(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    """Stored codes (uint8 nibble pairs or int8) -> int8 codes [out, in_features]."""
    if stored.dtype == torch.int8:
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(stored.shape[0], -1)[:, :in_features]


def _stage_buffer(spec: StageSpec, width: int, block: int, fkw: dict[str, Any]) -> torch.Tensor:
    if spec.kind == "perm":  # int32 indices: half the bytes of int64, and index_select accepts them
        return torch.zeros(width, dtype=torch.int32, device=fkw["device"])
    if spec.kind == "scale":
        return torch.ones(width, dtype=torch.float32, device=fkw["device"])
    return torch.zeros(-(-width // block), block, block, **fkw)


class DuQuantLinear(nn.Module):
    """A quantized Linear. Attributes ``in_features``, ``out_features``, ``bias`` and
    ``weight`` behave as on nn.Linear (``weight`` is computed on access; see its doc).

    Buffers: one per stage, named by its key (float32 [in] scales, int32 [in] permutations,
    [nb, B, B] rotation blocks in the compute dtype), either ``qweight`` (packed codes) +
    ``w_scale`` (``weight_storage="int4"``: real 4-bit memory, dequantized on each call) or
    ``w_t`` (``"dequant"``: unpacked once at load, for speed), ``bias`` (optional) and
    ``act_scale`` (static activations). ``stages`` / ``out_stages`` are
    :class:`~duquant_runtime.stages.StageSpec` lists; ``blocks`` gives each rotation's
    block size by key.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_bits: int,
        act_bits: int,
        act_mode: str,
        bias: bool,
        stages: Sequence[StageSpec] = (),
        out_stages: Sequence[StageSpec] = (),
        blocks: dict[str, int] | None = None,
        weight_storage: str = "int4",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        buffers: dict[str, torch.Tensor | None] | None = None,
    ) -> None:
        """``buffers`` holds ready tensors by buffer name (``from_pack``); the others start
        as zeros (ones for scales), to be filled by ``load_state_dict``."""
        super().__init__()
        if weight_storage not in WEIGHT_STORAGES:
            raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGES}, got {weight_storage!r}")
        self.stages, self.out_stages = tuple(stages), tuple(out_stages)
        st.check_plan(self.stages, self.out_stages)
        blocks = blocks or {}
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits, self.act_mode = weight_bits, act_bits, act_mode
        self.weight_storage = weight_storage
        # Python state, set by calibrate()/load_bundle outside forward (never inside it):
        # torch.compile guards on it instead of tracing a mutation. Saved by get_extra_state.
        self.act_calibrated = False
        self.calibrating = False
        self.uniform: frozenset[str] = frozenset()  # rotations whose blocks are all one matrix
        self.bundle_name: str | None = None  # the layer's name in its bundle
        self.bundle_fingerprint: str | None = None
        self.calib_defaults = (32, 99.9)  # the bundle config's calib_steps, act_percentile
        fkw: dict[str, Any] = {"dtype": dtype, "device": device}
        given = buffers if buffers is not None else {}

        def hold(name: str, placeholder: Callable[[], torch.Tensor | None]) -> None:
            self.register_buffer(name, given[name] if name in given else placeholder())

        # An empty tensor in the compute dtype: it follows .to() like every buffer, so the
        # layer knows its dtype even when it holds no float buffer of that dtype (int4 RTN).
        hold("dtype_ref", lambda: torch.empty(0, **fkw))
        for specs, width in ((self.stages, in_features), (self.out_stages, out_features)):
            for spec in specs:
                hold(spec.key, lambda s=spec, w=width: _stage_buffer(s, w, blocks.get(s.key, 1), fkw))
        packed = weight_storage == "int4"
        cols = in_features if weight_bits > 4 else (in_features + 1) // 2
        code_dtype = torch.int8 if weight_bits > 4 else torch.uint8
        hold("qweight", lambda: torch.zeros(out_features, cols, dtype=code_dtype, device=device) if packed else None)
        hold("w_scale", lambda: torch.zeros(out_features, dtype=torch.float32, device=device) if packed else None)
        hold("w_t", lambda: None if packed else torch.zeros(out_features, in_features, **fkw))
        hold("bias", lambda: torch.zeros(out_features, **fkw) if bias else None)
        static = act_mode == "per_channel_static" and act_bits > 0
        hold("act_scale", lambda: torch.ones(in_features, dtype=torch.float32, device=device) if static else None)

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pack(
        cls,
        pack: LayerPack,
        *,
        act_bits: int,
        act_mode: str,
        weight_storage: str = "int4",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shared: dict[tuple[Any, ...], tuple[np.ndarray, torch.Tensor]] | None = None,
    ) -> DuQuantLinear:
        """``shared`` (a dict kept across one load) makes layers whose rotation or
        permutation arrays are identical (every hadamard layer of one width) hold one
        tensor instead of a copy each."""
        fdev = {"device": device}
        cache = shared if shared is not None else {}

        def tensor(array: np.ndarray, to: torch.dtype) -> torch.Tensor:
            # A reader returns one array object per dataset stored once (/shared): found by
            # identity. Bundles before 0.4 store copies: found by value.
            hit = cache.get(("object", id(array), to))
            if hit is not None and hit[0] is array:
                return hit[1]
            key = (array.shape, str(array.dtype), zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B")), to)
            hit = cache.get(key)
            if hit is None or not np.array_equal(hit[0], array):
                hit = cache[key] = (array, torch.from_numpy(array).to(dtype=to, **fdev))
            cache[("object", id(array), to)] = (array, hit[1])
            return hit[1]

        def uniform_blocks(value: torch.Tensor, width: int) -> bool:
            key = ("uniform", id(value), width)
            if key not in cache:
                cache[key] = (value, st.is_uniform(value, width))  # holds value: its id stays unique
            return cache[key][1]

        # Every buffer is made here, in its final dtype and device: nothing is allocated twice.
        buffers: dict[str, torch.Tensor | None] = {"dtype_ref": torch.empty(0, dtype=dtype, **fdev)}
        uniform = set()
        for spec in (*pack.stages, *pack.out_stages):
            value = pack.stage_values[spec.key]
            if spec.kind == "perm":
                buffers[spec.key] = tensor(value.astype(np.int32, copy=False), torch.int32)
            elif spec.kind == "scale":
                buffers[spec.key] = torch.from_numpy(value).to(dtype=torch.float32, **fdev)
            else:
                buffers[spec.key] = blocks = tensor(value, dtype)
                width = pack.out_features if spec in pack.out_stages else pack.in_features
                if uniform_blocks(blocks, width):
                    uniform.add(spec.key)
        if weight_storage == "int4":
            buffers["qweight"] = torch.from_numpy(pack.qweight).to(**fdev)
            buffers["w_scale"] = torch.from_numpy(pack.w_scale).to(**fdev)
        else:
            codes = unpack_codes(torch.from_numpy(pack.qweight), pack.in_features)
            buffers["w_t"] = (codes.float() * torch.from_numpy(pack.w_scale)[:, None]).to(dtype=dtype, **fdev)
        if pack.bias is not None:
            buffers["bias"] = torch.from_numpy(pack.bias).to(dtype=dtype, **fdev)
        layer = cls(
            pack.in_features,
            pack.out_features,
            weight_bits=pack.weight_bits,
            act_bits=act_bits,
            act_mode=act_mode,
            bias=pack.bias is not None,
            stages=pack.stages,
            out_stages=pack.out_stages,
            weight_storage=weight_storage,
            dtype=dtype,
            device=device,
            buffers=buffers,
        )
        layer.uniform = frozenset(uniform)
        if layer.act_scale is not None and pack.act_scale is not None:
            layer.set_act_scale(torch.from_numpy(pack.act_scale))  # built with --calib: no runtime calibration
        return layer

    # ------------------------------------------------------------ forward pieces

    def stage(self, key: str) -> torch.Tensor | None:
        """A stage's buffer by key (``"perm"``, ``"r_in"``...), None when the layer has no such stage."""
        return getattr(self, key) if any(s.key == key for s in (*self.stages, *self.out_stages)) else None

    def _plan(self, specs: tuple[StageSpec, ...]) -> list[tuple[str, torch.Tensor, bool]]:
        return [(s.kind, getattr(self, s.key), s.key in self.uniform) for s in specs]

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the transformed basis: the input stages, in order."""
        return st.forward(self._plan(self.stages), x)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The transformed-basis weight [out, in] in ``dtype``."""
        if self.w_t is not None:
            return self.w_t.to(dtype)
        codes = unpack_codes(self.qweight, self.in_features)
        return codes.to(dtype) * self.w_scale.to(dtype)[:, None]

    def quantize_activations(self, x_t: torch.Tensor) -> torch.Tensor:
        if self.act_bits <= 0:
            return x_t
        if self.act_scale is not None and not self.calibrating:
            if not self.act_calibrated:
                raise NotCalibratedError(
                    "this layer uses static per-channel activation scales but has none: run batches inside "
                    "`with duquant_runtime.calibrate(model): ...` first, or pass act_scales= to load_bundle"
                )
            return fake_quant(x_t, self.act_scale, self.act_bits)
        # per-token dynamic (also used while calibrating, so later layers see quantized inputs)
        return fake_quant(x_t, per_token_scale(x_t, self.act_bits), self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.quantize_activations(self.rotate_input(x))
        y = st.forward(self._plan(self.out_stages), F.linear(x_t, self.dequantized_weight(x_t.dtype)))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    # ------------------------------------------------------------ nn.Linear compatibility

    @property
    def weight(self) -> LazyWeight:
        """The effective dense weight [out, in] in the original basis (weight-quantized,
        activation quantization not included), so ``x @ layer.weight.T + bias`` equals the
        layer with activation quantization off.

        A :class:`LazyWeight`: ``.dtype``, ``.device`` and ``.shape`` cost nothing (openpi
        reads them on every forward); the dense matrix is built only when its values are used
        (a torch function, a tensor method, an operator), detached, in the layer's compute
        dtype. It is not a Parameter and is never stored.
        """
        return LazyWeight(self)

    def dense_weight(self) -> torch.Tensor:
        """The dense effective weight, materialized now (what ``.weight`` computes on use)."""
        return self.effective_weight(self.dtype_ref.dtype)

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense weight in the original basis, in ``dtype`` (float64 for exact quality checks):
        W_t·Tᵀ, the stages walked backwards, then the output rotations undone on the rows."""
        with torch.no_grad():
            w = st.weight_from_basis(self._plan(self.stages), self.dequantized_weight(dtype))
            return st.rows_from_basis(self._plan(self.out_stages), w).contiguous()

    def extra_repr(self) -> str:
        plan = " -> ".join(f"{s.kind}:{s.key}" for s in self.stages) or "none"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w{self.weight_bits}a{self.act_bits} ({self.act_mode}), storage={self.weight_storage}, stages={plan}"
            + (f", out_stages={','.join(s.key for s in self.out_stages)}" if self.out_stages else "")
        )

    def get_extra_state(self) -> torch.Tensor:
        """The layer's Python state as UTF-8 JSON in a uint8 tensor: a state dict of tensors
        only, so ``safetensors.torch.save_model`` can save a loaded model, and a layer rebuilt
        from it can still save activation scales for its bundle."""
        state = {
            "act_calibrated": self.act_calibrated,
            "uniform": sorted(self.uniform),
            "bundle_name": self.bundle_name,
            "bundle_fingerprint": self.bundle_fingerprint,
            "calib_defaults": list(self.calib_defaults),
        }
        return torch.frombuffer(bytearray(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        if isinstance(state, dict):  # state dicts saved by 0.1
            state = {
                "act_calibrated": state.get("act_calibrated"),
                "uniform": ["r_in"] * bool(state.get("uniform_r_in")),
            }
        elif state.numel() == 2:  # 0.2: [act_calibrated, uniform_r_in]
            flags = [bool(v) for v in state.tolist()]
            state = {"act_calibrated": flags[0], "uniform": ["r_in"] * flags[1]}
        else:
            state = json.loads(bytes(state.tolist()).decode())
        keys = {s.key for s in (*self.stages, *self.out_stages)}
        self.act_calibrated = bool(state.get("act_calibrated", False))
        self.uniform = frozenset(k for k in state.get("uniform", []) if k in keys)
        self.bundle_name = state.get("bundle_name")
        self.bundle_fingerprint = state.get("bundle_fingerprint")
        steps, pct = state.get("calib_defaults", self.calib_defaults)
        self.calib_defaults = (int(steps), float(pct))

    def set_act_scale(self, scale: torch.Tensor) -> None:
        """Freeze static activation scales (called outside forward by calibrate/load)."""
        if self.act_scale is None:
            raise ValueError("this layer does not use static activation scales")
        if scale.shape != (self.in_features,):
            raise ValueError(f"act scale must have shape ({self.in_features},), got {tuple(scale.shape)}")
        self.act_scale = scale.detach().to(device=self.dtype_ref.device, dtype=torch.float32).clamp_min(ACT_EPS)
        self.act_calibrated = True

    def buffer_bytes(self) -> int:
        """Bytes of this layer's buffers (a buffer shared with other layers counts in full)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
