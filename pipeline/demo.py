"""The embedded demo checkpoint: pi0.5's module tree, real depths, reduced (or full) widths.

Names follow openpi's PyTorch ``PI0Pytorch`` state dict. Every tensor is drawn from a
generator seeded by its name, so the file is byte-for-byte deterministic and any tensor
can be regenerated alone. Weights carry the outlier structure that makes quantization
hard, both kinds trained networks have:

* independent: a few heavy input columns per Linear, drawn regardless of the inputs;
* coupled: a few large norm gains whose consumers' weight columns are correspondingly
  small (q/k/v and gate/up, SigLIP's fc1), and up_proj / v_proj rows scaled up whose
  down_proj / o_proj columns are scaled down by the same factor. The large activation
  channels then feed small weight columns, as in trained networks, where a rotation that
  mixes them with ordinary channels loses to plain round-to-nearest.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .checkpoint import MODEL_NAME, Checkpoint, CheckpointError, to_bf16_bits, write_safetensors

SEED = 20240917
CHUNK_ELEMENTS = 1 << 22  # rows are generated this many values at a time
MARKER = "duquant-packs demo checkpoint v4"
# Residual-branch outputs are scaled by 1/sqrt(2 * depth) (GPT-2 style), so the random
# stack is not chaotic and a component's output error reflects quantization, not noise
# amplified through 18-27 random layers.
RESIDUAL_OUT = re.compile(r"\.(o_proj|out_proj|down_proj|fc2)\.weight$")

PG = "paligemma_with_expert.paligemma.model."
VISION = PG + "vision_tower.vision_model."
LLM = PG + "language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."


@dataclass(frozen=True)
class Pi05Dims:
    llm_width: int
    llm_heads: int
    llm_head_dim: int
    llm_kv_heads: int
    llm_mlp: int
    vocab: int
    expert_width: int
    expert_heads: int
    expert_head_dim: int
    expert_kv_heads: int
    expert_mlp: int
    vision_width: int
    vision_heads: int
    vision_mlp: int
    vision_positions: int = 256
    patch: int = 14
    action_dim: int = 32
    llm_layers: int = 18
    expert_layers: int = 18
    vision_layers: int = 27


# The real pi0.5: Gemma-2B LLM, Gemma-300M action expert, SigLIP So400m/14.
FULL = Pi05Dims(2048, 8, 256, 1, 16384, 257152, 1024, 8, 256, 1, 4096, 1152, 16, 4304)
# Reduced widths, same depths and head structure; 152 and 600 are not multiples of 16
# (like SigLIP's 4304 is not a multiple of 64), so short last blocks are always exercised.
DEMO = Pi05Dims(256, 4, 64, 1, 1024, 1024, 128, 4, 64, 1, 512, 152, 4, 600)
# Benchmark sizes (full_w4a8 selects ~7 M, ~30 M, ~114 M and ~2.7 G weights): how builds
# and loads scale from the demo to the real model.
SIZES = {
    "small": Pi05Dims(128, 2, 64, 1, 512, 1024, 64, 2, 32, 1, 256, 76, 2, 300),
    "demo": DEMO,
    "mid": Pi05Dims(512, 8, 64, 1, 2048, 4096, 256, 4, 64, 1, 1024, 304, 4, 1200),
    "full": FULL,
}


Spec = tuple[str, tuple[int, ...]]  # a tensor's name and shape


def tensor_specs(d: Pi05Dims) -> list[Spec]:
    """(name, shape) of every tensor, in file order."""
    e = d.expert_width
    return [
        *_vision_specs(d),
        *_linear(f"{PG}multi_modal_projector.linear", d.llm_width, d.vision_width, bias=True),
        (f"{LLM}embed_tokens.weight", (d.vocab, d.llm_width)),
        *_gemma_specs(d, expert=False),
        *_gemma_specs(d, expert=True),
        *_linear("action_in_proj", e, d.action_dim, bias=True),
        *_linear("action_out_proj", d.action_dim, e, bias=True),
        *_linear("time_mlp_in", e, e, bias=True),
        *_linear("time_mlp_out", e, e, bias=True),
    ]


def _linear(name: str, out: int, inp: int, *, bias: bool) -> list[Spec]:
    weight = (f"{name}.weight", (out, inp))
    return [weight, (f"{name}.bias", (out,))] if bias else [weight]


def _vision_specs(d: Pi05Dims) -> list[Spec]:
    """SigLIP: patch and position embeddings, the encoder layers, the last norm."""
    v = d.vision_width
    specs: list[Spec] = [
        (f"{VISION}embeddings.patch_embedding.weight", (v, 3, d.patch, d.patch)),
        (f"{VISION}embeddings.patch_embedding.bias", (v,)),
        (f"{VISION}embeddings.position_embedding.weight", (d.vision_positions, v)),
    ]
    for i in range(d.vision_layers):
        p = f"{VISION}encoder.layers.{i}."
        specs += [(f"{p}layer_norm1.weight", (v,)), (f"{p}layer_norm1.bias", (v,))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(f"{p}self_attn.{proj}", v, v, bias=True)
        specs += [(f"{p}layer_norm2.weight", (v,)), (f"{p}layer_norm2.bias", (v,))]
        specs += _linear(f"{p}mlp.fc1", d.vision_mlp, v, bias=True)
        specs += _linear(f"{p}mlp.fc2", v, d.vision_mlp, bias=True)
    return [*specs, (f"{VISION}post_layernorm.weight", (v,)), (f"{VISION}post_layernorm.bias", (v,))]


def _gemma_specs(d: Pi05Dims, *, expert: bool) -> list[Spec]:
    """A Gemma stack's layers and final norm: the LLM's, or the action expert's, whose norms
    are pi0.5's adaptive RMSNorm (a Linear from the time conditioning) instead of a gain."""
    prefix, stem = (EXPERT, "expert") if expert else (LLM, "llm")  # Pi05Dims: expert_width, llm_width, ...
    fields = ("width", "heads", "head_dim", "kv_heads", "mlp", "layers")
    width, heads, head_dim, kv, mlp, depth = (int(getattr(d, f"{stem}_{field}")) for field in fields)

    def norm(name: str) -> list[Spec]:
        return _linear(f"{name}.dense", 3 * width, width, bias=True) if expert else [(f"{name}.weight", (width,))]

    specs: list[Spec] = []
    for i in range(depth):
        p = f"{prefix}layers.{i}."
        specs += norm(f"{p}input_layernorm")
        specs += _linear(f"{p}self_attn.q_proj", heads * head_dim, width, bias=False)
        specs += _linear(f"{p}self_attn.k_proj", kv * head_dim, width, bias=False)
        specs += _linear(f"{p}self_attn.v_proj", kv * head_dim, width, bias=False)
        specs += _linear(f"{p}self_attn.o_proj", width, heads * head_dim, bias=False)
        specs += norm(f"{p}post_attention_layernorm")
        specs += _linear(f"{p}mlp.gate_proj", mlp, width, bias=False)
        specs += _linear(f"{p}mlp.up_proj", mlp, width, bias=False)
        specs += _linear(f"{p}mlp.down_proj", width, mlp, bias=False)
    return [*specs, *norm(f"{prefix}norm")]


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


