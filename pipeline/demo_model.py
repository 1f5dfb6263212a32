"""A plain torch module tree with pi0.5's (or pi0's) names, loading the demo (or full-size) checkpoint.

It exists so tests, benchmarks and users can load a bundle into something real and
measure each component's output error. The blocks follow SigLIP / Gemma / pi0.5's
adaptive-norm expert (pi0's plain-norm expert) in shape (pre-norm attention with grouped KV
heads, gated GELU MLP), without RoPE, masks or openpi's joint prefix/suffix attention: it is
a faithful host for the Linear layers, not a reimplementation of openpi's forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import Checkpoint
from .demo import DEMO, Pi05Dims, demo_dims, demo_model_kind


class RMSNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class AdaRMSNorm(nn.Module):
    """pi0.5's expert norm: scale and shift come from the time conditioning through a Linear."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, 3 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift, _gate = self.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return normed * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, kv_heads: int, bias: bool, out_name: str) -> None:
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads
        self.q_proj = nn.Linear(width, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(width, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(width, kv_heads * head_dim, bias=bias)
        setattr(self, out_name, nn.Linear(heads * head_dim, width, bias=bias))
        self.out_name = out_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1)
        return getattr(self, self.out_name)(out)


class SiglipMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class GemmaMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, hidden, bias=False)
        self.up_proj = nn.Linear(width, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class SiglipLayer(nn.Module):
    def __init__(self, d: Pi05Dims) -> None:
        super().__init__()
        w = d.vision_width
        self.layer_norm1 = nn.LayerNorm(w)
        self.self_attn = Attention(w, d.vision_heads, w // d.vision_heads, d.vision_heads, True, "out_proj")
        self.layer_norm2 = nn.LayerNorm(w)
        self.mlp = SiglipMLP(w, d.vision_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


def _norm(m: nn.Module, h: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """An expert norm: adaptive ones take the time conditioning, plain gains do not."""
    return m(h, cond) if isinstance(m, AdaRMSNorm) else m(h)


class GemmaLayer(nn.Module):
    def __init__(self, width: int, heads: int, head_dim: int, kv: int, mlp: int, ada: bool) -> None:
        super().__init__()
        norm = AdaRMSNorm if ada else RMSNorm
        self.input_layernorm = norm(width)
        self.self_attn = Attention(width, heads, head_dim, kv, False, "o_proj")
        self.post_attention_layernorm = norm(width)
        self.mlp = GemmaMLP(width, mlp)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(_norm(self.input_layernorm, x, cond))
        return x + self.mlp(_norm(self.post_attention_layernorm, x, cond))


class _Container(nn.Module):
    """A named level of the tree (``paligemma_with_expert``, ``model``, ...)."""


class DemoPi05(nn.Module):
    """pi0.5's parameter tree (``model="pi0"``: pi0's); ``vision``, ``llm`` and ``expert`` run
    each component."""

    def __init__(self, d: Pi05Dims = DEMO, model: str = "pi05") -> None:
        super().__init__()
        self.dims, self.kind = d, model
        pwe = self.paligemma_with_expert = _Container()
        pg = pwe.paligemma = _Container()
        pgm = pg.model = _Container()
        pgm.vision_tower = _vision_tower(d)
        pgm.multi_modal_projector = _Container()
        pgm.multi_modal_projector.linear = nn.Linear(d.vision_width, d.llm_width)
        lm = pgm.language_model = _Container()
        lm.embed_tokens = nn.Embedding(d.vocab, d.llm_width)
        lm.layers = nn.ModuleList(
            GemmaLayer(d.llm_width, d.llm_heads, d.llm_head_dim, d.llm_kv_heads, d.llm_mlp, False)
            for _ in range(d.llm_layers)
        )
        lm.norm = RMSNorm(d.llm_width)
        pwe.gemma_expert = _expert(d, adaptive=model == "pi05")
        e = d.expert_width
        self.action_in_proj = nn.Linear(d.action_dim, e)
        self.action_out_proj = nn.Linear(e, d.action_dim)
        if model == "pi05":
            self.time_mlp_in = nn.Linear(e, e)
            self.time_mlp_out = nn.Linear(e, e)
        else:  # pi0: the state is a suffix token; time enters concatenated with the actions
            self.state_proj = nn.Linear(d.action_dim, e)
            self.action_time_mlp_in = nn.Linear(2 * e, e)
            self.action_time_mlp_out = nn.Linear(e, e)

    # components: inputs are already-embedded tokens, so each can be measured alone
    def vision(self, tokens: torch.Tensor) -> torch.Tensor:
        vm = self.paligemma_with_expert.paligemma.model.vision_tower.vision_model
        for layer in vm.encoder.layers:
            tokens = layer(tokens)
        return vm.post_layernorm(tokens)

    def llm(self, hidden: torch.Tensor) -> torch.Tensor:
        lm = self.paligemma_with_expert.paligemma.model.language_model
        for layer in lm.layers:
            hidden = layer(hidden)
        return lm.norm(hidden)

    def expert(self, hidden: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The expert on action tokens ``hidden`` [B, T, width] at time conditioning ``cond``
        [B, width]: pi0.5 feeds ``cond`` through its time MLP to the adaptive norms; pi0
        concatenates it to each token through ``action_time_mlp_*`` (as openpi's embed_suffix)."""
        em = self.paligemma_with_expert.gemma_expert.model
        if self.kind == "pi05":
            cond = self.time_mlp_out(F.silu(self.time_mlp_in(cond)))
        else:
            timed = torch.cat([hidden, cond[:, None, :].expand_as(hidden)], dim=-1)
            hidden, cond = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(timed))), None
        for layer in em.layers:
            hidden = layer(hidden, cond)
        return _norm(em.norm, hidden, cond)


def _vision_tower(d: Pi05Dims) -> nn.Module:
    vt = _Container()
    vm = vt.vision_model = _Container()
    emb = vm.embeddings = _Container()
    emb.patch_embedding = nn.Conv2d(3, d.vision_width, d.patch, d.patch)
    emb.position_embedding = nn.Embedding(d.vision_positions, d.vision_width)
    vm.encoder = _Container()
    vm.encoder.layers = nn.ModuleList(SiglipLayer(d) for _ in range(d.vision_layers))
    vm.post_layernorm = nn.LayerNorm(d.vision_width)
    return vt


def _expert(d: Pi05Dims, *, adaptive: bool) -> nn.Module:
    """``gemma_expert``: its ``model``'s layers and final norm, adaptive (pi0.5) or plain gains (pi0)."""
    ex = _Container()
    ex.model = _Container()
    ex.model.layers = nn.ModuleList(
        GemmaLayer(d.expert_width, d.expert_heads, d.expert_head_dim, d.expert_kv_heads, d.expert_mlp, adaptive)
        for _ in range(d.expert_layers)
    )
    ex.model.norm = AdaRMSNorm(d.expert_width) if adaptive else RMSNorm(d.expert_width)
    return ex


def load_demo_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> DemoPi05:
    """Build the tree (pi0.5's or pi0's, as the file says) for a demo / full-size synthetic
    checkpoint and load its weights (strict)."""
    from safetensors.torch import load_file

    ckpt = Checkpoint.open(checkpoint)
    with torch.device("meta"):
        model = DemoPi05(demo_dims(ckpt), demo_model_kind(ckpt))
    # Parameters get storage of their own (as in openpi, which copies the checkpoint into
    # the model): views into the file's buffer would keep it alive after a layer is swapped.
    model = model.to_empty(device="cpu").to(dtype)
    model.load_state_dict(load_file(str(ckpt.files[0])), strict=True)
    return model.eval()


def component_inputs(
    d: Pi05Dims,
    *,
    batch: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, int, int] = (256, 200, 50),
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Deterministic inputs per component, with a few heavy activation channels (as in pi0.5).

    The heavy channels depend on the width only, not on ``seed``: like a real model's
    outlier channels they are the same in every batch, so statistics captured on some
    seeds describe the others.
    """
    g = torch.Generator().manual_seed(seed)

    def acts(t: int, width: int) -> torch.Tensor:
        x = torch.randn(batch, t, width, generator=g)
        heavy = torch.randperm(width, generator=torch.Generator().manual_seed(width))[: max(1, width // 50)]
        x[..., heavy] *= 10.0
        return x.to(dtype)

    return {
        "vision": (acts(tokens[0], d.vision_width),),
        "llm": (acts(tokens[1], d.llm_width),),
        "expert": (acts(tokens[2], d.expert_width), torch.randn(batch, d.expert_width, generator=g).to(dtype)),
    }
