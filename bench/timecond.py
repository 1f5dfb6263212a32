"""A time-conditioned action expert, as pi0.5's: transformers' Gemma (the expert of
``testbeds.pi05_testbed``) with adaRMSNorm and a 10-step flow-matching loop.

transformers' Gemma has no adaRMSNorm, so each of its norms is replaced by :class:`AdaRMSNorm`:
RMS-normalize, then ``x̂ · (1 + scale) + shift``, with ``scale, shift, gate = dense(cond)`` from the
time embedding ``cond`` (pi0.5's ``*.input_layernorm.dense`` and ``post_attention_layernorm.dense``,
3 × width each; ``model.norm.dense``). The gate multiplies the attention and MLP outputs before
their residual adds, as pi0.5's gated residual does. The time embedding is openpi's: sine-cosine
of the flow time, then ``time_mlp_in`` / ``time_mlp_out`` with swish.

:class:`TimeCondPolicy` carries openpi's ``denoise_step(state, prefix_pad_masks, past_key_values,
x_t, timestep)`` and ``sample_actions`` loop (float32 ``time += dt``): the expert reads context
tokens (``past_key_values``, a stand-in for the prefix) followed by the action chunk.

``couple_outliers`` gives the expert coupled outliers (function-preserving, as
``testbeds.couple_outliers``: a norm's output channels scaled through its dense rows and undone on
its consumers' columns; v_proj/o_proj and up_proj/down_proj pairs), and the modulation carries
channels whose size swings with the flow time (the time dependence per-step scales are for).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from testbeds import EXPERT, _channel_factors, _couple_rows, _scale_columns
from torch import nn

ACTION_DIM, HORIZON, CONTEXT = 32, 50, 8
MODULATION_GAIN = 3.0
INIT_RANGE = 0.06  # sublayer outputs 5-9 % of the residual stream at the first layer (Gemma init 0.02: <1 %)


class Conditioning:
    """The conditioning vector of the step now running, shared by the expert's norms and gates."""

    def __init__(self) -> None:
        self.cond: torch.Tensor | None = None


class AdaRMSNorm(nn.Module):
    """Gemma's RMSNorm modulated by the time embedding: x̂·(1 + scale) + shift."""

    def __init__(self, width: int, shared: Conditioning, eps: float = 1e-6) -> None:
        super().__init__()
        self.dense = nn.Linear(width, 3 * width)
        self.shared, self.eps, self.width = shared, eps, width

    def modulation(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.shared.cond is not None, "AdaRMSNorm runs inside denoise_step only"
        scale, shift, gate = self.dense(self.shared.cond)[:, None, :].chunk(3, dim=-1)
        return scale, shift, gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, _ = self.modulation()
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)

    def gate_output(self, _module: nn.Module, _args: tuple, output: object) -> object:
        """Forward hook of the sublayer this norm feeds: its output times the gate (the gated
        residual). A bound method, so ``copy.deepcopy`` of the policy gates with the copy's norms."""
        gate = self.modulation()[2]
        if isinstance(output, tuple):
            return (output[0] * gate.to(output[0].dtype), *output[1:])
        return output * gate.to(output.dtype)  # type: ignore[operator]


