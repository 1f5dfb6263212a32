"""Synthetic pi0.5-shaped Linear layers with activation outlier channels (for bench/quality.py).

Generator (deterministic from a seed), per layer of width in -> out:

* activations X [tokens, in]: standard normal plus 16 shared latent factors (0.5 weight,
  so XᵀX has off-diagonal structure as real activations do), times per-channel gains
  exp(N(0, 0.5)) (RMSNorm gains), times per-token scales exp(N(0, 0.3));
  ``ffn_out`` inputs (down_proj / fc2, after a gated GELU) are Student-t (3 dof) instead:
  heavy-tailed and mostly small;
* outlier channels: max(2, in/256) channels carry a consistent "massive activation" of
  20-60x the median channel RMS with 10 % token-to-token jitter, as seen in pi0.5's
  PaliGemma residual stream;
* weights W [out, in]: N(0, 1/in) with row scales exp(N(0, 0.2)); 1 % of input columns
  are 3-5x heavier (norm gains folded into the next Linear).

Calibration and evaluation tokens are separate draws from the same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# (name, in, out): pi0.5 layer shapes. Output rows are capped by the benchmark (rows are
# quantized independently; a row subsample estimates the same SQNR at a fraction of the cost).
PI05_SHAPES = (
    ("llm.q_proj", 2048, 2048, "attn_in"),
    ("llm.k_proj", 2048, 256, "attn_in"),
    ("llm.o_proj", 2048, 2048, "attn_out"),
    ("llm.gate_proj", 2048, 16384, "attn_in"),
    ("llm.down_proj", 16384, 2048, "ffn_out"),
    ("expert.q_proj", 1024, 2048, "attn_in"),
    ("expert.down_proj", 4096, 1024, "ffn_out"),
    ("vision.qkv", 1152, 1152, "attn_in"),
    ("vision.fc1", 1152, 4304, "attn_in"),
    ("vision.fc2", 4304, 1152, "ffn_out"),
)


@dataclass
class SyntheticLayer:
    name: str
    weight: np.ndarray  # float64 [out, in]
    calib: np.ndarray  # float32 [tokens, in]
    evaluation: np.ndarray  # float32 [tokens, in]


def _activations(rng: np.random.Generator, spec: dict, tokens: int) -> np.ndarray:
    n = spec["gains"].shape[0]
    if spec["kind"] == "ffn_out":
        z = rng.standard_t(3, size=(tokens, n)) / np.sqrt(3.0)
    else:
        z = rng.standard_normal((tokens, n))
    z = z + 0.5 * (rng.standard_normal((tokens, 16)) @ spec["factors"])
    x = z * spec["gains"] * np.exp(rng.normal(0, 0.3, size=(tokens, 1)))
    med = np.median(spec["gains"])
    jitter = 1.0 + 0.1 * rng.standard_normal((tokens, spec["outliers"].shape[0]))
    x[:, spec["outliers"]] = spec["outlier_mag"] * med * jitter
    return x.astype(np.float32)


def make_layer(
    name: str, n_in: int, n_out: int, kind: str, *, seed: int, tokens: int = 512, max_rows: int = 512
) -> SyntheticLayer:
    rng = np.random.default_rng(seed)
    rows = min(n_out, max_rows)
    w = rng.standard_normal((rows, n_in)) / np.sqrt(n_in) * np.exp(rng.normal(0, 0.2, size=(rows, 1)))
    heavy = rng.choice(n_in, size=max(1, n_in // 100), replace=False)
    w[:, heavy] *= rng.uniform(3, 5, size=heavy.shape[0])
    n_outliers = max(2, n_in // 256)
    spec = {
        "kind": kind,
        "gains": np.exp(rng.normal(0, 0.5, size=n_in)),
        "factors": rng.standard_normal((16, n_in)) / 4.0,
        "outliers": rng.choice(n_in, size=n_outliers, replace=False),
        "outlier_mag": rng.uniform(20, 60, size=n_outliers) * rng.choice((-1.0, 1.0), size=n_outliers),
    }
    return SyntheticLayer(name, w, _activations(rng, spec, tokens), _activations(rng, spec, tokens))
