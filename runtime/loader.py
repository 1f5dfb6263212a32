"""load_bundle / enable_from_env: check everything, then swap modules, all or nothing.

Load time does no SVD, rotation, permutation or scale search: it reads tensors (and,
for ``weight_storage="dequant"``, unpacks integer codes once).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .bundle import BundleHeader, BundleReader, LayerPack
from .checks import config_problems, expected_layers
from .config import DuQuantConfig, component_of, from_dict, resolve
from .env import PREFIX, EnvRequest, config_from_env, request_from_env
from .errors import (
    BundleError,
    CheckpointMismatchError,
    ConfigMismatchError,
    DuQuantError,
    ModelMismatchError,
    NothingLoadedWarning,
)
from .layer import WEIGHT_STORAGES, DuQuantLinear
from .prefix import detect_prefix
from .signature import SIGNATURE_RTOL, SOURCE_TORCH_DTYPES, bits_digest, signature_matches, weight_signature

VERIFY_MODES = ("signature", "shapes")
DIGESTED = frozenset(SOURCE_TORCH_DTYPES.values())  # live dtypes a raw-bytes digest can match
# Smaller weights are digested in line: a thread's hand-off costs more than their sum.
AHEAD_MIN_BYTES = 1 << 20


@dataclass
class LoadReport:
    bundle: Path
    fingerprint: str
    config_name: str
    replaced: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the replaced nn.Linear parameters
    bytes_after: int = 0  # the DuQuantLinear buffers that replace them
    seconds: float = 0.0
    prefix: str = ""  # the name prefix the bundle's layers were found under
    prefix_detected: bool = False  # ... found by load_bundle, not passed by the caller
    components: dict[str, list[int]] = field(default_factory=dict)  # component -> [layers, before, after]

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def __str__(self) -> str:
        where = f"; names under {self.prefix!r} (detected)" if self.prefix_detected else ""
        parts = ", ".join(
            f"{c} {n} layers {b / 2**20:.1f} -> {a / 2**20:.1f} MiB" for c, (n, b, a) in sorted(self.components.items())
        )
        return (
            f"duquant: {len(self.replaced)} layers from {self.bundle.name} ({self.config_name}, "
            f"fp {self.fingerprint[:12]}{where}): {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({self.ratio:.3f}x) in {self.seconds:.2f} s"
            + (f" [{parts}]" if len(self.components) > 1 else "")
        )


@contextlib.contextmanager
def _digests_ahead(weights: dict[str, torch.Tensor]) -> Iterator[dict[str, Future[int]]]:
    """``bits_digest`` of each weight, summed on other cores while the caller builds layers
    (the sums release the GIL); whatever is left is cancelled when the caller stops. Two
    threads: on 2 cores the full-size digests took 0.41 s of the load with one, 0.28 s with two."""
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        yield {name: pool.submit(bits_digest, weight) for name, weight in weights.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _signature_problem(name: str, weight: torch.Tensor, pack: LayerPack, digest: Future[int] | None) -> str | None:
    """The live weight against the source the bundle was built from: exactly, by its raw bytes,
    when the model holds the checkpoint's dtype (``digest``: its ``bits_digest``, computed
    ahead); otherwise by float64 sums within the rounding a dtype change allows."""
    if pack.source_bits is not None and weight.dtype == SOURCE_TORCH_DTYPES.get(pack.source_dtype):
        live = digest.result() if digest is not None else bits_digest(weight)
        if live == pack.source_bits:
            return None
        return (
            f"layer {name}: weight differs from the {pack.source_dtype} source tensor the bundle was built from "
            f"(raw-bytes digest {live} in the model, {pack.source_bits} in the bundle): the bundle was built "
            "from another checkpoint than the model's weights"
        )
    live_sum, live_sumsq = weight_signature(weight)
    n = weight.numel()
    rtol = SIGNATURE_RTOL
    source_bits = {"BF16": 8, "F16": 11, "F32": 24, "F64": 53}.get(pack.source_dtype, 53)
    live_bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}.get(weight.dtype, 53)
    if live_bits < source_bits or (live_bits == 11 and source_bits == 8):
        rtol = 4.0 * 2.0**-live_bits  # the model holds a rounded copy of the source weights
    if not signature_matches(live_sum, live_sumsq, pack.source_sum, pack.source_sumsq, n, rtol):
        return (
            f"layer {name}: weight signature differs (model sum {live_sum:.9g}, sumsq {live_sumsq:.9g}; bundle "
            f"sum {pack.source_sum:.9g}, sumsq {pack.source_sumsq:.9g}): the bundle was built from another "
            "checkpoint than the model's weights"
        )
    return None


def _prepare(
    model: nn.Module,
    reader: BundleReader,
    config: DuQuantConfig,
    *,
    prefix: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    weight_storage: str,
    verify: str,
    progress: _Progress | None = None,
) -> dict[str, tuple[nn.Linear, DuQuantLinear]]:
    """Check every layer and build its replacement; nothing in ``model`` changes here."""
    header = reader.header
    modules = dict(model.named_modules())
    missing_layers = expected_layers(header) - set(header.layer_names)
    if missing_layers:
        name = sorted(missing_layers)[0]
        raise BundleError(
            f"{header.path}: layer {name} is missing from the bundle ({len(missing_layers)} missing): "
            "the file is incomplete",
            layer=name,
            field="presence",
        )
    prepared: dict[str, tuple[nn.Linear, DuQuantLinear]] = {}
    shared: dict = {}
    digested: dict[str, torch.Tensor] = {}
    for name in header.layer_names if verify == "signature" else ():
        module = modules.get(prefix + name)
        weight = module.weight if isinstance(module, nn.Linear) else None
        if weight is not None and weight.dtype in DIGESTED and weight.nbytes >= AHEAD_MIN_BYTES:
            digested[name] = weight
    with _digests_ahead(digested) as digests:
        for name in header.layer_names:
            target = prefix + name
            module = _linear(modules, target, name)
            pack = reader.read_layer(name, check=True)
            _check_fits(target, module, pack)
            if verify == "signature":
                problem = _signature_problem(target, module.weight, pack, digests.get(name))
                if problem:
                    raise CheckpointMismatchError(problem, layer=target, field="weight signature")
            layer = DuQuantLinear.from_pack(
                pack,
                act_bits=config.quant.act_bits,
                act_mode=config.quant.act_mode,
                weight_storage=weight_storage,
                dtype=dtype or module.weight.dtype,
                device=device if device is not None else module.weight.device,
                shared=shared,
            )
            layer.bundle_name, layer.bundle_fingerprint = name, header.fingerprint
            layer.calib_defaults = (config.quant.calib_steps, config.quant.act_percentile)
            prepared[target] = (module, layer)
            if progress is not None:
                progress.step()
    if progress is not None:
        progress.close()
    return prepared


def _linear(modules: dict[str, nn.Module], target: str, name: str) -> nn.Linear:
    """The model's module for a bundle layer, refused unless it is an nn.Linear."""
    module = modules.get(target)
    if module is None:
        near = [m for m in modules if m.endswith(name)]
        hint = f"; the model has {near[0]!r} — pass name_prefix={near[0][: -len(name)]!r}" if near else ""
        raise ModelMismatchError(f"layer {target}: not found in the model{hint}", layer=target, field="presence")
    if not isinstance(module, nn.Linear):
        raise ModelMismatchError(
            f"layer {target}: is a {type(module).__name__} in the model, not an nn.Linear",
            layer=target,
            field="type",
        )
    return module


