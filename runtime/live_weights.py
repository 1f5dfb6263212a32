"""The model's live weights against the source tensors a bundle was built from.

Exactly, by the raw bytes' digest, when the model holds the checkpoint's dtype (large
weights digested ahead, on other cores, while the loader builds layers); otherwise by the
float64 sum and sum of squares, within the rounding a dtype change allows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from .bundle import LayerPack
from .signature import SIGNATURE_RTOL, SOURCE_TORCH_DTYPES, bits_digest, signature_matches, weight_signature

DIGESTED = frozenset(SOURCE_TORCH_DTYPES.values())  # live dtypes a raw-bytes digest can match
# Smaller weights are digested in line: a thread's hand-off costs more than their sum.
AHEAD_MIN_BYTES = 1 << 20


def weights_to_digest(names: list[str], modules: Mapping[str, nn.Module], prefix: str) -> dict[str, torch.Tensor]:
    """The bundle layers' live weights worth digesting ahead, by bundle name."""
    weights = {}
    for name in names:
        module = modules.get(prefix + name)
        weight = module.weight if isinstance(module, nn.Linear | nn.Embedding) else None
        if weight is not None and weight.dtype in DIGESTED and weight.nbytes >= AHEAD_MIN_BYTES:
            weights[name] = weight
    return weights


@contextlib.contextmanager
def digests_ahead(weights: dict[str, torch.Tensor]) -> Iterator[dict[str, Future[int]]]:
    """``bits_digest`` of each weight, summed on other cores while the caller builds layers
    (the sums release the GIL); whatever is left is cancelled when the caller stops. Two
    threads: on 2 cores the full-size digests took 0.41 s of the load with one, 0.28 s with two."""
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(bits_digest, weight) for name, weight in weights.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def signature_problem(name: str, weight: torch.Tensor, pack: LayerPack, digest: Future[int] | None) -> str | None:
    """The live weight against the source the bundle was built from: exactly, by its raw bytes,
    when the model holds the checkpoint's dtype (``digest``: its ``bits_digest``, computed
    ahead); otherwise by float64 sums within the rounding a dtype change allows."""
    if pack.source_bits is not None and weight.dtype == SOURCE_TORCH_DTYPES.get(pack.source_dtype):
        live = digest.result() if digest is not None else bits_digest(weight)
        if live == pack.source_bits:
            return None
        return (
            f"layer {name}: weight differs from the {pack.source_dtype} source tensor the bundle was built from "
            f"(raw-bytes digest {live} in the model, {pack.source_bits} in the bundle): the bundle was built "
            "from another checkpoint than the model's weights"
        )
    live_sum, live_sumsq = weight_signature(weight)
    n = weight.numel()
    rtol = SIGNATURE_RTOL
    source_bits = {"BF16": 8, "F16": 11, "F32": 24, "F64": 53}.get(pack.source_dtype, 53)
    live_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}.get(weight.dtype, 53)
    if live_bits < source_bits or (live_bits == 11 and source_bits == 8):
        rtol = 4.0 * 2.0**-live_bits  # the model holds a rounded copy of the source weights
    if not signature_matches(live_sum, live_sumsq, pack.source_sum, pack.source_sumsq, n, rtol):
        return (
            f"layer {name}: weight signature differs (model sum {live_sum:.9g}, sumsq {live_sumsq:.9g}; bundle "
            f"sum {pack.source_sum:.9g}, sumsq {pack.source_sumsq:.9g}): the bundle was built from another "
            "checkpoint than the model's weights"
        )
    return None
