"""Tied output heads: a module whose weight *is* a table the load quantizes (transformers'
``lm_head``, tied to ``embed_tokens``). Such a pair is never silently untied into two copies:
each tied head becomes a ``TiedHead`` reading the embedding's codes (``tied_heads="share"``),
or the load is refused (``"refuse"``, or a head that cannot read codes: a bias, or not a Linear).
"""

from __future__ import annotations

from torch import nn

from .embedding import QuantEmbedding, TiedHead
from .errors import TiedWeightsError

TIED_HEAD_MODES = ("share", "refuse")


def find_tied_heads(
    model: nn.Module, prepared: dict[str, tuple[nn.Module, nn.Module]], mode: str
) -> dict[str, tuple[nn.Module, TiedHead]]:
    """The heads tied to a quantized embedding, by model name: (the module, its TiedHead)."""
    # a table by its storage: a head tied by assignment holds the same Parameter, one tied by
    # a loader that shares storage holds another Parameter over the same bytes
    tables = {
        _where(old.weight): (target, new)
        for target, (old, new) in prepared.items()
        if isinstance(new, QuantEmbedding) and isinstance(old, nn.Embedding)
    }
    heads: dict[str, tuple[nn.Module, TiedHead]] = {}
    if not tables:
        return heads
    for name, module in model.named_modules():
        weight = module._parameters.get("weight") if name not in prepared else None
        if weight is None or _where(weight) not in tables:
            continue
        target, embedding = tables[_where(weight)]
        _check_head(name, module, target, mode)
        heads[name] = (module, TiedHead(embedding))
    return heads


def _where(weight: nn.Parameter) -> tuple:
    return (weight.device, weight.data_ptr(), tuple(weight.shape)) if weight.data_ptr() else (id(weight),)


def _check_head(name: str, module: nn.Module, target: str, mode: str) -> None:
    if mode == "refuse":
        raise TiedWeightsError(
            f"{name} shares its weight with the embedding {target}, which the bundle quantizes: pass "
            "tied_heads='share' to let it read the same codes (one copy), or leave the embedding out of [embed]",
            layer=name,
            field="tied weights",
        )
    if not isinstance(module, nn.Linear) or module.bias is not None:
        what = "has a bias" if isinstance(module, nn.Linear) else f"is a {type(module).__name__}, not an nn.Linear"
        raise TiedWeightsError(
            f"{name} shares its weight with the embedding {target}, which the bundle quantizes, but {what}, so it "
            "cannot read the table's codes: leave the embedding out of [embed]",
            layer=name,
            field="tied weights",
        )
