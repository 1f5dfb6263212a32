"""The embedded demo checkpoint's values and file: pi0.5's (or pi0's) module tree
(``demo_specs``), real depths, reduced (or full) widths.

Every tensor is drawn from a generator seeded by its name, so the file is byte-for-byte
deterministic and any tensor can be regenerated alone. Weights carry the outlier structure
that makes quantization hard, both kinds trained networks have:

* independent: a few heavy input columns per Linear, drawn regardless of the inputs;
* coupled: a few large norm gains whose consumers' weight columns are correspondingly
  small (q/k/v and gate/up, SigLIP's fc1), and up_proj / v_proj rows scaled up whose
  down_proj / o_proj columns are scaled down by the same factor. The large activation
  channels then feed small weight columns, as in trained networks, where a rotation that
  mixes them with ordinary channels loses to plain round-to-nearest. pi0's expert norms are
  gains like the LLM's and couple the same way; pi0.5's are adaptive (a Linear), with no
  static gain to couple.

A pi0.5 file's metadata is the same as before pi0 existed (so its fingerprints stay); a pi0
file's adds ``"model": "pi0"``.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .checkpoint import MODEL_NAME, Checkpoint, CheckpointError, to_bf16_bits, write_safetensors
from .demo_specs import DEMO, EXPERT, FULL, MODELS, SIZES, VISION, Pi05Dims, tensor_specs

__all__ = [
    "DEMO",
    "FULL",
    "MARKER",
    "MODELS",
    "SIZES",
    "Pi05Dims",
    "demo_dims",
    "demo_model_kind",
    "tensor_chunks",
    "tensor_specs",
    "write_demo_checkpoint",
]

SEED = 20240917
CHUNK_ELEMENTS = 1 << 22  # rows are generated this many values at a time
MARKER = "duquant-packs demo checkpoint v4"
# Residual-branch outputs are scaled by 1/sqrt(2 * depth) (GPT-2 style), so the random
# stack is not chaotic and a component's output error reflects quantization, not noise
# amplified through 18-27 random layers.
RESIDUAL_OUT = re.compile(r"\.(o_proj|out_proj|down_proj|fc2)\.weight$")


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng([SEED, zlib.crc32(name.encode())])


def norm_gains(name: str, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(gains, the indices of the large ones) of a norm weight: ~1, a few 10-40."""
    rng = _rng(name)
    gains = 1.0 + 0.1 * rng.standard_normal((width,), dtype=np.float32)
    big = rng.choice(width, size=max(1, width // 100), replace=False)
    gains[big] = rng.uniform(10.0, 40.0, size=big.size)
    return gains, big


def row_coupling(module: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(channels, factors 4-16) by which a producer's rows (up_proj, v_proj) are scaled up and
    its consumer's columns (down_proj, o_proj) scaled down: the product is unchanged."""
    rng = _rng(module + "#coupling")
    channels = rng.choice(rows, size=max(1, rows // 100), replace=False)
    return channels, np.exp(rng.uniform(np.log(4.0), np.log(16.0), size=channels.size)).astype(np.float32)


_NORM_CONSUMER = re.compile(
    r"^(?P<layer>.*layers\.\d+\.)(?:self_attn\.[qkv]_proj|mlp\.(?P<mlp>gate_proj|up_proj|fc1))\.weight$"
)


def _norm_of_consumer(name: str, model: str) -> str | None:
    """The static norm gain feeding a q/k/v, gate/up or fc1 weight (None for pi0.5's expert,
    whose norms are adaptive: there is no static gain to couple)."""
    m = _NORM_CONSUMER.match(name)
    if m is None or (EXPERT in name and model == "pi05"):
        return None
    if VISION in name:
        return f"{m['layer']}{'layer_norm2' if m['mlp'] else 'layer_norm1'}.weight"
    return f"{m['layer']}{'post_attention_layernorm' if m['mlp'] else 'input_layernorm'}.weight"


def coupled_scales(
    name: str, shape: tuple[int, int], dims: Pi05Dims, model: str = "pi05"
) -> tuple[np.ndarray, np.ndarray]:
    """(row factors, column factors) of a Linear weight from the coupling rules above."""
    out, inp = shape
    rows, cols = np.ones(out, dtype=np.float32), np.ones(inp, dtype=np.float32)
    norm = _norm_of_consumer(name, model)
    if norm is not None:
        gains, big = norm_gains(norm, inp)
        cols[big] /= gains[big]
    if VISION not in name and "layers." in name:
        _couple_rows(name, dims, rows, cols)
    return rows, cols


def _couple_rows(name: str, dims: Pi05Dims, rows: np.ndarray, cols: np.ndarray) -> None:
    """A Gemma layer's producer rows (up_proj, v_proj) up, its consumer columns (down_proj,
    o_proj) down by the same factors, in place."""
    layer = name.rsplit(".", 3)[0] + "."  # ...layers.i.
    expert = EXPERT in name
    head_dim = dims.expert_head_dim if expert else dims.llm_head_dim
    heads, kv = (dims.expert_heads, dims.expert_kv_heads) if expert else (dims.llm_heads, dims.llm_kv_heads)
    if name.endswith("mlp.up_proj.weight"):
        ch, f = row_coupling(layer + "mlp", rows.size)
        rows[ch] *= f
    elif name.endswith("mlp.down_proj.weight"):
        ch, f = row_coupling(layer + "mlp", cols.size)
        cols[ch] /= f
    elif name.endswith("self_attn.v_proj.weight"):
        ch, f = row_coupling(layer + "self_attn", rows.size)
        rows[ch] *= f
    elif name.endswith("self_attn.o_proj.weight"):
        ch, f = row_coupling(layer + "self_attn", kv * head_dim)
        group = heads // kv
        for row, factor in zip(ch, f, strict=True):  # v row (g, d) is read at o column (h, d), h in group g
            g, d = divmod(int(row), head_dim)
            for h in range(g * group, (g + 1) * group):
                cols[h * head_dim + d] /= factor


def tensor_chunks(
    name: str, shape: tuple[int, ...], dims: Pi05Dims = DEMO, model: str = "pi05"
) -> Iterator[np.ndarray]:
    """float32 values of one tensor, row chunks at a time (deterministic per name)."""
    rng = _rng(name)
    depth = dims.vision_layers if "vision_tower" in name else dims.llm_layers
    if len(shape) == 2 and name.endswith(".weight") and "embed" not in name:
        out, inp = shape
        row_factor, col_scale = coupled_scales(name, (out, inp), dims, model)
        heavy = rng.choice(inp, size=max(1, inp // 64), replace=False)
        col_scale[heavy] *= rng.uniform(2.0, 5.0, size=heavy.size)  # heavy input channels
        col_scale /= math.sqrt(inp)
        if RESIDUAL_OUT.search(name):
            col_scale /= math.sqrt(2 * depth)
        rows = max(1, CHUNK_ELEMENTS // inp)
        for start in range(0, out, rows):
            n = min(rows, out - start)
            yield rng.standard_normal((n, inp), dtype=np.float32) * col_scale * row_factor[start : start + n, None]
        return
    if len(shape) == 1 and name.endswith(".weight"):  # norm gains, a few of them large
        yield norm_gains(name, shape[0])[0]
        return
    size = math.prod(shape)
    rows_total = shape[0]
    per_row = size // rows_total
    rows = max(1, CHUNK_ELEMENTS // max(1, per_row))
    for start in range(0, rows_total, rows):
        n = min(rows, rows_total - start)
        yield 0.02 * rng.standard_normal((n, *shape[1:]), dtype=np.float32)


def write_demo_checkpoint(
    out_dir: str | Path,
    *,
    full_size: bool = False,
    dtype: str = "BF16",
    on_tensor: Callable[[str, int], None] | None = None,
    size: str | None = None,
    model: str = "pi05",
) -> Path:
    """Write ``out_dir/model.safetensors``; an identical existing file is kept as is.
    ``size``: one of SIZES (default "demo", or "full" with ``full_size``); ``model``: one of
    MODELS (pi0.5's tree, or pi0's)."""
    dims = SIZES[size or ("full" if full_size else "demo")]
    specs = tensor_specs(dims, model)  # refuses an unknown model first
    path = Path(out_dir) / MODEL_NAME
    metadata = _metadata(dims, dtype, model)
    if path.is_file() and _existing_metadata(path) == metadata:
        return path
    shapes = dict(specs)

    def produce(name: str) -> Iterator[np.ndarray]:
        for chunk in tensor_chunks(name, shapes[name], dims, model):
            yield to_bf16_bits(chunk) if dtype == "BF16" else chunk.astype(np.float32)

    write_safetensors(path, [(n, dtype, s) for n, s in specs], produce, metadata, on_tensor)
    return path


def _metadata(dims: Pi05Dims, dtype: str, model: str) -> dict[str, str]:
    """The file's metadata: pi0.5's as it always was (no model key), pi0's with one."""
    meta = {
        "format": "pt",
        "duquant_demo": MARKER,
        "dims": json.dumps(asdict(dims), sort_keys=True),
        "dtype": dtype,
    }
    return meta if model == "pi05" else {**meta, "model": model}


def _existing_metadata(path: Path) -> dict[str, str] | None:
    import struct

    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        Checkpoint.open(path)  # also checks every tensor fits the file (not truncated)
        return header.get("__metadata__")
    except (OSError, ValueError, struct.error, CheckpointError):
        return None


def _demo_metadata(ckpt: Checkpoint) -> dict[str, str]:
    meta = _existing_metadata(ckpt.files[0]) or {}
    if meta.get("duquant_demo") != MARKER:
        raise CheckpointError(f"{ckpt.path} is not a duquant-packs demo checkpoint")
    return meta


def demo_dims(ckpt: Checkpoint) -> Pi05Dims:
    """The dims a demo (or full-size synthetic) checkpoint was written with."""
    return Pi05Dims(**json.loads(_demo_metadata(ckpt)["dims"]))


def demo_model_kind(ckpt: Checkpoint) -> str:
    """Which tree a demo checkpoint holds: "pi05" (a file without the key) or "pi0"."""
    kind = _demo_metadata(ckpt).get("model", "pi05")
    if kind not in MODELS:
        raise CheckpointError(f"{ckpt.path} is a demo checkpoint of an unknown model {kind!r}")
    return kind
