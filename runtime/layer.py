"""DuQuantLinear: a drop-in replacement for nn.Linear whose buffers come straight from a bundle.

Forward (DESIGN.md §5), purely functional (no attribute assignment, no in-place edit
of inputs), so it works under no_grad, autograd and ``torch.compile(fullgraph=True)``::

    x [-> x·in_scale]   (per-channel equalization, format 2; optional)
      [-> x[..., perm]] -> [blockwise x·R_in (one bmm over the stacked blocks)]
      [-> x[..., perm2] -> blockwise x·R_in2]   (duquant's second rotation)
      -> activation fake-quant -> linear with the dequantized transformed weight
      -> blockwise y·R_out (one bmm) -> + bias
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .bundle import LayerPack
from .errors import NotCalibratedError
from .lazy_weight import LazyWeight
from .packing import qmax

WEIGHT_STORAGES = ("int4", "dequant")
ACT_EPS = 1e-8


def unpack_codes(stored: torch.Tensor, in_features: int) -> torch.Tensor:
    """Stored codes (uint8 nibble pairs or int8) -> int8 codes [out, in_features]."""
    if stored.dtype == torch.int8:
        return stored
    low = (stored & 0x0F).to(torch.int8) - 8
    high = (stored >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).reshape(stored.shape[0], -1)[:, :in_features]


def block_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x[..., n] · blockdiag(blocks) with ``blocks`` [nb, B, B] identity-padded past n.

    One batched matmul over all blocks (the short last block included, via zero padding).
    """
    nb, b, _ = blocks.shape
    n = x.shape[-1]
    pad = nb * b - n
    if pad:
        x = F.pad(x, (0, pad))
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, b).transpose(0, 1)  # [nb, tokens, B]
    y = torch.bmm(xb, blocks).transpose(0, 1).reshape(*lead, nb * b)
    return y[..., :n] if pad else y


