"""A weight's signatures, stored per layer in bundles and compared against live weights to
catch another checkpoint's weights:

* ``bits_digest``: the exact sum of the tensor's raw bytes as int64 words. A load checks it
  when the model holds the weight in the checkpoint's own dtype (bf16 models from bf16
  checkpoints: the common case); it reads each byte once, at memory speed, on the weight's
  own device, and any change of any element (one ulp of one bf16 weight) changes it.
* ``weight_signature``: float64 (sum, sum of squares), also in statistics files; compared
  within a tolerance, it holds across dtypes (an fp32 model from a bf16 checkpoint).
"""

from __future__ import annotations

import math

import torch

# float64 sums of the same values in another order agree to ~1e-15; a one-ulp change
# of one bf16 weight moves them by far more than this.
SIGNATURE_RTOL = 1e-11


def weight_signature(weight: torch.Tensor, chunk_elements: int = 1 << 20) -> tuple[float, float]:
    """float64 (sum, sum of squares) of a weight, on its own device.

    Row chunks keep the float64 temporaries cache-sized (2.7x faster than one float64
    copy of a 16384x2048 weight on CPU); the sums agree to ~1e-13 relative.
    """
    flat = weight.detach().reshape(-1)
    total = squares = 0.0
    for chunk in flat.split(chunk_elements):
        c = chunk.to(torch.float64)
        total += float(c.sum())
        squares += float(torch.dot(c, c))
    return total, squares


# The live dtype whose raw bytes are the checkpoint's, per safetensors dtype name.
SOURCE_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_WORD = 8


def bits_digest(weight: torch.Tensor) -> int:
    """Σ of the tensor's raw bytes read as little-endian int64 words (a short last word
    zero-padded), modulo 2⁶⁴, as a signed int64. Exact integer arithmetic: the same on every
    device and in every summation order. On CPU the sum runs in NumPy, which uses no
    OpenMP team: ``load_bundle`` runs it beside its own torch work without oversubscribing."""
    raw = weight.detach().contiguous().reshape(-1).view(torch.uint8)
    whole = raw.numel() - raw.numel() % _WORD
    words = raw[:whole]
    if words.storage_offset() % _WORD:  # a view into a buffer at an odd offset: align a copy
        words = words.clone()
    total = 0
    if whole:
        words = words.view(torch.int64)
        total = int(words.numpy().sum()) if words.device.type == "cpu" else int(words.sum())
    if whole < raw.numel():
        tail = torch.zeros(_WORD, dtype=torch.uint8, device=raw.device)
        tail[: raw.numel() - whole] = raw[whole:]
        total += int(tail.view(torch.int64).sum())
    total &= (1 << 64) - 1
    return total - (1 << 64) if total >= 1 << 63 else total


def signature_matches(a_sum: float, a_sumsq: float, b_sum: float, b_sumsq: float, n: int, rtol: float) -> bool:
    """Two float64 (sum, sum of squares) signatures of n-element weights agree within rtol
    (the sum relative to its natural scale sqrt(n · sumsq))."""
    scale = math.sqrt(n * max(b_sumsq, 1e-300))
    return abs(a_sum - b_sum) <= rtol * scale + 1e-30 and abs(a_sumsq - b_sumsq) <= rtol * b_sumsq + 1e-30
