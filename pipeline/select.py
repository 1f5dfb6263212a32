"""Which checkpoint tensors are quantized: the checkpoint's Linear layers, picked by the
config's selection (``duquant_runtime.config.matches``, the one implementation of the
scope / include / exclude / whitelist rules), and explanations when nothing is picked.

A Linear is a 2-D floating ``<module>.weight`` (with an optional 1-D ``<module>.bias``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from duquant_runtime.bundle_records import EMBEDDING, LINEAR
from duquant_runtime.config import DuQuantConfig, matches, preset_names, resolve
from duquant_runtime.errors import SelectionError
from duquant_runtime.fingerprint import SourceTensor
from duquant_runtime.prefix import selection_prefix

from . import proxy as proxy_rules
from .checkpoint import FLOAT_DTYPES, Checkpoint


@dataclass(frozen=True)
class SelectedLayer:
    name: str  # module name, e.g. paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj
    weight: str  # tensor names in the checkpoint
    bias: str | None
    out_features: int
    in_features: int
    dtype: str
    bits: int
    kind: str = LINEAR  # or EMBEDDING: a table picked by [embed] (out_features = its rows)
    # the tensors that produce its input, for the data-free activation estimate (pipeline/proxy.py)
    proxy: proxy_rules.Source | None = None

    @property
    def weight_bytes(self) -> int:
        return self.out_features * self.in_features * (2 if self.dtype in ("BF16", "F16") else 4)

    @property
    def prefix(self) -> str:
        """The checkpoint's name prefix this layer was found under ("" or e.g. "model.")."""
        return self.weight[: len(self.weight) - len(self.name) - len(".weight")]

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def linear_modules(ckpt: Checkpoint) -> dict[str, tuple[str, str | None]]:
    """module name -> (weight tensor, bias tensor or None), for every 2-D floating weight."""
    out: dict[str, tuple[str, str | None]] = {}
    for name, info in ckpt.tensors.items():
        if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOAT_DTYPES:
            continue
        module = name[: -len(".weight")]
        bias = f"{module}.bias"
        ok_bias = bias in ckpt.tensors and ckpt.tensors[bias].shape == (info.shape[0],)
        out[module] = (name, bias if ok_bias else None)
    return out


def _scope_prefixes(names: list[str]) -> Counter[str]:
    """Every dotted prefix of the names ("a.", "a.b.", ...), counted."""
    counts: Counter[str] = Counter()
    for n in names:
        parts = n.split(".")
        for i in range(1, len(parts)):
            counts[".".join(parts[:i]) + "."] += 1
    return counts


def _scope_hint(cfg: DuQuantConfig, scope: str, modules: list[str]) -> str:
    """'scope' (N layers this config would select there, e.g. one of them)."""
    inside = [m for m in modules if m.startswith(scope)]
    chosen = matches(dataclasses.replace(cfg.select, scope=scope), inside)
    if chosen:
        return f"{scope!r} ({len(chosen)} layers this config would select, e.g. {chosen[0]})"
    return f"{scope!r} ({len(inside)} Linear layers, none matching include/exclude)"


def explain_empty(cfg: DuQuantConfig, modules: list[str]) -> str:
    s = cfg.select
    in_scope = [m for m in modules if m.startswith(s.scope)]
    if not modules:
        return f"config {cfg.name!r} selects 0 layers: the checkpoint holds no 2-D Linear weight at all"
    if not in_scope:
        prefixes = _scope_prefixes(modules)
        near = difflib.get_close_matches(s.scope, list(prefixes), n=3, cutoff=0.5)
        if not near:
            near = [p for p, _ in prefixes.most_common(3)]
        hints = "; ".join(_scope_hint(cfg, p, modules) for p in near)
        return (
            f"config {cfg.name!r} selects 0 layers: no Linear layer name starts with scope {s.scope!r}. "
            f"Nearest scopes in this checkpoint: {hints}"
        )
    return (
        f"config {cfg.name!r} selects 0 layers: {len(in_scope)} Linear layers are in scope {s.scope!r} "
        f"(e.g. {in_scope[0]}) but none matches include {s.include!r} without matching exclude "
        f"{s.exclude!r}"
    )