def _check_fits(target: str, module: nn.Linear, pack: LayerPack) -> None:
    """The layer's shape and bias presence agree between the model and the bundle."""
    live = (module.out_features, module.in_features)
    if live != (pack.out_features, pack.in_features):
        raise ModelMismatchError(
            f"layer {target}: shape differs (model {live[0]}x{live[1]}, bundle {pack.out_features}x{pack.in_features})",
            layer=target,
            field="shape",
        )
    if (module.bias is None) != (pack.bias is None):
        raise ModelMismatchError(
            f"layer {target}: bias {'missing' if module.bias is None else 'present'} in the model "
            "but not in the bundle",
            layer=target,
            field="bias",
        )


class _Progress:
    """A one-line progress display on stderr (the runtime does not depend on tqdm)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done, self.start = total, label, 0, time.perf_counter()
        self.last = 0.0

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= 0.1 or self.done == self.total:
            self.last = now
            sys.stderr.write(f"\rloading {self.label}: {self.done}/{self.total} layers, {now - self.start:.1f} s")
            sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def _swap(model: nn.Module, target: str, layer: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)


def _module_bytes(module: nn.Module) -> int:
    return sum(
        t.numel() * t.element_size() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
    )


def load_bundle(
    model: nn.Module,
    path: str | Path,
    expect_config: str | Path | DuQuantConfig | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weight_storage: str = "int4",
    verify: str = "signature",
    act_scales: str | Path | None = None,
    name_prefix: str | None = None,
    progress: bool | None = None,
) -> LoadReport:
    """Replace the bundle's layers in ``model`` with DuQuantLinear modules, in place.

    Checks, before touching the model: the format version; that the bundle was built
    for ``expect_config`` (a preset name, TOML path or config; field by field); every
    layer's presence, type and shape in the model; every dataset's checksum; and, with
    ``verify="signature"``, each live weight's float64 sum / sum of squares against
    the source weights the bundle was built from. Any mismatch raises a BundleError
    subclass naming the layer and field, and leaves the model untouched.

    ``dtype``/``device`` default to each replaced layer's own. ``weight_storage="int4"``
    keeps packed codes resident (real memory savings); ``"dequant"`` unpacks once at
    load for speed. ``act_scales`` is a file from :func:`save_act_scales` for static
    activation layers. ``name_prefix`` maps bundle names onto the model (e.g.
    ``"model."`` for LeRobot's pi0 port); by default it is detected: when the names resolve
    under exactly one consistent prefix it is applied and the report says so, and when
    several fit the load is refused with the candidates. ``progress`` shows a progress line
    on stderr (default: when stderr is a terminal).
    """
    if weight_storage not in WEIGHT_STORAGES:
        raise ValueError(f"weight_storage must be one of {WEIGHT_STORAGES}, got {weight_storage!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    start = time.perf_counter()
    with BundleReader(path) as reader:
        header = reader.header
        if expect_config is not None:
            expected = resolve(expect_config)
            problems = config_problems(header, expected)
            if problems:
                raise ConfigMismatchError(
                    f"{header.path} was built for another config than {expected.name!r}: "
                    + "; ".join(p.text for p in problems),
                    field=problems[0].field,
                )
        try:
            config = from_dict(header.config)
        except DuQuantError as exc:
            raise BundleError(f"{header.path}: its stored config is invalid ({exc})", field="config") from None
        detected = name_prefix is None
        if name_prefix is None:
            name_prefix = detect_prefix(list(header.layer_names), dict(model.named_modules()))
        show = sys.stderr.isatty() if progress is None else progress
        prepared = _prepare(
            model,
            reader,
            config,
            prefix=name_prefix,
            progress=_Progress(len(header.layer_names), header.path.name) if show else None,
            device=device,
            dtype=dtype,
            weight_storage=weight_storage,
            verify=verify,
        )
    if act_scales is not None:
        from .calibration import apply_act_scales

        apply_act_scales({t: layer for t, (_, layer) in prepared.items()}, act_scales, header.fingerprint)
    report = LoadReport(
        header.path, header.fingerprint, header.name, prefix=name_prefix, prefix_detected=detected and bool(name_prefix)
    )
    seen: set[tuple[int, int]] = set()
    for target, (old, layer) in prepared.items():
        before, after = _module_bytes(old), 0
        for buf in layer.buffers():  # shared rotation buffers count once
            key = (buf.untyped_storage().data_ptr(), buf.numel())
            if key not in seen:
                seen.add(key)
                after += buf.numel() * buf.element_size()
        report.bytes_before += before
        report.bytes_after += after
        row = report.components.setdefault(component_of(target), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + before, row[2] + after
        _swap(model, target, layer)
        report.replaced.append(target)
    report.seconds = time.perf_counter() - start
    return report


# ---------------------------------------------------------------- environment


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
