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
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import stages as st
from .actquant import ACT_EPS, fake_quant, per_token_scale
from .bundle import LayerPack
from .config_sections import QuantConfig
from .errors import DuQuantError
from .flowsteps import StepTable
from .layer_buffers import (
    SharedTensors,
    act_scale_shape,
    checked_act_scale,
    not_calibrated,
    placeholders,
    stage_tensors,
    static_act_scale,
    unpack_codes,
    uses_static_scales,
    weight_tensors,
)
from .lazy_weight import LazyWeight
from .stages import StageSpec

WEIGHT_STORAGES = ("codes", "dequant")
# 0.5 called "codes" "int4", though 5-8 bit layers keep int8 codes: the old name still works.
STORAGE_ALIASES = {"int4": "codes"}
# What calibrate() runs by default on a layer built without a bundle config: the schema's defaults.
CALIB_DEFAULTS = (QuantConfig.calib_steps, QuantConfig.act_percentile)
STATE_BEFORE_0_3 = (
    "this DuQuantLinear state was saved by duquant-packs 0.1 or 0.2, which this version no longer reads: "
    "load the bundle onto the model again with load_bundle"
)
__all__ = ["ACT_EPS", "CALIB_DEFAULTS", "WEIGHT_STORAGES", "DuQuantLinear", "storage_named", "unpack_codes"]


def storage_named(name: str) -> str:
    """``name`` as a weight storage, its 0.5 alias resolved; a ValueError if it is none."""
    name = STORAGE_ALIASES.get(name, name)
    if name not in WEIGHT_STORAGES:
        raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGES}, got {name!r}")
    return name