def same_block_rotate(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x · blockdiag(block, ..., block) for a width that is a multiple of B: one GEMM over
    [tokens·nb, B] rows, no transposed copies (every hadamard layer without signs)."""
    return (x.reshape(-1, block.shape[0]) @ block).view(x.shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric fake quantization with a straight-through gradient (identity backward)."""
    q = qmax(bits)
    xf = x.float()
    quantized = torch.clamp(torch.round(xf / scale), -q - 1, q) * scale
    return x + (quantized.to(x.dtype) - x).detach()


class DuQuantLinear(nn.Module):
    """A quantized Linear. Attributes ``in_features``, ``out_features``, ``bias`` and
    ``weight`` behave as on nn.Linear (``weight`` is computed on access; see its doc).

    Buffers: ``in_scale`` (float32 [in], optional: the input equalization), ``perm``
    (int32, optional), ``r_in`` [nb, B, B] (optional: absent = no rotation), ``r_out`` (optional),
    either ``qweight`` (packed codes) + ``w_scale`` (``weight_storage="int4"``: real
    4-bit memory, dequantized on each call) or ``w_t`` (``"dequant"``: unpacked once at
    load, for speed), ``bias`` (optional) and ``act_scale`` (static activations).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        weight_bits: int,
        act_bits: int,
        act_mode: str,
        block_size: int,
        block_out_size: int,
        permute: bool,
        row_rot: bool,
        bias: bool,
        second_stage: bool = False,
        second_perm: bool = False,
        rotate: bool = True,
        equalize: bool = False,
        weight_storage: str = "int4",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if weight_storage not in WEIGHT_STORAGES:
            raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGES}, got {weight_storage!r}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_bits, self.act_bits, self.act_mode = weight_bits, act_bits, act_mode
        self.weight_storage = weight_storage
        # Python flags, set by calibrate()/load_bundle outside forward (never inside it):
        # torch.compile guards on them instead of tracing a mutation.
        self.act_calibrated = False
        # Set by from_pack when every r_in block is the same matrix and tiles the width exactly.
        self.uniform_r_in = False
        self.calibrating = False
        nb, nbo = -(-in_features // block_size), -(-out_features // block_out_size)
        fkw: dict[str, Any] = {"dtype": dtype, "device": device}
        # An empty tensor in the compute dtype: it follows .to() like every buffer, so the
        # layer knows its dtype even when it holds no float buffer of that dtype (int4 RTN).
        self.register_buffer("dtype_ref", torch.empty(0, **fkw))
        self.register_buffer(
            "in_scale", torch.ones(in_features, dtype=torch.float32, device=device) if equalize else None
        )
        # int32 indices: half the bytes of int64, and index_select accepts them
        self.register_buffer("perm", torch.zeros(in_features, dtype=torch.int32, device=device) if permute else None)
        self.register_buffer("r_in", torch.zeros(nb, block_size, block_size, **fkw) if rotate else None)
        self.register_buffer(
            "perm2", torch.zeros(in_features, dtype=torch.int32, device=device) if second_perm else None
        )
        self.register_buffer("r_in2", torch.zeros(nb, block_size, block_size, **fkw) if second_stage else None)
        self.register_buffer("r_out", torch.zeros(nbo, block_out_size, block_out_size, **fkw) if row_rot else None)
        if weight_storage == "int4":
            cols = in_features if weight_bits > 4 else (in_features + 1) // 2
            code_dtype = torch.int8 if weight_bits > 4 else torch.uint8
            self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=code_dtype, device=device))
            self.register_buffer("w_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
            self.register_buffer("w_t", None)
        else:
            self.register_buffer("qweight", None)
            self.register_buffer("w_scale", None)
            self.register_buffer("w_t", torch.zeros(out_features, in_features, **fkw))
        self.register_buffer("bias", torch.zeros(out_features, **fkw) if bias else None)
        static = act_mode == "per_channel_static" and act_bits > 0
        self.register_buffer(
            "act_scale", torch.ones(in_features, dtype=torch.float32, device=device) if static else None
        )

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
        layer = cls(
            pack.in_features,
            pack.out_features,
            weight_bits=pack.weight_bits,
            act_bits=act_bits,
            act_mode=act_mode,
            block_size=pack.block_size,
            block_out_size=pack.block_out_size,
            permute=pack.perm is not None,
            row_rot=pack.r_out is not None,
            bias=pack.bias is not None,
            second_stage=pack.r_in2 is not None,
            second_perm=pack.perm2 is not None,
            rotate=pack.r_in is not None,
            equalize=pack.in_scale is not None,
            weight_storage=weight_storage,
            dtype=dtype,
            device="meta",
        )
        # Buffers are replaced (not copied into) so nothing is allocated twice.
        fdev = {"device": device}
        cache = shared if shared is not None else {}

        def tensor(array: np.ndarray, to: torch.dtype) -> torch.Tensor:
            key = (array.shape, str(array.dtype), zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B")), to)
            hit = cache.get(key)
            if hit is not None and (hit[0] is array or np.array_equal(hit[0], array)):
                return hit[1]
            out = torch.from_numpy(array).to(dtype=to, **fdev)
            cache[key] = (array, out)
            return out

        layer.dtype_ref = torch.empty(0, dtype=dtype, **fdev)
        if pack.in_scale is not None:
            layer.in_scale = torch.from_numpy(pack.in_scale).to(dtype=torch.float32, **fdev)
        if pack.perm is not None:
            layer.perm = tensor(pack.perm.astype("int32"), torch.int32)
        if pack.r_in is not None:
            layer.r_in = tensor(pack.r_in, dtype)
            layer.uniform_r_in = pack.in_features % pack.block_size == 0 and bool((pack.r_in == pack.r_in[:1]).all())
        if pack.perm2 is not None:
            layer.perm2 = tensor(pack.perm2.astype("int32"), torch.int32)
        if pack.r_in2 is not None:
            layer.r_in2 = tensor(pack.r_in2, dtype)
        if pack.r_out is not None:
            layer.r_out = torch.from_numpy(pack.r_out).to(dtype=dtype, **fdev)
        qweight = torch.from_numpy(pack.qweight)
        w_scale = torch.from_numpy(pack.w_scale)
        if weight_storage == "int4":
            layer.qweight = qweight.to(**fdev)
            layer.w_scale = w_scale.to(**fdev)
        else:
            codes = unpack_codes(qweight, pack.in_features)
            layer.w_t = (codes.float() * w_scale[:, None]).to(dtype=dtype, **fdev)
        if pack.bias is not None:
            layer.bias = torch.from_numpy(pack.bias).to(dtype=dtype, **fdev)
        if layer.act_scale is not None:
            layer.act_scale = torch.ones(pack.in_features, dtype=torch.float32, **fdev)
            if pack.act_scale is not None:  # built with --calib: no runtime calibration needed
                layer.set_act_scale(torch.from_numpy(pack.act_scale))
        return layer

    # ------------------------------------------------------------ forward pieces

    def rotate_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the transformed basis: equalize, permute channels, then rotate each block."""
        if self.in_scale is not None:
            x = x * self.in_scale.to(x.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.r_in is not None:
            if self.uniform_r_in:
                x = same_block_rotate(x, self.r_in[0].to(x.dtype))
            else:
                x = block_rotate(x, self.r_in.to(x.dtype))
        if self.perm2 is not None:
            x = x.index_select(-1, self.perm2)
        if self.r_in2 is not None:
            x = block_rotate(x, self.r_in2.to(x.dtype))
        return x

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
        scale = (x_t.detach().float().abs().amax(dim=-1, keepdim=True) / qmax(self.act_bits)).clamp_min(ACT_EPS)
        return fake_quant(x_t, scale, self.act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_t = self.quantize_activations(self.rotate_input(x))
        y = F.linear(x_t, self.dequantized_weight(x_t.dtype))
        if self.r_out is not None:
            y = block_rotate(y, self.r_out.to(y.dtype))
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
        """The dense weight in the original basis, in ``dtype`` (float64 for exact quality checks)."""
        with torch.no_grad():
            w = self.dequantized_weight(dtype)
            # W_eff = W_t · Tᵀ for the input transform T = D·P·A1[·P2·A2] (D the equalization,
            # A1 need not be orthogonal: it carries the smoothing), applied right to left.
            if self.r_in2 is not None:
                w = block_rotate(w, self.r_in2.to(dtype).transpose(1, 2))
            if self.perm2 is not None:
                w = torch.empty_like(w).index_copy_(1, self.perm2.long(), w)
            if self.r_in is not None and self.uniform_r_in:  # one GEMM, as in the forward
                w = same_block_rotate(w, self.r_in[0].to(dtype).t())
            elif self.r_in is not None:
                w = block_rotate(w, self.r_in.to(dtype).transpose(1, 2))  # W_t · blockdiag(R_in)ᵀ
            if self.perm is not None:
                w = torch.empty_like(w).index_copy_(1, self.perm.long(), w)  # undo the permutation
            if self.in_scale is not None:
                w = w * self.in_scale.to(dtype)[None, :]
            if self.r_out is not None:  # blockdiag(R_out)ᵀ · W
                w = block_rotate(w.t(), self.r_out.to(dtype)).t()
            return w.contiguous()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"w{self.weight_bits}a{self.act_bits} ({self.act_mode}), storage={self.weight_storage}"
            + (f", block={self.r_in.shape[1]}" if self.r_in is not None else ", no rotation")
            + f", permute={self.perm is not None}, row_rot={self.r_out is not None}"
            + (", equalized" if self.in_scale is not None else "")
            + (", two-stage" if self.r_in2 is not None else "")
        )

    def get_extra_state(self) -> torch.Tensor:
        """The two flags as a uint8 tensor [act_calibrated, uniform_r_in]: a state dict of
        tensors only, so ``safetensors.torch.save_model`` can save a loaded model."""
        return torch.tensor([self.act_calibrated, self.uniform_r_in], dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        if isinstance(state, dict):  # state dicts saved by 0.1
            self.act_calibrated = bool(state.get("act_calibrated", False))
            self.uniform_r_in = bool(state.get("uniform_r_in", False))
            return
        flags = [bool(v) for v in state.tolist()]
        self.act_calibrated, self.uniform_r_in = flags[0], flags[1]

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
