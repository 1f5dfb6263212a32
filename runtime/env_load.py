"""enable_from_env: the bundle the ``OPENPI_DUQUANT_*`` variables name (a file, or the one in a
folder built for the effective config), loaded with ``load_bundle``."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from .bundle import BundleHeader, BundleReader
from .bundle_checks import config_problems
from .env import PREFIX, EnvRequest, config_from_env, request_from_env
from .errors import BundleError, CheckpointMismatchError, ConfigMismatchError, NothingLoadedWarning
from .load_report import LoadReport
from .loader import load_bundle
from .schema import DuQuantConfig


def _headers_in(packdir: Path) -> list[BundleHeader]:
    headers = []
    for path in sorted(packdir.rglob("*.h5")):
        try:
            with BundleReader(path) as r:
                headers.append(r.header)
        except BundleError:
            continue  # unreadable files are not candidates; a matching one is still found
    return headers


def _describe_mismatch(header: BundleHeader, config: DuQuantConfig) -> str:
    fields = [p.field for p in config_problems(header, config)]
    return f"{header.path.name} ({header.name}: differs in {', '.join(fields[:3])})"


def resolve_packdir(packdir: str | Path, config: DuQuantConfig) -> list[Path]:
    """Bundles in ``packdir`` built for ``config`` (newest first); refuses when there are none."""
    packdir = Path(packdir)
    if not packdir.is_dir():
        raise BundleError(f"{PREFIX}PACKDIR={packdir} is not a directory")
    headers = _headers_in(packdir)
    matching = [h for h in headers if not config_problems(h, config)]
    if matching:
        return [h.path for h in sorted(matching, key=lambda h: h.created_at, reverse=True)]
    if not headers:
        raise ConfigMismatchError(
            f"{PREFIX}PACKDIR={packdir} holds no duquant bundle: build one with "
            f"`duquant-packs build --config {config.name} --out {packdir}`",
            field="config",
        )
    held = "; ".join(_describe_mismatch(h, config) for h in headers)
    raise ConfigMismatchError(
        f"{PREFIX}PACKDIR={packdir} holds no bundle for the effective config {config.name!r} "
        f"(scope {config.select.scope!r}); it holds: {held}. Build the right one with "
        f"`duquant-packs build --config <config> --out {packdir}` or point {PREFIX}PACKDIR elsewhere",
        field="config",
    )


def enable_from_env(model: nn.Module, environ: Mapping[str, str] | None = None, **kwargs: object) -> LoadReport | None:
    """Drop-in for openpi eval scripts. Returns None, with a ``NothingLoadedWarning``, when
    no bundle is configured: an eval never runs unquantized without a word.

    ``OPENPI_DUQUANT_BUNDLE=path`` loads that bundle (checked against the config given by
    ``OPENPI_DUQUANT_CONFIG`` and the seed's variables, when any is set). Otherwise
    ``OPENPI_DUQUANT_PACKDIR=dir`` plus the config variables resolves to the bundle in
    ``dir`` whose fingerprint matches the effective config — and refuses, listing what
    the directory holds, when none does. ``OPENPI_DUQUANT_ACT_SCALES`` names an
    activation-scales file. Extra keyword arguments go to :func:`load_bundle`.
    """
    request = request_from_env(environ)
    kwargs.setdefault("act_scales", request.act_scales)
    if request.bundle:
        expected = config_from_env(environ=environ) if request.config_given else None
        return load_bundle(model, request.bundle, expected, **kwargs)  # type: ignore[arg-type]
    packdir = request.packdir
    if packdir:
        config = config_from_env(environ=environ)
        candidates = resolve_packdir(packdir, config)
        last: CheckpointMismatchError | None = None
        for path in candidates:  # same config, several checkpoints: the one matching the weights
            try:
                return load_bundle(model, path, config, **kwargs)  # type: ignore[arg-type]
            except CheckpointMismatchError as exc:
                last = exc
        assert last is not None
        raise CheckpointMismatchError(
            f"{PREFIX}PACKDIR={packdir}: {len(candidates)} bundle(s) match config "
            f"{config.name!r} but none was built from this model's weights ({last})",
            layer=last.layer,
            field=last.field,
        )
    warnings.warn(_nothing_loaded(request), NothingLoadedWarning, stacklevel=2)
    return None


def _nothing_loaded(request: EnvRequest) -> str:
    fix = f"set {PREFIX}BUNDLE=<bundle.h5>, or {PREFIX}PACKDIR=<dir> with the config's variables"
    found = (
        f"{PREFIX}* config variables are set but no bundle is named"
        if request.config_given
        else f"no {PREFIX}* variable set"
    )
    return f"nothing loaded: {found}; the model runs unquantized ({fix})"
