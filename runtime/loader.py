"""load_bundle: check everything, then swap modules, all or nothing.

Load time does no SVD, rotation, permutation or scale search: it reads tensors (and,
for ``weight_storage="dequant"``, unpacks integer codes once). The checks of each layer and
the building of its replacement are ``replacements.py``'s; this module checks the bundle
as a whole (its config) and swaps the layers in.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .bundle import BundleHeader, BundleReader
from .bundle_checks import require_config
from .config import from_dict, resolve
from .errors import BundleError, DuQuantError
from .flowsteps import step_table
from .layer import DuQuantLinear, storage_named
from .load_report import LoadReport
from .prefix import detect_prefix
from .replacements import BuildOptions, Progress, prepare_layers
from .schema import DuQuantConfig
from .tied_heads import TIED_HEAD_MODES, find_tied_heads

VERIFY_MODES = ("signature", "shapes")
__all__ = ["VERIFY_MODES", "LoadReport", "load_bundle"]


def load_bundle(
    model: nn.Module,
    path: str | Path,
    expect_config: str | Path | DuQuantConfig | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weight_storage: str = "codes",
    verify: str = "signature",
    act_scales: str | Path | None = None,
    name_prefix: str | None = None,
    progress: bool | None = None,
    tied_heads: str = "share",
) -> LoadReport:
    """Replace the bundle's layers in ``model`` with DuQuantLinear modules, in place.

    Checks, before touching the model: the format version; that the bundle was built
    for ``expect_config`` (a preset name, TOML path or config; field by field); every
    layer's presence, type and shape in the model; every dataset's checksum; and, with
    ``verify="signature"``, each live weight's float64 sum / sum of squares against
    the source weights the bundle was built from. Any mismatch raises a BundleError
    subclass naming the layer and field, and leaves the model untouched.

    ``dtype``/``device`` default to each replaced layer's own. ``weight_storage="codes"``
    (0.5: ``"int4"``) keeps packed codes resident (real memory savings); ``"dequant"`` unpacks once at
    load for speed. ``act_scales`` is a file from :func:`save_act_scales` for static
    activation layers. ``name_prefix`` maps bundle names onto the model (e.g.
    ``"model."`` for LeRobot's pi0 port); by default it is detected: when the names resolve
    under exactly one consistent prefix it is applied and the report says so, and when
    several fit the load is refused with the candidates. ``progress`` shows a progress line
    on stderr (default: when stderr is a terminal). ``tied_heads``: a module whose weight is an
    embedding the bundle quantizes (transformers' ``lm_head``) reads the same codes
    (``"share"``: one copy), or the load is refused (``"refuse"``); never two copies.
    """
    start = time.perf_counter()
    options = _options(device, dtype, weight_storage, verify, tied_heads)
    with BundleReader(path) as reader:
        header = reader.header
        if expect_config is not None:
            require_config(header, resolve(expect_config))
        config = _stored_config(header)
        options = _with_steps(options, model, config, header)
        detected = name_prefix is None
        if name_prefix is None:
            name_prefix = detect_prefix(list(header.layer_names), dict(model.named_modules()))
        shown = Progress(len(header.layer_names), header.path.name) if _shows(progress) else None
        prepared = prepare_layers(model, reader, config, options, prefix=name_prefix, progress=shown)
    heads = find_tied_heads(model, prepared, tied_heads)
    if act_scales is not None:
        from .calibration import apply_act_scales

        linears = {t: layer for t, (_, layer) in prepared.items() if isinstance(layer, DuQuantLinear)}
        apply_act_scales(linears, act_scales, header.fingerprint)
    report = LoadReport(
        header.path, header.fingerprint, header.name, prefix=name_prefix, prefix_detected=detected and bool(name_prefix)
    )
    _swap_all(model, prepared, report)
    _swap_heads(model, heads, report)
    report.seconds = time.perf_counter() - start
    return report


def _options(
    device: torch.device | str | None, dtype: torch.dtype | None, weight_storage: str, verify: str, tied_heads: str
) -> BuildOptions:
    """The load's options, each refused with one sentence when it is not one of its values."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    if tied_heads not in TIED_HEAD_MODES:
        raise ValueError(f"tied_heads must be one of {TIED_HEAD_MODES}, got {tied_heads!r}")
    return BuildOptions(device=device, dtype=dtype, weight_storage=storage_named(weight_storage), verify=verify)


def _swap_heads(model: nn.Module, heads: dict[str, tuple[nn.Module, nn.Module]], report: LoadReport) -> None:
    """Each tied head reads its table's codes now; listed in ``report`` (it holds no bytes)."""
    for target, (_, head) in heads.items():
        _swap(model, target, head)
        report.tied_heads.append(target)


def _shows(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _with_steps(options: BuildOptions, model: nn.Module, config: DuQuantConfig, header: BundleHeader) -> BuildOptions:
    """A per-step bundle's layers read the model's step clock: refused now, not at a forward, without one."""
    if not any(config.quant.runs_per_step(n) for n in header.layer_names):
        return options
    return replace(options, step_table=step_table(model, config.quant.flow_steps, f"bundle {header.path.name}"))


def _stored_config(header: BundleHeader) -> DuQuantConfig:
    """The config the bundle stores, which sets the layers' activation quantization."""
    try:
        return from_dict(header.config)
    except DuQuantError as exc:
        raise BundleError(f"{header.path}: its stored config is invalid ({exc})", field="config") from None


def _swap_all(model: nn.Module, prepared: dict[str, tuple[nn.Module, nn.Module]], report: LoadReport) -> None:
    """Every prepared layer replaces its module in place, counted in ``report``."""
    counted: set[tuple[int, int]] = set()
    for target, (old, layer) in prepared.items():
        report.add(target, old, layer, counted)
        _swap(model, target, layer)


def _swap(model: nn.Module, target: str, layer: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
