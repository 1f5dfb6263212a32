"""A data-free estimate of each input channel's activation size, read from the checkpoint.

The channels that will be large are written in the weights that produce them. For a Linear
fed by a norm (q/k/v, gate/up, fc1, BERT's query/key/value and intermediate) it is the norm's
per-channel gain: Gemma's ``1 + w``, LayerNorm's ``w`` (with its bias), and for pi0.5's adaptive
norm the ``dense`` rows that make the scale and shift. An attention output (o_proj, out_proj)
reads an attention-weighted average of v, so its channel j is as large as v's row j applied to
v's own input estimate; a down_proj reads ``act(gate)·up`` and an fc2 ``act(fc1)``, rows again.

:func:`find_source` names the producer tensors by the module naming of the Gemma/Llama,
SigLIP/CLIP and BERT families (the recipe of every layer that has none falls back to the
unweighted weight error, and ``inspect --quality`` says so); :func:`activation_rms` turns them
into a per-channel RMS estimate. Only relative sizes matter: the build ranks candidates and
sets smoothing strengths with it, never an absolute scale.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

Reader = Callable[[str], np.ndarray]  # a checkpoint tensor by name, as float32/64 numpy

NORM, ROWS = "norm", "producer rows"  # the sources inspect shows (and "none")
# An o_proj wider than its v_proj's rows is grouped-query attention. Which v row a column reads
# needs the head size, which the weights do not give; with at most one head's rows (Gemma 2B and
# its expert: one KV head of 256) every query head reads the same rows. Wider v: no estimate.
MAX_ONE_HEAD = 256

# The input norm of an attention block and of an MLP, by family, in the block's namespace.
_ATTN_NORMS = ("input_layernorm", "layer_norm1", "ln_1", "attention_norm", "norm1")
_MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "layer_norm2", "ln_2", "ffn_norm", "norm2")
_BERT_LAYER = re.compile(r"^(?P<root>.*?)(?P<stack>(?:encoder\.)?layers?)\.(?P<i>\d+)\.")
# RMS of gelu(z) for z ~ N(mean, sigma^2): Gauss-Hermite nodes (probabilists'), 24 points
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(24)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


@dataclass(frozen=True)
class Norm:
    """A norm's gain ``weight`` [in] (and ``bias``); ``dense``: an adaptive norm's Linear [3·in, in]."""

    weight: str | None
    bias: str | None = None
    dense: str | None = None
    dense_bias: str | None = None


@dataclass(frozen=True)
class Rows:
    """A producer Linear's rows applied to its own input estimate: channel j ≈ ‖W[j] ⊙ a_in‖."""

    weight: str
    bias: str | None
    source: Source
    activated: bool = False  # the consumer reads act(W·x), not W·x (fc2, BERT output.dense)


@dataclass(frozen=True)
class Gated:
    """A gated MLP's down_proj input act(gate·x) ⊙ (up·x)."""

    gate: Rows
    up: Rows


Source = Norm | Rows | Gated


def kind(source: Source | None) -> str:
    """What ``inspect`` shows: ``norm``, ``producer rows`` or ``none``."""
    return "none" if source is None else NORM if isinstance(source, Norm) else ROWS


def tensor_names(source: Source | None) -> tuple[str, ...]:
    """Every checkpoint tensor the estimate reads (the fingerprint hashes them)."""
    if source is None:
        return ()
    if isinstance(source, Norm):
        return tuple(n for n in (source.weight, source.bias, source.dense, source.dense_bias) if n)
    if isinstance(source, Gated):
        return tuple(dict.fromkeys((*tensor_names(source.gate), *tensor_names(source.up))))
    return tuple(n for n in (source.weight, source.bias) if n) + tensor_names(source.source)


def find_source(module: str, shapes: Mapping[str, tuple[int, ...]], width: int) -> Source | None:
    """The producers of ``module``'s input (a full tensor-name prefix, e.g. ``model.layers.0.mlp.up_proj``)
    in the checkpoint's ``shapes``, whose estimate is ``width`` wide; None when none is found."""
    found = _bert_source(module, shapes) or _block_source(module, shapes)
    if found is None:
        return None
    have = _width(found, shapes)
    return found if have == width or (have <= MAX_ONE_HEAD and width % have == 0) else None


def _block_source(module: str, shapes: Mapping[str, tuple[int, ...]]) -> Source | None:
    """Gemma/Llama (``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``) and SigLIP/CLIP
    (``self_attn.out_proj``, ``mlp.fc1/fc2``)."""
    parent, _, leaf = module.rpartition(".")
    block = parent.rpartition(".")[0]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return _norm(block, _ATTN_NORMS, shapes)
    if leaf in ("o_proj", "out_proj"):
        return _rows(f"{parent}.v_proj", _norm(block, _ATTN_NORMS, shapes), shapes)
    if leaf in ("gate_proj", "up_proj", "fc1"):
        return _norm(block, _MLP_NORMS, shapes)
    if leaf == "down_proj":
        norm = _norm(block, _MLP_NORMS, shapes)
        gate, up = _rows(f"{parent}.gate_proj", norm, shapes), _rows(f"{parent}.up_proj", norm, shapes)
        return Gated(gate, up) if gate is not None and up is not None else None
    if leaf == "fc2":
        return _rows(f"{parent}.fc1", _norm(block, _MLP_NORMS, shapes), shapes, activated=True)
    return None


