"""One layer's pack job, as a worker runs it: open the checkpoint (and statistics) by path, read
and check the layer's weight, pack it. A function of its inputs only: the process settings a
worker runs with are made once per worker (``process.init_worker``), so the job itself can run
unchanged in a loky worker, a thread, a Dask worker or the parent."""

from __future__ import annotations

import numpy as np
import torch
from duquant_runtime.bundle import LayerPack
from duquant_runtime.bundle_records import EMBEDDING
from duquant_runtime.signature import bits_digest, signature_matches, weight_signature
from duquant_runtime.stats import LayerStats, StatsError, StatsReader

from . import process
from .checkpoint import Checkpoint, CheckpointError
from .embed import pack_embedding
from .pack import pack_layer, readonly_tensor
from .proxy import activation_rms
from .recipe import Recipe
from .select import SelectedLayer

# Statistics may be captured on a model holding a rounded copy (bf16/fp16) of the
# checkpoint's weights; another checkpoint's weights differ far more than this.
STATS_RTOL = 1e-4


def _open_stats(stats_path: str) -> StatsReader:
    # The build checked the whole file's seal once; a worker checks only its layers' datasets.
    return StatsReader(stats_path, whole_file=False)


def _layer_stats(stats_path: str, layer: SelectedLayer, signature: tuple[float, float], size: int) -> LayerStats:
    """The layer's statistics, refused when they were captured on other weights."""
    reader = process.cached_open(_open_stats, stats_path)
    meta = reader.meta.get(layer.name)
    if meta is None:
        raise StatsError(f"{stats_path} has no statistics for {layer.name}; capture them with the same config")
    if not signature_matches(*signature, meta["weight_sum"], meta["weight_sumsq"], size, STATS_RTOL):
        raise StatsError(
            f"{stats_path} was captured on another checkpoint: the weight of {layer.name} differs from the one "
            "the statistics were recorded with; capture statistics on this checkpoint's model"
        )
    return reader.layer(layer.name)


def layer_job(ckpt_path: str, layer: SelectedLayer, recipe: Recipe, stats_path: str | None = None) -> LayerPack:
    """Runs in a worker: open the checkpoint here, so only names cross the process boundary."""
    ckpt = process.cached_open(Checkpoint.open, ckpt_path)
    # A float64 method (the seed's svd reproduces its float64 numbers) reads float64; the
    # others float32, which holds bf16/fp16/fp32 sources exactly.
    exact64 = recipe.rotation.dtype == torch.float64 or layer.dtype == "F64"
    raw = ckpt.raw(layer.weight)  # selection keeps floating tensors only
    dtype = ckpt.tensors[layer.weight].dtype
    if layer.kind == EMBEDDING:  # read in its own dtype, a chunk of rows at a time
        return pack_embedding(raw, layer.name, dtype, recipe.config, bits_digest(raw))
    weight = raw.to(torch.float64 if exact64 else torch.float32).numpy()
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise CheckpointError(
            f"layer {layer.name} has {bad} NaN/Inf value(s) in {layer.weight}; fix the checkpoint or exclude the layer"
        )
    bias = ckpt.read(layer.bias) if layer.bias else None
    if bias is not None and not np.isfinite(bias).all():
        raise CheckpointError(f"layer {layer.name} has NaN/Inf value(s) in {layer.bias}")
    signature = weight_signature(readonly_tensor(weight))
    stats = None if stats_path is None else _layer_stats(stats_path, layer, signature, weight.size)
    act = _activation_estimate(ckpt, layer) if stats is None else None
    return pack_layer(weight, bias, layer, dtype, recipe, stats, signature, source_bits=bits_digest(raw), act_rms=act)


def _activation_estimate(ckpt: Checkpoint, layer: SelectedLayer) -> np.ndarray | None:
    """The layer's data-free activation RMS estimate from its producers' tensors (pipeline/proxy.py)."""
    if layer.proxy is None:
        return None
    act = activation_rms(layer.proxy, lambda name: ckpt.read(name, np.float32), layer.in_features)
    return act if np.isfinite(act).all() else None  # a NaN producer: rank as without an estimate