def _norm_of_consumer(name: str) -> str | None:
    """The static norm gain feeding a q/k/v, gate/up or fc1 weight (None for the expert,
    whose norms are adaptive: there is no static gain to couple)."""
    m = _NORM_CONSUMER.match(name)
    if m is None or EXPERT in name:
        return None
    if VISION in name:
        return f"{m['layer']}{'layer_norm2' if m['mlp'] else 'layer_norm1'}.weight"
    return f"{m['layer']}{'post_attention_layernorm' if m['mlp'] else 'input_layernorm'}.weight"


def coupled_scales(name: str, shape: tuple[int, int], dims: Pi05Dims) -> tuple[np.ndarray, np.ndarray]:
    """(row factors, column factors) of a Linear weight from the coupling rules above."""
    out, inp = shape
    rows, cols = np.ones(out, dtype=np.float32), np.ones(inp, dtype=np.float32)
    norm = _norm_of_consumer(name)
    if norm is not None:
        gains, big = norm_gains(norm, inp)
        cols[big] /= gains[big]
    if VISION in name or "layers." not in name:
        return rows, cols
    layer = name.rsplit(".", 3)[0] + "."  # ...layers.i.
    expert = EXPERT in name
    head_dim = dims.expert_head_dim if expert else dims.llm_head_dim
    heads, kv = (dims.expert_heads, dims.expert_kv_heads) if expert else (dims.llm_heads, dims.llm_kv_heads)
    if name.endswith("mlp.up_proj.weight"):
        ch, f = row_coupling(layer + "mlp", out)
        rows[ch] *= f
    elif name.endswith("mlp.down_proj.weight"):
        ch, f = row_coupling(layer + "mlp", inp)
        cols[ch] /= f
    elif name.endswith("self_attn.v_proj.weight"):
        ch, f = row_coupling(layer + "self_attn", out)
        rows[ch] *= f
    elif name.endswith("self_attn.o_proj.weight"):
        ch, f = row_coupling(layer + "self_attn", kv * head_dim)
        group = heads // kv
        for row, factor in zip(ch, f, strict=True):  # v row (g, d) is read at o column (h, d), h in group g
            g, d = divmod(int(row), head_dim)
            for h in range(g * group, (g + 1) * group):
                cols[h * head_dim + d] /= factor
    return rows, cols


def tensor_chunks(name: str, shape: tuple[int, ...], dims: Pi05Dims = DEMO) -> Iterator[np.ndarray]:
    """float32 values of one tensor, row chunks at a time (deterministic per name)."""
    rng = _rng(name)
    depth = dims.vision_layers if "vision_tower" in name else dims.llm_layers
    if len(shape) == 2 and name.endswith(".weight") and "embed" not in name:
        out, inp = shape
        row_factor, col_scale = coupled_scales(name, (out, inp), dims)
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
) -> Path:
    """Write ``out_dir/model.safetensors``; an identical existing file is kept as is.
    ``size``: one of SIZES (default "demo", or "full" with ``full_size``)."""
    dims = SIZES[size or ("full" if full_size else "demo")]
    path = Path(out_dir) / MODEL_NAME
    metadata = {
        "format": "pt",
        "duquant_demo": MARKER,
        "dims": json.dumps(asdict(dims), sort_keys=True),
        "dtype": dtype,
    }
    if path.is_file() and _existing_metadata(path) == metadata:
        return path
    specs = tensor_specs(dims)
    shapes = dict(specs)

    def produce(name: str) -> Iterator[np.ndarray]:
        for chunk in tensor_chunks(name, shapes[name], dims):
            yield to_bf16_bits(chunk) if dtype == "BF16" else chunk.astype(np.float32)

    write_safetensors(path, [(n, dtype, s) for n, s in specs], produce, metadata, on_tensor)
    return path


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


def demo_dims(ckpt: Checkpoint) -> Pi05Dims:
    """The dims a demo (or full-size synthetic) checkpoint was written with."""
    meta = _existing_metadata(ckpt.files[0]) or {}
    if meta.get("duquant_demo") != MARKER:
        raise CheckpointError(f"{ckpt.path} is not a duquant-packs demo checkpoint")
    return Pi05Dims(**json.loads(meta["dims"]))
