"""QuantEmbedding: a drop-in replacement for nn.Embedding whose table stays as integer codes.

Rows are ``bits``-bit codes (int8, or int4 two per byte) with one float32 scale per group of
``group_size`` columns (one per row when 0). A forward gathers the requested rows' codes and
scales and dequantizes those rows only: the table is never materialized (PaliGemma's is
257,152 × 2,048, a GB in bf16). ``TiedHead`` is an output projection tied to such a table
(transformers' ``lm_head``): it reads the same codes, so the pair stays one copy.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from .bundle import LayerPack
from .codes import scale_groups
from .errors import DuQuantError
from .layer_buffers import unpack_codes
from .lazy_weight import LazyWeight

# TiedHead dequantizes this many table rows at a time: logits never need the whole table.
HEAD_CHUNK_ROWS = 16384


class QuantEmbedding(nn.Embedding):
    """A quantized nn.Embedding (an instance of it, for code that checks): ``num_embeddings``,
    ``embedding_dim``, ``padding_idx`` and
    ``weight`` behave as there (``weight`` is a :class:`LazyWeight`: metadata for free, the
    dense table built only when its values are used). There is no gradient to the table, so
    ``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` (which only shape gradients) change
    nothing; ``max_norm`` (which renormalizes the table in place) is refused at load.

    Buffers: ``qweight`` (int8 [rows, dim], or uint8 [rows, ceil(dim/2)] nibble pairs),
    ``w_scale`` (float32 [rows, groups]) and ``dtype_ref`` (the compute dtype).
    """

    max_norm = None
    norm_type = 2.0
    scale_grad_by_freq = False
    sparse = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        bits: int,
        group_size: int = 0,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        buffers: dict[str, torch.Tensor] | None = None,
        bundle_name: str | None = None,
        bundle_fingerprint: str | None = None,
    ) -> None:
        """``buffers`` holds ready tensors by name (``from_pack``); the others start as zeros,
        to be filled by ``load_state_dict``."""
        nn.Module.__init__(self)  # not nn.Embedding's: it would allocate the float table
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.bits, self.group_size, self.padding_idx = bits, group_size, padding_idx
        self.bundle_name, self.bundle_fingerprint = bundle_name, bundle_fingerprint
        groups = scale_groups(embedding_dim, group_size)
        cols, code_dtype = (embedding_dim, torch.int8) if bits > 4 else ((embedding_dim + 1) // 2, torch.uint8)
        given = buffers or {}
        made = {
            "qweight": lambda: torch.zeros(num_embeddings, cols, dtype=code_dtype, device=device),
            "w_scale": lambda: torch.zeros(num_embeddings, groups, dtype=torch.float32, device=device),
            "dtype_ref": lambda: torch.empty(0, dtype=dtype, device=device),
        }
        for name, placeholder in made.items():
            self.register_buffer(name, given[name] if name in given else placeholder())
        # transformers' tie_weights() asks get_parameter_or_buffer(".../embed_tokens.weight"), which
        # accepts a name listed among the buffers: an empty entry (never saved, never moved) makes
        # it find the ``weight`` property's LazyWeight, which a TiedHead accepts as its own.
        self._buffers["weight"] = None

    @classmethod
    def from_pack(
        cls,
        pack: LayerPack,
        *,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        like: nn.Embedding | None = None,
        bundle_name: str | None = None,
        bundle_fingerprint: str | None = None,
    ) -> QuantEmbedding:
        """The embedding a pack describes, its buffers made once on ``device``. ``like``: the
        module it replaces, whose ``padding_idx`` it keeps; when that is a subclass of
        nn.Embedding (transformers' ``GemmaTextScaledWordEmbedding`` scales the rows it
        gathers), the replacement is of a class deriving from both, so the subclass's forward
        runs with this table under its ``super().forward``, and its other buffers and
        attributes (``embed_scale``) are kept."""
        buffers = {
            "qweight": torch.from_numpy(pack.qweight).to(device=device),
            "w_scale": torch.from_numpy(pack.w_scale).to(device=device),
        }
        kind = cls if like is None or type(like) is nn.Embedding else _quantized_class(type(like))
        layer = kind.__new__(kind)
        QuantEmbedding.__init__(
            layer,
            pack.out_features,
            pack.in_features,
            bits=pack.weight_bits,
            group_size=pack.group_size,
            padding_idx=None if like is None else like.padding_idx,
            dtype=dtype,
            device=device,
            buffers=buffers,
            bundle_name=bundle_name,
            bundle_fingerprint=bundle_fingerprint,
        )
        if kind is not cls and like is not None:
            _keep_extras(layer, like)
        return layer

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized rows ``index`` (1-D) [len(index), dim] in ``dtype``: codes and scales
        gathered first, so only those rows are ever dequantized."""
        codes = self.qweight.index_select(0, index)
        if codes.dtype == torch.uint8:
            codes = unpack_codes(codes, self.embedding_dim)
        values = codes.to(dtype)
        scales = self.w_scale.index_select(0, index).to(dtype)
        groups = scales.shape[1]
        values.view(len(index), groups, -1).mul_(scales[:, :, None])
        return values

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        return self.rows(flat, self.dtype_ref.dtype).view(*ids.shape, self.embedding_dim)

    # ------------------------------------------------------------ nn.Embedding compatibility

    @property
    def weight(self) -> LazyWeight:
        """The dequantized table [num_embeddings, embedding_dim] in the compute dtype, built only
        when its values are used (a GB for PaliGemma's: read metadata, not values)."""
        return LazyWeight(self)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def dense_weight(self) -> torch.Tensor:
        return self.effective_weight(self.dtype_ref.dtype)

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole dequantized table in ``dtype`` (float64 for exact quality checks)."""
        with torch.no_grad():
            return self.rows(torch.arange(self.num_embeddings, device=self.qweight.device), dtype)

    def buffer_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f"group {self.group_size}" if self.group_size else "per row"
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, int{self.bits} codes ({group})"

    def get_extra_state(self) -> torch.Tensor:
        """Provenance as UTF-8 JSON in a uint8 tensor (a state dict of tensors only, as
        ``safetensors.torch.save_model`` needs)."""
        state = {"bundle_name": self.bundle_name, "bundle_fingerprint": self.bundle_fingerprint}
        return torch.frombuffer(bytearray(json.dumps(state, sort_keys=True).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor | dict[str, Any]) -> None:
        if not isinstance(state, torch.Tensor):
            raise DuQuantError("this QuantEmbedding state was not saved by a QuantEmbedding")
        state = json.loads(bytes(state.tolist()).decode())
        self.bundle_name, self.bundle_fingerprint = state.get("bundle_name"), state.get("bundle_fingerprint")


def _quantized_class(base: type[nn.Embedding]) -> type[QuantEmbedding]:
    """A class whose MRO is (base, QuantEmbedding, nn.Embedding): base's forward, whose
    ``super().forward`` gathers from the codes."""
    return type(f"Quantized{base.__name__}", (base, QuantEmbedding), {"__module__": base.__module__})


def _keep_extras(layer: QuantEmbedding, like: nn.Embedding) -> None:
    """``like``'s own buffers, parameters and attributes besides the table, on ``layer``."""
    for name, buf in like._buffers.items():
        if name not in layer._buffers:
            layer._buffers[name] = buf
            if name in like._non_persistent_buffers_set:
                layer._non_persistent_buffers_set.add(name)
    for name, param in like._parameters.items():
        if name != "weight":
            layer._parameters[name] = param
    for name, value in vars(like).items():
        if not name.startswith("_") and name not in vars(layer) and name != "training":
            setattr(layer, name, value)


class TiedHead(nn.Module):
    """An output projection (``x @ table.T``) tied to a QuantEmbedding: it holds no tensor of its
    own and reads the embedding's codes, ``HEAD_CHUNK_ROWS`` rows at a time. ``weight`` is the
    embedding's; assigning the embedding's weight again (transformers' ``tie_weights()``) is
    accepted, anything else refused."""

    bias = None

    def __init__(self, embedding: QuantEmbedding) -> None:
        super().__init__()
        # not a submodule: the embedding is the model's own, saved and moved once, where it is
        object.__setattr__(self, "_table", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    @property
    def table(self) -> QuantEmbedding:
        return self._table

    @property
    def weight(self) -> LazyWeight:
        return self._table.weight

    @weight.setter
    def weight(self, value: Any) -> None:
        if not (isinstance(value, LazyWeight) and value.layer is self._table):
            raise DuQuantError(
                "this head reads the quantized embedding's codes (tied weights); it cannot take another "
                "weight: leave the embedding out of [embed] to keep the pair in float"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table, rows = self._table, self._table.num_embeddings
        chunks = []
        for start in range(0, rows, HEAD_CHUNK_ROWS):
            index = torch.arange(start, min(rows, start + HEAD_CHUNK_ROWS), device=table.qweight.device)
            chunks.append(x @ table.rows(index, x.dtype).T)
        return torch.cat(chunks, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to {self._table.bundle_name}"
