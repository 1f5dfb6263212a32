"""Name prefixes: the same layers under another parent module.

openpi's ``PI0Pytorch`` names a layer ``paligemma_with_expert.…``; LeRobot's policy wraps the
same model as ``model`` and names it ``model.paligemma_with_expert.…``. Bundles store layer
names as the config's selection sees them (without the prefix), so one bundle serves both:

* ``selection_prefix`` (build, ``capture_stats``): the prefix to strip from checkpoint or
  module names before the config's selection picks layers;
* ``detect_prefix`` (load): the prefix under which a bundle's layers are the model's modules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .config_sections import SelectConfig
from .errors import ModelMismatchError, SelectionError
from .selection import matches


def _picks(select: SelectConfig, names: list[str]) -> bool:
    try:
        return bool(matches(select, names))
    except SelectionError:  # select.layers names a layer not among these names
        return False


def _candidates(select: SelectConfig, names: list[str]) -> set[str]:
    """Dotted prefixes after which a name starts as the selection expects (its scope, or its
    first listed layer): few, so each is tried in full."""
    anchor = select.layers[0] if select.layers else select.scope
    if not anchor:
        return set()  # no scope: include / exclude search anywhere, a prefix changes nothing
    return {n[: i + 1] for n in names for i in range(len(n)) if n[i] == "." and n.startswith(anchor, i + 1)}


def strip_prefix(prefix: str, names: Iterable[str]) -> list[str]:
    return [n[len(prefix) :] for n in names if n.startswith(prefix)]


def selection_prefix(select: SelectConfig, names: Iterable[str]) -> str:
    """ "" when the selection picks layers among ``names`` as they are; otherwise the one dotted
    prefix (e.g. ``"model."``) under which it does, or "" when none does (the caller explains
    the empty selection). Several prefixes that each work are refused: which copy to quantize
    is the user's choice."""
    names = list(names)
    if _picks(select, names):
        return ""
    fits = sorted(p for p in _candidates(select, names) if _picks(select, strip_prefix(p, names)))
    if len(fits) > 1:
        listed = ", ".join(repr(p) for p in fits)
        raise SelectionError(
            f"the selection picks layers under several name prefixes ({listed}); narrow select.scope to one of them"
        )
    return fits[0] if fits else ""


def detect_prefix(names: list[str], modules: Mapping[str, Any]) -> str:
    """The one name prefix under which every bundle layer is a module of the model ("" when
    they all resolve as they are). Refuses with the candidates when several fit, and with
    the first unresolvable layer when none does."""
    if all(n in modules for n in names):
        return ""
    first = names[0]
    # only prefixes under which the first layer exists can fit them all
    candidates = {m[: -len(first)] for m in modules if m.endswith("." + first)}
    fits = sorted(p for p in candidates if all(p + n in modules for n in names))
    if len(fits) == 1:
        return fits[0]
    if fits:
        listed = ", ".join(repr(p) for p in fits)
        raise ModelMismatchError(
            f"the bundle's layers are found in the model under several name prefixes ({listed}): pass "
            "name_prefix= to say which copy to quantize",
            field="presence",
        )
    missing = next((n for n in names if not any(p + n in modules for p in candidates)), first)
    near = [m for m in modules if m.endswith(missing)]
    hint = f"; the model has {near[0]!r}" if near else ""
    raise ModelMismatchError(
        f"layer {missing}: not found in the model under any one name prefix{hint} — is this the model the "
        "bundle was built for?",
        layer=missing,
        field="presence",
    )
