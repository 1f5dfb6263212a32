"""Which layers a selection picks — the one implementation of the rules — and each name's component."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

from .config_sections import SelectConfig
from .errors import SelectionError

# pi0.5's components by a marker in the module name (openpi's names; LeRobot's sit under
# "model."), for bytes per component in inspect and the load report.
COMPONENTS = {"vision": ".vision_tower.", "llm": ".language_model.", "expert": ".gemma_expert."}


def component_of(name: str) -> str:
    return next((c for c, marker in COMPONENTS.items() if marker in "." + name), "other")


# The policy's last layer is quantized only when named in select.layers.
NEVER_UNLESS_LISTED = re.compile(r"(?:^|\.)action_out_proj$")


def matches(select: SelectConfig, names: Iterable[str]) -> list[str]:
    """The names a selection picks, sorted — the one implementation of the rules:

    * ``select.layers`` non-empty: exactly those names, each of which must be among ``names``
      (a missing one is refused, with the nearest real name);
    * otherwise: starts with ``scope``, matches ``include`` and not ``exclude`` (re.search),
      and is never the policy's last layer (``action_out_proj``) unless whitelisted.
    """
    names = list(names)
    if select.layers:
        known = set(names)
        missing = [n for n in select.layers if n not in known]
        if missing:
            near = difflib.get_close_matches(missing[0], names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise SelectionError(
                f"select.layers names {len(missing)} layer(s) that are not Linear layers here, "
                f"e.g. {missing[0]!r}{hint}"
            )
        return sorted(set(select.layers))
    include, exclude = re.compile(select.include), re.compile(select.exclude) if select.exclude else None
    return sorted(
        n
        for n in names
        if n.startswith(select.scope)
        and include.search(n)
        and not (exclude and exclude.search(n))
        and not NEVER_UNLESS_LISTED.search(n)
    )