def _bert_source(module: str, shapes: Mapping[str, tuple[int, ...]]) -> Source | None:
    """BERT's post-norm layer (``attention.self.{query,key,value}``, ``attention.output.dense``,
    ``intermediate.dense``, ``output.dense``): the previous layer's output LayerNorm feeds q/k/v."""
    m = _BERT_LAYER.match(module)
    if m is None:
        return None
    layer, rest = module[: m.end()], module[m.end() :]
    i = int(m["i"])
    previous = f"{m['root']}{m['stack']}.{i - 1}.output.LayerNorm" if i else f"{m['root']}embeddings.LayerNorm"
    inner = _norm_named(previous, shapes)
    if rest in ("attention.self.query", "attention.self.key", "attention.self.value"):
        return inner
    if rest == "attention.output.dense":
        return _rows(f"{layer}attention.self.value", inner, shapes)
    if rest == "intermediate.dense":
        return _norm_named(f"{layer}attention.output.LayerNorm", shapes)
    if rest == "output.dense":
        mid = _norm_named(f"{layer}attention.output.LayerNorm", shapes)
        return _rows(f"{layer}intermediate.dense", mid, shapes, activated=True)
    return None


def _norm(block: str, names: tuple[str, ...], shapes: Mapping[str, tuple[int, ...]]) -> Norm | None:
    return next((n for n in (_norm_named(f"{block}.{name}", shapes) for name in names) if n), None)


def _norm_named(norm: str, shapes: Mapping[str, tuple[int, ...]]) -> Norm | None:
    def have(name: str, dims: int) -> str | None:
        return name if len(shapes.get(name, ())) == dims else None

    if have(f"{norm}.weight", 1):
        return Norm(f"{norm}.weight", have(f"{norm}.bias", 1))
    if have(f"{norm}.dense.weight", 2):
        return Norm(None, dense=f"{norm}.dense.weight", dense_bias=have(f"{norm}.dense.bias", 1))
    return None


def _rows(
    producer: str, source: Source | None, shapes: Mapping[str, tuple[int, ...]], activated: bool = False
) -> Rows | None:
    if source is None or len(shapes.get(f"{producer}.weight", ())) != 2:
        return None
    bias = f"{producer}.bias" if len(shapes.get(f"{producer}.bias", ())) == 1 else None
    rows = Rows(f"{producer}.weight", bias, source, activated)
    return rows if shapes[rows.weight][1] == _width(source, shapes) else None


def _width(source: Source, shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The width of the estimate ``source`` gives."""
    if isinstance(source, Norm):
        return shapes[source.weight][0] if source.weight else shapes[source.dense][0] // 3  # type: ignore[index]
    if isinstance(source, Gated):
        return _width(source.up, shapes)
    return shapes[source.weight][0]


def activation_rms(source: Source, read: Reader, width: int) -> np.ndarray:
    """The per-channel RMS estimate [width] (float64), positive; GQA's v rows repeated per head group."""
    a = _estimate(source, read)
    if a.size != width:
        if width % a.size:
            raise ValueError(f"the estimate is {a.size} wide, the layer {width}")
        a = np.tile(a, width // a.size)  # one KV head (Gemma 2B, the expert): every query head reads it
    floor = max(float(a.max()) * 1e-6, 1e-30)
    return np.maximum(a, floor)


def _estimate(source: Source, read: Reader) -> np.ndarray:
    if isinstance(source, Norm):
        return _norm_rms(source, read)
    if isinstance(source, Gated):
        return _gelu_rms(_estimate(source.gate, read)) * _estimate(source.up, read)
    w = read(source.weight)  # float32 (never written: it may be the checkpoint's own memory)
    a_in = _estimate(source.source, read)
    sd = np.sqrt(np.square(w) @ (a_in * a_in).astype(w.dtype)).astype(np.float64)
    mean = read(source.bias).astype(np.float64) if source.bias else np.zeros_like(sd)
    return _gelu_rms(sd, mean) if source.activated else np.sqrt(sd * sd + mean * mean)


def _norm_rms(norm: Norm, read: Reader) -> np.ndarray:
    """|gain| (with the bias) of a norm's output channels; an adaptive norm's scale and shift
    rows applied to a conditioning of unit RMS per channel."""
    if norm.weight is None:
        w = read(norm.dense).astype(np.float64)  # type: ignore[arg-type]
        b = read(norm.dense_bias).astype(np.float64) if norm.dense_bias else np.zeros(w.shape[0])
        n = w.shape[0] // 3
        scale = (1.0 + b[:n]) ** 2 + (w[:n] ** 2).sum(1)
        shift = b[n : 2 * n] ** 2 + (w[n : 2 * n] ** 2).sum(1)
        return np.sqrt(scale + shift)
    g = read(norm.weight).astype(np.float64)
    # Gemma's RMSNorm stores w for a gain of 1 + w; its weights sit around 0, a gain's around 1.
    if norm.bias is None and "gemma" in norm.weight.lower() and np.median(np.abs(g)) < 0.5:
        g = 1.0 + g
    b = read(norm.bias).astype(np.float64) if norm.bias else 0.0
    return np.sqrt(g * g + b * b)


def _gelu_rms(sigma: np.ndarray, mean: np.ndarray | None = None) -> np.ndarray:
    """sqrt(E[gelu(z)^2]) for z ~ N(mean, sigma^2), per channel."""
    mean = np.zeros_like(sigma) if mean is None else mean
    z = mean[:, None] + sigma[:, None] * _NODES[None, :]
    gelu = 0.5 * z * (1.0 + np.tanh(0.7978845608 * (z + 0.044715 * z**3)))
    return np.sqrt((gelu * gelu) @ _WEIGHTS)
