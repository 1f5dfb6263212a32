"""LazyWeight: what ``DuQuantLinear.weight`` returns — metadata for free, values on use.

openpi's model code reads ``o_proj.weight.dtype`` and ``up_proj.weight.dtype`` in every
decoder layer on every forward. On ``nn.Linear`` that costs nothing; a quantized layer that
rebuilt its dense weight (dequantize + un-rotate) on each read would pay a full-precision
matrix per read — time on every denoising step, and memory past the bf16 model it replaced.

So ``.weight`` is a small view object: ``dtype``, ``device``, ``shape``, ``size()``,
``ndim``/``dim()``, ``numel()`` and ``requires_grad`` are answered from the layer's
metadata without touching any buffer. Everything that needs the values materializes the
dense weight (``DuQuantLinear.dense_weight``) for that use only:

* torch functions (``F.linear(x, layer.weight)``, ``torch.matmul``...) through
  ``__torch_function__``, which torch consults for any argument that defines it;
* tensor attributes and methods (``.T``, ``.float()``, ``.to()``, ``.sum()``...) through
  ``__getattr__``, and the arithmetic operators defined below.

Why not a ``torch.Tensor`` wrapper subclass (torchao's way): a subclass that is not
traceable graph-breaks ``torch.compile`` on every ``.weight`` read, and making it traceable
(``__tensor_flatten__`` over the layer's buffers) re-implements the layer as a tensor. A
plain object with properties is inlined by dynamo, and its cost is what the client pays on
``nn.Linear``. ``isinstance(layer.weight, torch.Tensor)`` is False; call
``layer.weight.materialize()`` (or ``torch.as_tensor``-style use) where a real tensor is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _materialized(value: Any) -> Any:
    if isinstance(value, LazyWeight):
        return value.materialize()
    if isinstance(value, list | tuple):
        return type(value)(_materialized(v) for v in value)
    return value


class LazyWeight:
    """The effective dense weight of a quantized layer, computed only when its values are used.
    The layer gives ``weight_shape``, ``dtype_ref`` (an empty tensor in its compute dtype, on
    its device) and ``dense_weight()``."""

    __slots__ = ("_layer",)

    def __init__(self, layer: Any) -> None:
        self._layer = layer

    # ------------------------------------------------------------ free metadata

    @property
    def layer(self) -> Any:
        """The quantized layer this is the weight of."""
        return self._layer

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.dtype_ref.dtype

    @property
    def device(self) -> torch.device:
        return self._layer.dtype_ref.device

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._layer.weight_shape)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def requires_grad(self) -> bool:
        return False

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 2

    def numel(self) -> int:
        rows, cols = self._layer.weight_shape
        return rows * cols

    # ------------------------------------------------------------ values on use

    def materialize(self) -> torch.Tensor:
        """The dense weight [out, in] in the original basis (a new tensor each call)."""
        return self._layer.dense_weight()

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: tuple[type, ...], args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return func(*_materialized(args), **{k: _materialized(v) for k, v in (kwargs or {}).items()})

    def __getattr__(self, name: str) -> Any:
        # private names are never tensor API: looking them up on the dense weight would
        # recurse while the object is being built (copy, pickle, torch.compile probe them)
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    def __repr__(self) -> str:
        return f"LazyWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __len__(self) -> int:
        return self._layer.weight_shape[0]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.materialize()[index]

    def __array__(self, dtype: Any = None) -> Any:
        array = self.materialize().detach().cpu().numpy()
        return array if dtype is None else array.astype(dtype)

    def __matmul__(self, other: Any) -> torch.Tensor:
        return self.materialize() @ _materialized(other)

    def __rmatmul__(self, other: Any) -> torch.Tensor:
        return _materialized(other) @ self.materialize()

    def __mul__(self, other: Any) -> torch.Tensor:
        return self.materialize() * _materialized(other)

    __rmul__ = __mul__

    def __add__(self, other: Any) -> torch.Tensor:
        return self.materialize() + _materialized(other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> torch.Tensor:
        return self.materialize() - _materialized(other)

    def __rsub__(self, other: Any) -> torch.Tensor:
        return _materialized(other) - self.materialize()

    def __truediv__(self, other: Any) -> torch.Tensor:
        return self.materialize() / _materialized(other)

    def __neg__(self) -> torch.Tensor:
        return -self.materialize()