def embedding_names(config: DuQuantConfig, modules: list[str], linears: list[str]) -> list[str]:
    """The tables ``embed.include`` picks among the checkpoint's 2-D weights (``modules``),
    refused when it picks a layer the selection quantizes as a Linear. A pattern matching no
    table is refused, naming the nearest tables, unless it is a preset's own rule: the full
    presets name PaliGemma's table and run on checkpoints without it, where the build goes on
    without a table and says so (``embed_notes``)."""
    e = config.embed
    if not e.include:
        return []
    pattern = re.compile(e.include)
    names = sorted(m for m in modules if pattern.search(m))
    both = sorted(set(names) & set(linears))
    if both:
        raise SelectionError(
            f"{both[0]} is picked both by [select] (as a Linear) and by embed.include: narrow one of them"
        )
    if not names and e.include not in preset_embed_rules():
        raise SelectionError(_no_table_message(e.include, modules, linears))
    return names


def select_layers(cfg: DuQuantConfig, ckpt: Checkpoint) -> list[SelectedLayer]:
    """The layers ``cfg`` selects, named as its selection sees them: when every selected name is
    under one prefix the scope does not expect (LeRobot's "model."), the layer is named without
    it and ``SelectedLayer.prefix`` holds it."""
    s, q = cfg.select, cfg.quant
    found = linear_modules(ckpt)
    prefix = selection_prefix(s, found)
    modules = {n[len(prefix) :]: tensors for n, tensors in found.items() if n.startswith(prefix)}
    names = matches(s, modules)
    if not names:
        raise SelectionError(explain_empty(cfg, sorted(modules)))
    stray = [n for n, _ in q.per_layer_weight_bits if n not in names]
    if stray:
        raise SelectionError(
            f"quant.per_layer_weight_bits names {stray[0]!r}, which is not a selected layer of config {cfg.name!r}"
        )
    out = []
    shapes = {name: info.shape for name, info in ckpt.tensors.items()} if cfg.transform.act_proxy else None
    for n in names:
        weight, bias = modules[n]
        info = ckpt.tensors[weight]
        source = None if shapes is None else proxy_rules.find_source(prefix + n, shapes, info.shape[1])
        out.append(
            SelectedLayer(n, weight, bias, info.shape[0], info.shape[1], info.dtype, q.bits_for(n), proxy=source)
        )
    for n in embedding_names(cfg, sorted(modules), names):
        info = ckpt.tensors[modules[n][0]]
        out.append(SelectedLayer(n, modules[n][0], None, *info.shape, info.dtype, cfg.embed.bits, EMBEDDING))
    return out


def source_tensors(ckpt: Checkpoint, layers: list[SelectedLayer], jobs: int = 1) -> list[SourceTensor]:
    """sha256 of every selected tensor's raw bytes (hashlib releases the GIL: threads suffice)."""
    names = [n for layer in layers for n in layer.tensor_names]
    own = set(names)
    # the tensors the activation estimates were read from that are no layer's own (norm gains)
    names += [n for n in dict.fromkeys(n for la in layers for n in proxy_rules.tensor_names(la.proxy)) if n not in own]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        hashes = list(pool.map(ckpt.sha256, names))
    return [
        SourceTensor(n, ckpt.tensors[n].dtype, ckpt.tensors[n].shape, h, n not in own)
        for n, h in zip(names, hashes, strict=True)
    ]


# pi0.5's adaptive norms are Linears named <norm>.dense (full_w4a8 packs them at 8 bits by a
# pattern); pi0's expert norms are plain gains, and its time enters through action_time_mlp_*.
_ADAPTIVE_NORM_PROBE = "gemma_expert.model.layers.0.input_layernorm.dense"
_PI0_MARKER = re.compile(r"(?:^|\.)action_time_mlp_in\.weight$")