class DuQuantLinear(nn.Module):
    """A quantized Linear. Attributes ``in_features``, ``out_features``, ``bias`` and
    ``weight`` behave as on nn.Linear (``weight`` is computed on access; see its doc).

    Buffers: one per stage, named by its key, as its kind holds it (float32 [in] scales, int32
    [in] permutations, [nb, B, B] or one tiled [B, B] rotation in the compute dtype), either
    ``qweight`` (packed codes) + ``w_scale`` (``weight_storage="codes"``: real 4-bit memory,
    dequantized on each call) or ``w_t`` (``"dequant"``: unpacked once at load, for speed), ``bias`` (optional) and
    ``act_scale`` (static activations). ``stages`` / ``out_stages`` are
    :class:`~duquant_runtime.stages.StageSpec` lists; ``blocks`` gives each rotation's
    block size by key.

    Provenance, given by whoever builds the layer from a bundle (``load_bundle``): its name
    in the bundle and the bundle's fingerprint (what a saved activation-scales file is bound
    to), and the bundle config's ``calib_steps`` and ``act_percentile`` (``calib_defaults``,
    what ``calibrate`` runs by default).
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
        weight_storage: str = "codes",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        buffers: dict[str, torch.Tensor | None] | None = None,
        act_calibrated: bool = False,
        bundle_name: str | None = None,
        bundle_fingerprint: str | None = None,
        calib_defaults: tuple[int, float] = CALIB_DEFAULTS,
        step_table: StepTable | None = None,
    ) -> None:
        """``buffers`` holds ready tensors by buffer name (``from_pack``); the others start
        as zeros (ones for scales), to be filled by ``load_state_dict``. ``act_calibrated``:
        ``buffers`` holds the static activation scales already. ``step_table``: the flow times
        and step clock of a ``per_step_static`` layer (one ``act_scale`` row per time)."""
        super().__init__()
        if act_mode == "per_step_static" and act_bits > 0 and step_table is None:
            raise DuQuantError("a per_step_static DuQuantLinear needs a step_table (flowsteps.step_table)")
        self.step_table = step_table
        weight_storage = storage_named(weight_storage)
        self.stages, self.out_stages = tuple(stages), tuple(out_stages)
        st.check_plan(self.stages, self.out_stages)
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits, self.act_mode = weight_bits, act_bits, act_mode
        self.weight_storage = weight_storage
        # Python state, set by calibrate() outside forward (never inside it): torch.compile
        # guards on it instead of tracing a mutation. Saved by get_extra_state.
        self.act_calibrated = act_calibrated
        self.act_per_token = False  # calibrate() measured per-token scales better for this layer
        self.bundle_name, self.bundle_fingerprint = bundle_name, bundle_fingerprint
        self.calib_defaults = calib_defaults
        given = buffers or {}
        for name, placeholder in placeholders(self, blocks or {}, bias, dtype, device).items():
            self.register_buffer(name, given[name] if name in given else placeholder())

    # ------------------------------------------------------------ construction

    @classmethod
    def from_pack(
        cls,
        pack: LayerPack,
        *,
        act_bits: int,
        act_mode: str,
        weight_storage: str = "codes",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        shared: SharedTensors | None = None,
        bundle_name: str | None = None,
        bundle_fingerprint: str | None = None,
        calib_defaults: tuple[int, float] = CALIB_DEFAULTS,
        step_table: StepTable | None = None,
    ) -> DuQuantLinear:
        """The layer a pack describes, every buffer made once in its final dtype and device.
        ``shared`` (a dict kept across one load) makes layers whose rotation or permutation
        arrays are identical (every hadamard layer of one width) hold one tensor instead of a
        copy each. A pack built with ``--calib`` brings its static activation scales."""
        stage_values = stage_tensors(pack, dtype, device, shared if shared is not None else {})
        buffers: dict[str, torch.Tensor | None] = {"dtype_ref": torch.empty(0, dtype=dtype, device=device)}
        buffers.update(stage_values)
        buffers.update(weight_tensors(pack, storage_named(weight_storage), dtype, device))
        if pack.bias is not None:
            buffers["bias"] = torch.from_numpy(pack.bias).to(dtype=dtype, device=device)
        calibrated = uses_static_scales(act_mode, act_bits) and pack.act_scale is not None
        if calibrated:  # built with --calib: no runtime calibration
            buffers["act_scale"] = static_act_scale(
                checked_act_scale(torch.from_numpy(pack.act_scale), act_scale_shape(pack.in_features, step_table)),
                buffers["dtype_ref"].device,
            )
        return cls(
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
            act_calibrated=calibrated,
            bundle_name=bundle_name,
            bundle_fingerprint=bundle_fingerprint,
            calib_defaults=calib_defaults,
            step_table=step_table,
        )

    # ------------------------------------------------------------ forward pieces

    def stage(self, key: str) -> torch.Tensor | None:
        """A stage's buffer by key (``"perm"``, ``"r_in"``...), None when the layer has no such stage."""
        return getattr(self, key) if any(s.key == key for s in (*self.stages, *self.out_stages)) else None

    def _plan(self, specs: tuple[StageSpec, ...]) -> st.Plan:
        return [(s.kind, getattr(self, s.key)) for s in specs]

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
        if self.act_scale is not None and not self.act_per_token:
            if not self.act_calibrated:
                raise not_calibrated(self.bundle_name, self.act_mode)
            scale = self.act_scale
            if self.step_table is not None:  # per-step: the row of the step now running, found in the graph
                scale = self.step_table.row_of(scale, self)
            return fake_quant(x_t, scale, self.act_bits)
        # per-token dynamic (also while calibrate() holds the static scales back, so later
        # layers are calibrated on quantized inputs)
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

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

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
        plan = " -> ".join(f"{s.kind.name}:{s.key}" for s in self.stages) or "none"
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
            "act_per_token": self.act_per_token,
            "bundle_name": self.bundle_name,
            "bundle_fingerprint": self.bundle_fingerprint,
            "calib_defaults": list(self.calib_defaults),
        }
        return torch.frombuffer(bytearray(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        # 0.1 saved a dict, 0.2 two flags [act_calibrated, uniform_r_in]: neither holds the
        # provenance a layer is built with since, so such a state is refused, not guessed.
        if not isinstance(state, torch.Tensor) or state.numel() == 2:
            raise DuQuantError(STATE_BEFORE_0_3)
        state = json.loads(bytes(state.tolist()).decode())
        self.act_calibrated = bool(state.get("act_calibrated", False))
        self.act_per_token = bool(state.get("act_per_token", False))
        self.bundle_name = state.get("bundle_name")
        self.bundle_fingerprint = state.get("bundle_fingerprint")
        steps, pct = state.get("calib_defaults", self.calib_defaults)
        self.calib_defaults = (int(steps), float(pct))

    def set_act_scale(self, scale: torch.Tensor, per_token: bool = False) -> None:
        """Freeze static activation scales (called outside forward by calibrate/load); ``per_token``:
        quantize per token instead, where calibration measured that better."""
        if self.act_scale is None:
            raise ValueError("this layer does not use static activation scales")
        self.act_scale = static_act_scale(checked_act_scale(scale, tuple(self.act_scale.shape)), self.dtype_ref.device)
        self.act_calibrated, self.act_per_token = True, per_token

    def buffer_bytes(self) -> int:
        """Bytes of this layer's buffers (a buffer shared with other layers counts in full)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())