def sinusoid(timestep: torch.Tensor, width: int) -> torch.Tensor:
    """openpi's create_sinusoidal_pos_embedding: periods 4e-3 .. 4."""
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64)
    period = 4e-3 * (4.0 / 4e-3) ** fraction
    angle = timestep.double()[:, None] * (2 * math.pi / period)[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


class TimeCondPolicy(nn.Module):
    """openpi's PI0Pytorch reduced to its expert: heads in float, the expert under ``paligemma_with_expert.``."""

    def __init__(self, layers: int = 4, seed: int = 0) -> None:
        super().__init__()
        from transformers import GemmaConfig, GemmaForCausalLM

        torch.manual_seed(seed)
        width = EXPERT["hidden_size"]
        self.paligemma_with_expert = nn.Module()
        self.paligemma_with_expert.gemma_expert = GemmaForCausalLM(
            GemmaConfig(vocab_size=8, num_hidden_layers=layers, initializer_range=INIT_RANGE, **EXPERT)
        )
        self.shared = Conditioning()
        gemma = self.expert_model
        for layer in gemma.layers:
            layer.input_layernorm = AdaRMSNorm(width, self.shared)
            layer.post_attention_layernorm = AdaRMSNorm(width, self.shared)
            layer.self_attn.register_forward_hook(layer.input_layernorm.gate_output)
            layer.mlp.register_forward_hook(layer.post_attention_layernorm.gate_output)
        gemma.norm = AdaRMSNorm(width, self.shared)
        with torch.no_grad():  # modulation of order one, as a trained expert's (nn.Linear's init gives ~0.3)
            for norm in self._ada_norms():
                norm.dense.weight.mul_(MODULATION_GAIN)
        self.action_in_proj = nn.Linear(ACTION_DIM, width)
        self.action_out_proj = nn.Linear(width, ACTION_DIM)
        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

    def _ada_norms(self) -> list[AdaRMSNorm]:
        return [m for m in self.expert_model.modules() if isinstance(m, AdaRMSNorm)]

    @property
    def expert_model(self) -> nn.Module:
        return self.paligemma_with_expert.gemma_expert.model

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        emb = sinusoid(timestep, EXPERT["hidden_size"]).to(x_t.dtype)
        self.shared.cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(emb))))
        tokens = torch.cat([past_key_values, self.action_in_proj(x_t)], dim=1)
        out = self.expert_model(inputs_embeds=tokens).last_hidden_state[:, -HORIZON:]
        return self.action_out_proj(out)

    @torch.no_grad()
    def sample_actions(self, context: torch.Tensor, noise: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        """openpi's loop: float32 time from 1 by dt = -1/num_steps while time >= -dt/2."""
        bsize, device = noise.shape[0], noise.device
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32, device=device)
        x_t = noise
        time = torch.tensor(1.0, dtype=torch.float32, device=device)
        while time >= -dt / 2:
            v_t = self.denoise_step(None, None, context, x_t, time.expand(bsize))
            x_t = x_t + dt * v_t
            time += dt
        return x_t


def flow_batch(batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(context tokens [B, CONTEXT, width], noise [B, HORIZON, ACTION_DIM])."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, CONTEXT, EXPERT["hidden_size"], generator=g), torch.randn(
        batch, HORIZON, ACTION_DIM, generator=g
    )


@torch.no_grad()
def _couple_ada_norm(g: torch.Generator, norm: AdaRMSNorm, consumers: list[nn.Linear]) -> None:
    """Scale the norm's output channels by f (scale' = f(1 + scale) - 1, shift' = f·shift, through
    the dense rows), undone on the consumers' columns."""
    w = norm.width
    f = _channel_factors(g, w).to(norm.dense.weight.dtype)
    weight, bias = norm.dense.weight, norm.dense.bias
    weight[:w] *= f[:, None]
    bias[:w] = f * (1 + bias[:w]) - 1
    weight[w : 2 * w] *= f[:, None]
    bias[w : 2 * w] *= f
    _scale_columns(consumers, f.double())


@torch.no_grad()
def _time_swings(g: torch.Generator, norm: AdaRMSNorm) -> None:
    """~3% of the channels get a modulation ×8 larger, so their size swings with the flow time."""
    w = norm.width
    rows = torch.randperm(w, generator=g)[: max(2, w // 32)]
    norm.dense.weight[rows] *= 8.0
    norm.dense.weight[w + rows] *= 8.0


def couple_outliers(model: TimeCondPolicy, seed: int = 0) -> TimeCondPolicy:
    g = torch.Generator().manual_seed(2000 + seed)
    heads, kv, head_dim = EXPERT["num_attention_heads"], EXPERT["num_key_value_heads"], EXPERT["head_dim"]
    for layer in model.expert_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            _time_swings(g, norm)
        _couple_ada_norm(g, layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _couple_ada_norm(g, layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        _couple_rows(g, attn.v_proj, attn.o_proj, head_dim, heads // kv)
        _couple_rows(g, mlp.up_proj, mlp.down_proj)
    return model


def build_timecond(seed: int = 0, coupled: bool = True, layers: int = 4) -> TimeCondPolicy:
    model = TimeCondPolicy(layers=layers, seed=seed).eval()
    return couple_outliers(model, seed) if coupled else model