def unused_bits_patterns(cfg: DuQuantConfig, layers: list[SelectedLayer]) -> list[str]:
    """The ``quant.weight_bits_by_pattern`` keys that match no selected Linear."""
    names = [la.name for la in layers if la.kind == LINEAR]
    return [p for p, _ in cfg.quant.weight_bits_by_pattern if not any(re.search(p, n) for n in names)]


def selection_notes(cfg: DuQuantConfig, ckpt: Checkpoint, layers: list[SelectedLayer]) -> list[str]:
    """One line per bits pattern that matches no selected layer: not an error (full_w4a8's
    adaptive-norm rule has nothing to match on pi0), but worth saying, with why when known."""
    modules = list(linear_modules(ckpt))
    return [_unused_note(p, modules, ckpt) for p in unused_bits_patterns(cfg, layers)]


def _unused_note(pattern: str, modules: list[str], ckpt: Checkpoint) -> str:
    """The adaptive-norm rule on a checkpoint without any adaptive norm says so (and names pi0
    when its time MLP is there); any other unused pattern is said as it is."""
    field = f"quant.weight_bits_by_pattern '{pattern}'"  # as the TOML writes it
    if not re.search(pattern, _ADAPTIVE_NORM_PROBE) or any(re.search(pattern, m) for m in modules):
        return f"note: {field} matches no selected layer"
    pi0 = " (pi0)" if any(_PI0_MARKER.search(n) for n in ckpt.tensors) else ""
    return f"note: no adaptive norms on this checkpoint{pi0}: {field} matches no layer"


def preset_embed_rules() -> set[str]:
    """The ``embed.include`` patterns the presets set: rules written for PaliGemma's table, which
    may find none on another model (a config with ``base = "full_w4a8"``), unlike a user's own."""
    return {rule for name in preset_names() if (rule := resolve(name).embed.include)}


def _no_table_message(include: str, modules: list[str], linears: list[str]) -> str:
    """``embed.include`` matching nothing, with the nearest 2-D weights [select] leaves alone."""
    chosen = set(linears)
    tables = [m for m in modules if m not in chosen] or modules
    pieces = [_literal(a) for a in include.split("|")]

    def likeness(name: str) -> float:
        return max(
            difflib.SequenceMatcher(None, piece, candidate).ratio()
            for piece in pieces
            for candidate in (name, name.rsplit(".", 1)[-1])
        )

    near = sorted(tables, key=lambda m: (-likeness(m), m))[:3]
    message = f"embed.include '{include}' matches no table; nearest: {', '.join(near) or 'none (no 2-D weight)'}"
    if "lm_head" in include:  # transformers' save_pretrained writes a tied pair's table once, as the embedding
        message += " (a tied lm_head.weight is not saved: include the embedding it is tied to)"
    return message


def _literal(pattern: str) -> str:
    """A pattern's plain text, for likeness: 'language_model\\.embed_tokens)$' -> 'language_model.embed_tokens'."""
    return re.sub(r"[\^$*+?()\[\]{}]", "", re.sub(r"\\(.)", r"\1", pattern.replace("(?:", "")))


def embed_notes(cfg: DuQuantConfig, layers: list[SelectedLayer]) -> list[str]:
    """One line when a preset's table rule found no table (the build goes on without one)."""
    if not cfg.embed.include or any(la.kind == EMBEDDING for la in layers):
        return []
    return [
        f"note: embed.include '{cfg.embed.include}', a preset's rule for PaliGemma's token table, matches no "
        "table on this checkpoint: the bundle quantizes no embedding"
    ]


def build_notes(cfg: DuQuantConfig, ckpt: Checkpoint, layers: list[SelectedLayer]) -> list[str]:
    """Every note a build and ``list-layers`` end with: unused bits patterns, then tables."""
    return selection_notes(cfg, ckpt, layers) + embed_notes(cfg, layers)
