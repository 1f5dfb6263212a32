"""Named recipe variants the quality benchmarks compare side by side (``--recipes a,b``).

Each is a set of config overrides on the testbed's selection, applied with ``DuQuantConfig.replace``:

* ``default``: the shipped default (per-layer choice, ranked on the data-free activation estimate);
* ``unweighted``: the default as it was before the estimate (candidates ranked by the unweighted
  weight error, no smoothing on the estimate);
* ``simple``: the simple EqHad recipe (equalize β 0.5, zigzag, block Hadamard 16, no plain
  candidate): the yardstick the default must not lose to;
* ``block16``: the default with Hadamard block 16.
"""

from __future__ import annotations

from duquant_runtime.config import DuQuantConfig

RECIPES: dict[str, dict[str, dict]] = {
    "default": {},
    "unweighted": {"transform": {"act_proxy": False, "proxy_smooth": ()}},
    "simple": {
        "transform": {
            "equalize": (0.5,),
            "permute": True,
            "block_size": 16,
            "rtn_candidate": False,
            "act_proxy": False,
            "proxy_smooth": (),
        }
    },
    "block16": {"transform": {"block_size": 16}},
}


# The W4A4 tables' cases (docs/benchmarks.md, "W4A4 for the whole policy"): label -> (preset, built with --calib).
W4A4_CASES: dict[str, tuple[str, bool]] = {
    "W4A8 data-free": ("full_w4a8", False),
    "W4A8 --calib": ("full_w4a8_calib", True),
    "W4A4 --calib": ("full_w4a4", True),
}


def recipe(base: DuQuantConfig, name: str) -> DuQuantConfig:
    """``base`` with the named recipe's overrides (its selection and name kept)."""
    if name not in RECIPES:
        raise SystemExit(f"unknown recipe {name!r}; the recipes are {', '.join(RECIPES)}")
    config = base
    for section, fields in RECIPES[name].items():
        config = config.replace(section, **fields)
    return config


def recipes(base: DuQuantConfig, names: str) -> dict[str, DuQuantConfig]:
    """label -> config for a comma-separated list of recipe names."""
    return {name: recipe(base, name) for name in names.split(",") if name}
