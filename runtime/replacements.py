"""The replacement layers of a load: each bundle layer checked against its module in the model
(presence, type, shape, bias, weight signature) and built as a ``DuQuantLinear``, with its
provenance. Nothing in the model changes here; ``loader.py`` swaps them in afterwards.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .bundle import BundleHeader, BundleReader, LayerPack
from .bundle_checks import expected_layers
from .errors import BundleError, CheckpointMismatchError, ModelMismatchError
from .layer import DuQuantLinear
from .layer_buffers import SharedTensors
from .live_weights import digests_ahead, signature_problem, weights_to_digest
from .schema import DuQuantConfig


@dataclass(frozen=True)
class BuildOptions:
    """How ``load_bundle`` was asked to build the layers (None: each replaced layer's own)."""

    device: torch.device | str | None
    dtype: torch.dtype | None
    weight_storage: str
    verify: str  # "signature" or "shapes"


class Progress:
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


def prepare_layers(
    model: nn.Module,
    reader: BundleReader,
    config: DuQuantConfig,
    options: BuildOptions,
    *,
    prefix: str,
    progress: Progress | None = None,
) -> dict[str, tuple[nn.Linear, DuQuantLinear]]:
    """Check every layer and build its replacement, by model name: (the nn.Linear, its replacement)."""
    header = reader.header
    _check_complete(header)
    modules = dict(model.named_modules())
    prepared: dict[str, tuple[nn.Linear, DuQuantLinear]] = {}
    shared: SharedTensors = {}
    ahead = weights_to_digest(list(header.layer_names), modules, prefix) if options.verify == "signature" else {}
    with digests_ahead(ahead) as digests:
        for name in header.layer_names:
            target = prefix + name
            module = module_for(modules, target, name)
            pack = reader.read_layer(name, check=True)
            check_fits(target, module, pack)
            if options.verify == "signature":
                problem = signature_problem(target, module.weight, pack, digests.get(name))
                if problem:
                    raise CheckpointMismatchError(problem, layer=target, field="weight signature")
            prepared[target] = (module, _replacement(name, module, pack, header, config, options, shared))
            if progress is not None:
                progress.step()
    if progress is not None:
        progress.close()
    return prepared


def _replacement(
    name: str,
    module: nn.Linear,
    pack: LayerPack,
    header: BundleHeader,
    config: DuQuantConfig,
    options: BuildOptions,
    shared: SharedTensors,
) -> DuQuantLinear:
    return DuQuantLinear.from_pack(
        pack,
        act_bits=config.quant.act_bits,
        act_mode=config.quant.act_mode,
        weight_storage=options.weight_storage,
        dtype=options.dtype or module.weight.dtype,
        device=options.device if options.device is not None else module.weight.device,
        shared=shared,
        bundle_name=name,
        bundle_fingerprint=header.fingerprint,
        calib_defaults=(config.quant.calib_steps, config.quant.act_percentile),
    )


def _check_complete(header: BundleHeader) -> None:
    """Every layer the fingerprint lists is in the file."""
    missing_layers = expected_layers(header) - set(header.layer_names)
    if missing_layers:
        name = sorted(missing_layers)[0]
        raise BundleError(
            f"{header.path}: layer {name} is missing from the bundle ({len(missing_layers)} missing): "
            "the file is incomplete",
            layer=name,
            field="presence",
        )


def module_for(modules: dict[str, nn.Module], target: str, name: str) -> nn.Linear:
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


def check_fits(target: str, module: nn.Linear, pack: LayerPack) -> None:
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
