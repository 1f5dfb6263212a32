"""Issue 12: reading ``.weight`` metadata costs what it costs on nn.Linear; values still exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from duquant_pipeline.pack import pack_layer
from duquant_pipeline.select import SelectedLayer
from duquant_runtime import DuQuantLinear
from duquant_runtime.config import resolve
from duquant_runtime.lazy_weight import LazyWeight
from torch import nn


def _layer(dtype: torch.dtype = torch.float32, storage: str = "codes") -> tuple[DuQuantLinear, np.ndarray]:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 160)) / 13).astype(np.float32)
    pack = pack_layer(w, None, SelectedLayer("l", "l.weight", None, 96, 160, "F32", 4), "F32", resolve("full_w4a8"))
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_token_dynamic", weight_storage=storage, dtype=dtype)
    return layer, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_metadata_never_dequantizes_or_allocates(monkeypatch, dtype):
    layer, _ = _layer(dtype)
    calls = {"n": 0}
    original = DuQuantLinear.effective_weight

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DuQuantLinear, "effective_weight", counting)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(100):
            w = layer.weight
            assert w.dtype == dtype and w.device == torch.device("cpu") and w.shape == (96, 160)
            assert w.size() == (96, 160) and w.size(1) == 160 and w.ndim == 2 and w.numel() == 96 * 160
    assert calls["n"] == 0
    assert allocated(prof) == 0, f"metadata reads allocated {allocated(prof)} bytes"
    # reading the values still dequantizes, once per use, and the profiler sees that allocate
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        dense = layer.weight.float()
    assert calls["n"] == 1 and dense.shape == (96, 160)
    assert allocated(prof) >= 96 * 160 * dense.element_size()


def allocated(prof: torch.profiler.profile) -> int:
    """Bytes allocated inside a profiled block (booked as each op's self memory)."""
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("storage", ["codes", "dequant"])
def test_weight_values_are_the_exact_dense_weight(storage):
    layer, w = _layer(storage=storage)
    dense = layer.dense_weight()
    x = torch.randn(5, 160, generator=torch.Generator().manual_seed(1))
    lazy = layer.weight
    assert isinstance(lazy, LazyWeight) and not isinstance(lazy, torch.Tensor)
    for got in (
        torch.nn.functional.linear(x, lazy),
        x @ lazy.T,
        torch.matmul(x, lazy.t()),
        x @ lazy.materialize().T,
    ):
        assert torch.equal(got, x @ dense.T)
    assert torch.equal(lazy.sum(0), dense.sum(0)) and torch.equal(lazy[3], dense[3])
    assert np.array_equal(np.asarray(lazy), dense.numpy())
    # with activation quantization off, x @ weight.T is the layer (the documented contract)
    layer.act_bits = 0
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ lazy.T, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(dense.numpy() - w) < 0.15 * np.linalg.norm(w)  # quantized, but this weight


class OpenpiStyle(nn.Module):
    """Reads .weight.dtype inside forward, as openpi's Gemma layers do on every call."""

    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).float()


def test_weight_dtype_read_compiles_fullgraph_and_matches_eager():
    layer, _ = _layer(torch.float32)
    model = OpenpiStyle(layer).eval()
    x = torch.randn(2, 7, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-6)


def test_the_0_5_storage_name_int4_still_means_codes_and_a_wrong_name_is_refused():
    from duquant_runtime.layer import storage_named

    assert storage_named("int4") == "codes" == storage_named("codes")
    with pytest.raises(ValueError, match="weight_storage must be one of"):
        storage_named("int8")
    layer, _ = _layer(storage="int4")
    assert layer.weight_storage == "codes" and layer.qweight is not None and layer.w_t is None
