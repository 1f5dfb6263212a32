"""The replacement layers of a load: each bundle layer checked against its module in the model
(presence, type, shape, bias, weight signature) and built as a ``DuQuantLinear`` (an embedding
as a ``QuantEmbedding``), with its provenance. Nothing in the model changes here; ``loader.py``
swaps them in afterwards.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from .bundle import BundleHeader, BundleReader, LayerPack
from .bundle_checks import expected_layers
from .bundle_records import EMBEDDING, LINEAR
from .embedding import QuantEmbedding
from .errors import BundleError, CheckpointMismatchError, ModelMismatchError
from .flowsteps import StepTable
from .layer import DuQuantLinear
from .layer_buffers import SharedTensors, act_scale_shape
from .live_weights import digests_ahead, signature_problem, weights_to_digest
from .schema import DuQuantConfig

Replacement = DuQuantLinear | QuantEmbedding
# What each layer kind of a bundle replaces in the model.
REPLACES: dict[str, type[nn.Module]] = {LINEAR: nn.Linear, EMBEDDING: nn.Embedding}


@dataclass(frozen=True)
class BuildOptions:
    """How ``load_bundle`` was asked to build the layers (None: each replaced layer's own)."""

    device: torch.device | str | None
    dtype: torch.dtype | None
    weight_storage: str
    verify: str  # "signature" or "shapes"
    step_table: StepTable | None = None  # per_step_static bundles: the model's clock and the flow times


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
) -> dict[str, tuple[nn.Module, Replacement]]:
    """Check every layer and build its replacement, by model name: (the module, its replacement)."""
    header = reader.header
    _check_complete(header)
    modules = dict(model.named_modules())
    prepared: dict[str, tuple[nn.Module, Replacement]] = {}
    shared: SharedTensors = {}
    ahead = weights_to_digest(list(header.layer_names), modules, prefix) if options.verify == "signature" else {}
    with digests_ahead(ahead) as digests:
        for name in header.layer_names:
            target = prefix + name
            pack = reader.read_layer(name, check=True)
            module = module_for(modules, target, name, pack.kind)
            if isinstance(module, nn.Linear) and pack.kind == EMBEDDING:
                target, module = tied_embedding(modules, target, module)
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
    module: nn.Module,
    pack: LayerPack,
    header: BundleHeader,
    config: DuQuantConfig,
    options: BuildOptions,
    shared: SharedTensors,
) -> Replacement:
    dtype = options.dtype or module.weight.dtype
    device = options.device if options.device is not None else module.weight.device
    if pack.kind == EMBEDDING:
        return QuantEmbedding.from_pack(
            pack,
            dtype=dtype,
            device=device,
            like=module,
            bundle_name=name,
            bundle_fingerprint=header.fingerprint,
        )
    act_bits, act_mode = layer_act(pack, config)
    table = options.step_table if act_mode == "per_step_static" and act_bits > 0 else None
    if pack.act_scale is not None and act_bits > 0:
        wanted = act_scale_shape(pack.in_features, table)
        if pack.act_scale.shape != wanted:
            raise BundleError(
                f"{header.path}: layer {name} holds activation scales of shape {pack.act_scale.shape}, but its "
                f"activation mode ({act_mode}) needs {wanted}; the bundle is inconsistent",
                layer=name,
                field="act_scale",
            )
    return DuQuantLinear.from_pack(
        pack,
        act_bits=act_bits,
        act_mode=act_mode,
        weight_storage=options.weight_storage,
        dtype=dtype,
        device=device,
        shared=shared,
        bundle_name=name,
        bundle_fingerprint=header.fingerprint,
        calib_defaults=(config.quant.calib_steps, config.quant.act_percentile),
        step_table=table,
    )


def layer_act(pack: LayerPack, config: DuQuantConfig) -> tuple[int, str]:
    """The layer's activation bits and mode: as the bundle records them for the layer (0.10),
    else as its config gives them."""
    if pack.act_bits is not None and pack.act_mode is not None:
        return pack.act_bits, pack.act_mode
    return config.quant.act_bits, config.quant.mode_for(pack.name)


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


def module_for(modules: dict[str, nn.Module], target: str, name: str, kind: str = LINEAR) -> nn.Module:
    """The model's module for a bundle layer, refused unless it is what the layer's kind
    replaces (an nn.Linear, an nn.Embedding)."""
    module = modules.get(target)
    if module is None:
        near = [m for m in modules if m.endswith(name)]
        hint = f"; the model has {near[0]!r} — pass name_prefix={near[0][: -len(name)]!r}" if near else ""
        raise ModelMismatchError(f"layer {target}: not found in the model{hint}", layer=target, field="presence")
    if isinstance(module, QuantEmbedding | DuQuantLinear):
        raise ModelMismatchError(
            f"layer {target}: is quantized already (a {type(module).__name__}): load the bundle onto a model "
            "holding the float weights",
            layer=target,
            field="type",
        )
    wanted = REPLACES[kind]
    # a table stored under its tied head's name (save_model keeps one name of a tied pair:
    # openpi's checkpoints hold PaliGemma's table as lm_head.weight); tied_embedding finds it
    if kind == EMBEDDING and isinstance(module, nn.Linear):
        return module
    if not isinstance(module, wanted):
        raise ModelMismatchError(
            f"layer {target}: is a {type(module).__name__} in the model, not an nn.{wanted.__name__}",
            layer=target,
            field="type",
        )
    return module


def check_fits(target: str, module: nn.Module, pack: LayerPack) -> None:
    """The layer's shape and bias presence agree between the model and the bundle."""
    if isinstance(module, nn.Embedding):
        _check_embedding(target, module, pack)
        return
    assert isinstance(module, nn.Linear)
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


def _check_embedding(target: str, module: nn.Embedding, pack: LayerPack) -> None:
    """The table's size agrees, and the module uses nothing a quantized table cannot honour."""
    live = (module.num_embeddings, module.embedding_dim)
    if live != (pack.out_features, pack.in_features):
        raise ModelMismatchError(
            f"embedding {target}: table size differs (model {live[0]} rows x {live[1]}, bundle "
            f"{pack.out_features} rows x {pack.in_features}): a vocabulary or width of another model",
            layer=target,
            field="shape",
        )
    if module.max_norm is not None:
        raise ModelMismatchError(
            f"embedding {target}: sets max_norm={module.max_norm}, which renormalizes the table in place on "
            "every forward; a quantized table cannot: leave this embedding out of [embed]",
            layer=target,
            field="max_norm",
        )


def tied_embedding(modules: dict[str, nn.Module], target: str, head: nn.Linear) -> tuple[str, nn.Embedding]:
    """The nn.Embedding whose table is ``head``'s weight, for a bundle table stored under the
    head's name; refused when the head is tied to none."""
    weight = head.weight
    for name, module in modules.items():
        table = module._parameters.get("weight") if isinstance(module, nn.Embedding) else None
        if table is not None and table.data_ptr() == weight.data_ptr() != 0 and table.shape == weight.shape:
            return name, module
    raise ModelMismatchError(
        f"layer {target}: the bundle holds it as an embedding table, but in the model it is an nn.Linear "
        "whose weight is no nn.Embedding's (not a tied head): load the bundle onto the model it was built for",
        layer=target,
        field="type",
    )
