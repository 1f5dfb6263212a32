"""The demo checkpoint's module tree: pi0.5's or pi0's tensor names and shapes, at real depths.

Names follow openpi's PyTorch ``PI0Pytorch`` state dict (``pi05=True`` or ``False``). The two
share the vision tower, the projector and the LLM; they differ in the action expert and the
heads around it:

* pi0.5 ("pi05"): the expert's norms are adaptive RMSNorms, a Linear (``<norm>.dense``)
  mapping the time conditioning to scale, shift and gate; time enters through
  ``time_mlp_in`` / ``time_mlp_out``;
* pi0 ("pi0"): the expert's norms are plain Gemma RMSNorm gains (``<norm>.weight``); the
  state is a suffix token through ``state_proj``, and time enters concatenated with the
  action embedding through ``action_time_mlp_in`` (2 x width -> width) / ``action_time_mlp_out``.
"""

from __future__ import annotations

from dataclasses import dataclass

MODELS = ("pi05", "pi0")  # the kinds of demo checkpoint; pi05 is the default

PG = "paligemma_with_expert.paligemma.model."
VISION = PG + "vision_tower.vision_model."
LLM = PG + "language_model."
EXPERT = "paligemma_with_expert.gemma_expert.model."


@dataclass(frozen=True)
class Pi05Dims:
    """Widths and depths (the same fields for pi0, whose Gemma and SigLIP sizes are pi0.5's)."""

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


# The real pi0.5 (and pi0): Gemma-2B LLM, Gemma-300M action expert, SigLIP So400m/14.
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


def tensor_specs(d: Pi05Dims, model: str = "pi05") -> list[Spec]:
    """(name, shape) of every tensor, in file order."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    return [
        *_vision_specs(d),
        *_linear(f"{PG}multi_modal_projector.linear", d.llm_width, d.vision_width, bias=True),
        (f"{LLM}embed_tokens.weight", (d.vocab, d.llm_width)),
        *_gemma_specs(d, expert=False),
        *_gemma_specs(d, expert=True, adaptive=model == "pi05"),
        *(_pi05_heads(d) if model == "pi05" else _pi0_heads(d)),
    ]


def _pi05_heads(d: Pi05Dims) -> list[Spec]:
    e = d.expert_width
    return [
        *_linear("action_in_proj", e, d.action_dim, bias=True),
        *_linear("action_out_proj", d.action_dim, e, bias=True),
        *_linear("time_mlp_in", e, e, bias=True),
        *_linear("time_mlp_out", e, e, bias=True),
    ]


def _pi0_heads(d: Pi05Dims) -> list[Spec]:
    """In PI0Pytorch's order (pi05=False)."""
    e = d.expert_width
    return [
        *_linear("action_in_proj", e, d.action_dim, bias=True),
        *_linear("action_out_proj", d.action_dim, e, bias=True),
        *_linear("state_proj", e, d.action_dim, bias=True),
        *_linear("action_time_mlp_in", e, 2 * e, bias=True),
        *_linear("action_time_mlp_out", e, e, bias=True),
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


def _gemma_specs(d: Pi05Dims, *, expert: bool, adaptive: bool = False) -> list[Spec]:
    """A Gemma stack's layers and final norm: the LLM's, or the action expert's, whose norms
    are pi0.5's adaptive RMSNorm (a Linear from the time conditioning) when ``adaptive``,
    else a gain as in the LLM (pi0)."""
    prefix, stem = (EXPERT, "expert") if expert else (LLM, "llm")  # Pi05Dims: expert_width, llm_width, ...
    fields = ("width", "heads", "head_dim", "kv_heads", "mlp", "layers")
    width, heads, head_dim, kv, mlp, depth = (int(getattr(d, f"{stem}_{field}")) for field in fields)

    def norm(name: str) -> list[Spec]:
        return _linear(f"{name}.dense", 3 * width, width, bias=True) if adaptive else [(f"{name}.weight", (width,))]

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
