"""Static activation scales: an explicit calibration step, saved and reloaded by fingerprint.

Semantics follow the seed: per input channel of the transformed basis, the
``act_percentile`` of |x| in each of ``calib_steps`` batches, the largest batch's kept, scale =
p / qmax — the one rule of ``actquant.StaticScaleObserver``, which build also uses. A layer
(not per-step) whose static scales would round its inputs worse than per-token scales on the
calibration batches quantizes per token instead (``act_per_token``), so calibrating never
loses to the dynamic bundle it starts from. Memory stays O(channels) however many tokens are
seen. Scales files are sealed and written atomically by ``h5file``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .actquant import ACT_EPS, StaticScaleObserver, fake_quant, per_token_scale, qmax
from .crc import crc32
from .errors import ActScalesError, AlreadyCalibratedError, DuQuantError
from .flowsteps import steps_mismatch
from .h5file import SCALES_MAGIC, FileKind, SealedReader, SealedWriter
from .layer import DuQuantLinear
from .read_errors import translated
from .stats_observer import observing_eagerly

# 2: sealed; 1 (unsealed, each dataset with its crc32) is still read.
KIND = FileKind(SCALES_MAGIC, "duquant-packs-act-scales", 2, unsealed=(1,))
SCALES_FORMAT, SCALES_VERSION, SEAL_MAGIC = KIND.format, KIND.version, KIND.magic
ROWS_KEPT = 128  # rows per layer kept (spread over the batches) to choose per token or static
# A layer keeps its static scales only where they round the held-out rows with clearly less error
# (a fifth) than per-token scales: a near tie on a few kept rows does not carry to new inputs.
STATIC_MARGIN = 0.8


class _Observer:
    """Feeds the layer's transformed inputs of the first ``steps`` batches to the rule: one
    rule per denoising step for a per-step layer (the step its clock says is running)."""

    def __init__(self, layer: DuQuantLinear, steps: int, pct: float) -> None:
        self.steps = steps
        self.per_step = layer.step_table is not None
        rows = len(layer.step_table.times) if layer.step_table is not None else 1
        self.rules = [StaticScaleObserver(pct, layer.act_bits) for _ in range(rows)]
        self.check = None if self.per_step else _PerTokenCheck(steps, layer.act_bits)
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, layer: DuQuantLinear, args: tuple[torch.Tensor, ...]) -> None:
        rule = self.rules[0 if layer.step_table is None else layer.step_table.row(layer.bundle_name or "?")]
        if rule.batches < self.steps:
            with torch.no_grad():
                x_t = layer.rotate_input(args[0].detach())
                p = rule.observe(x_t)
                if self.check is not None:
                    self.check.add(x_t.reshape(-1, x_t.shape[-1]), p)

    def per_token_wins(self, layer: DuQuantLinear) -> bool:
        return self.check is not None and self.check.per_token_wins(layer)

    def unseen_step(self) -> int | None:
        """The first step (row) no batch reached, None when every one was."""
        return next((row for row, rule in enumerate(self.rules) if rule.batches == 0), None)

    def seen_steps(self) -> list[int]:
        """The steps (rows) some batch reached."""
        return [row for row, rule in enumerate(self.rules) if rule.batches]

    def result(self) -> torch.Tensor:
        """[in] scales, or [steps, in] for a per-step layer."""
        rows = [rule.scales() for rule in self.rules]
        return torch.stack(rows) if self.per_step else rows[0]  # type: ignore[arg-type,return-value]


class _PerTokenCheck:
    """Would the layer round its inputs better per token than with its static scales? Measured
    leave-one-batch-out, so clipping on inputs the scales were not taken from counts: each batch's
    kept rows rounded with the scales of the other batches (their largest percentile), against
    per-token scales, the errors weighted by the energy of the weight column each channel meets."""

    def __init__(self, steps: int, bits: int) -> None:
        self.bits, self.per_batch = bits, max(1, ROWS_KEPT // max(1, steps))
        self.rows: list[torch.Tensor] = []  # kept rows of each batch (CPU, float32)
        self.percentiles: list[torch.Tensor] = []  # each batch's per-channel percentile

    def add(self, x_t: torch.Tensor, percentile: torch.Tensor) -> None:
        kept = x_t[:: max(1, x_t.shape[0] // self.per_batch)][: self.per_batch]
        self.rows.append(kept.float().cpu())
        self.percentiles.append(percentile.float().cpu())

    def per_token_wins(self, layer: DuQuantLinear) -> bool:
        if len(self.rows) < 2:  # one batch: nothing held out to measure on
            return False
        with torch.no_grad():
            energy = layer.dequantized_weight(torch.float32).double().square().sum(0).cpu()
        seen = torch.stack(self.percentiles)
        static = token = 0.0
        for k, rows in enumerate(self.rows):
            others = torch.cat([seen[:k], seen[k + 1 :]]).amax(0)
            static += self._error(rows, (others / qmax(self.bits)).clamp_min(ACT_EPS), energy)
            token += self._error(rows, per_token_scale(rows, self.bits), energy)
        return not static < STATIC_MARGIN * token

    def _error(self, rows: torch.Tensor, scale: torch.Tensor, energy: torch.Tensor) -> float:
        return float((fake_quant(rows, scale, self.bits) - rows).double().square().sum(0) @ energy)


def static_layers(model: nn.Module) -> dict[str, DuQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear) and m.act_scale is not None}


@contextlib.contextmanager
def calibrate(
    model: nn.Module, steps: int | None = None, percentile: float | None = None, *, overwrite: bool = False
) -> Iterator[None]:
    """Run batches through ``model`` inside this block; on exit the static scales freeze.

    ``steps``/``percentile`` default to the bundle config's ``calib_steps`` and
    ``act_percentile``. Inside the block each layer's static scales are held back, so it
    quantizes activations per token as a layer without them does, and each layer is
    calibrated on the inputs it will see; a forward pre-hook observes them. Every static
    layer must have seen at least one batch, or the block raises and nothing is frozen.
    Layers that hold scales already (a bundle built with ``--calib``, ``act_scales=``, an
    earlier ``calibrate``) are refused with ``AlreadyCalibratedError`` unless ``overwrite``.
    """
    layers = static_layers(model)
    if not layers:
        raise DuQuantError(
            "calibrate(): the model has no DuQuantLinear layer with static activation scales "
            "(the bundle's quant.act_mode is not 'per_channel_static' or 'per_step_static', or act_bits is 0)"
        )
    held = [name for name, layer in layers.items() if layer.act_calibrated]
    if held and not overwrite:  # never replace scales the user may not know are there
        raise AlreadyCalibratedError(
            f"calibrate(): {len(held)} of {len(layers)} static layer(s) hold activation scales already (e.g. "
            f"{held[0]}: from a bundle built with --calib, act_scales= or an earlier calibrate()); pass "
            "calibrate(model, overwrite=True) to replace them"
        )
    observers, held_back = {}, {}
    for name, layer in layers.items():
        cfg_steps, cfg_pct = layer.calib_defaults
        observers[name] = _Observer(layer, steps or cfg_steps, percentile or cfg_pct)
        held_back[name], layer.act_scale = layer.act_scale, None
    try:
        with observing_eagerly():
            yield
        _check_every_step_seen(layers, observers)
        for name, layer in layers.items():
            layer.act_scale = held_back.pop(name)
            scales = observers[name].result()
            layer.set_act_scale(scales, per_token=observers[name].per_token_wins(layer))
    finally:
        for name, layer in layers.items():
            observers[name].handle.remove()
            if name in held_back:  # the block raised: the scales stay as they were
                layer.act_scale = held_back[name]


def _check_every_step_seen(layers: dict[str, DuQuantLinear], observers: dict[str, _Observer]) -> None:
    """Refuse to freeze when a static layer (or one step of a per-step layer) saw no batch."""
    unseen = {n: step for n, o in observers.items() if (step := o.unseen_step()) is not None}
    if not unseen:
        return
    name, step = next(iter(unseen.items()))
    table = layers[name].step_table
    at_step = "" if table is None else f" at denoising step {step} (flow time {table.times[step]:g})"
    why = "run inputs that reach every quantized layer" + (", at every denoising step" if at_step else "")
    if table is not None:  # a loop of fewer steps than the bundle's table is said as such
        why = steps_mismatch(observers[name].seen_steps(), table.steps, "this bundle", "build it with") or why
    raise DuQuantError(f"calibrate(): {len(unseen)} static layer(s) saw no batch{at_step} (e.g. {name}); {why}")


def save_act_scales(model: nn.Module, path: str | Path) -> Path:
    """Write the frozen static scales, bound to the bundle's fingerprint, atomically."""
    layers = static_layers(model)
    if not layers:
        raise DuQuantError("save_act_scales(): the model has no static-activation DuQuantLinear layer")
    uncalibrated = [n for n, m in layers.items() if not m.act_calibrated]
    if uncalibrated:
        raise DuQuantError(
            f"save_act_scales(): {len(uncalibrated)} layer(s) are not calibrated yet "
            f"(e.g. {uncalibrated[0]}); run `with calibrate(model): ...` first"
        )
    fingerprints = {m.bundle_fingerprint for m in layers.values()}
    if len(fingerprints) != 1 or None in fingerprints:
        raise DuQuantError("save_act_scales(): the static layers do not come from one loaded bundle")
    with SealedWriter(Path(path), KIND) as out:
        out.attrs({**KIND.stamp(), "bundle_fingerprint": fingerprints.pop()})
        out.group("scales")
        for layer in layers.values():
            data = layer.act_scale.detach().float().cpu().numpy()
            out.dataset(f"scales/{layer.bundle_name}", data)
            out.attrs({"crc32": crc32(data), "per_token": int(layer.act_per_token)}, f"scales/{layer.bundle_name}")
    return Path(path)


def apply_act_scales(layers: Mapping[str, DuQuantLinear], path: str | Path, fingerprint: str) -> None:
    """Load a scales file into prepared (not yet swapped) layers; refuse any other bundle's file."""
    path = Path(path)
    static = {t: m for t, m in layers.items() if m.act_scale is not None}
    with translated(path, "the activation scales", ActScalesError, "the file is damaged", "calibrate again"):
        if not path.is_file():
            raise ActScalesError(f"activation scales file not found: {path}")
        with SealedReader(path, KIND) as f:
            if not f.has_attr("format") or f.attr("format") != SCALES_FORMAT:
                raise ActScalesError(f"{path} is not a duquant activation-scales file", field="format")
            if int(f.attr("format_version")) not in KIND.unsealed and not f.sealed:
                raise ActScalesError(f"{path} has lost its seal; the file is damaged — calibrate again", field="format")
            theirs = str(f.attr("bundle_fingerprint"))
            if theirs != fingerprint:
                raise ActScalesError(
                    f"{path} holds activation scales calibrated for bundle {theirs[:12]}, not for "
                    f"this bundle {fingerprint[:12]}: recalibrate with this bundle",
                    field="bundle_fingerprint",
                )
            scales = {target: _read_scales(f, target, layer) for target, layer in static.items()}
    if not static:
        raise ActScalesError(
            f"act_scales={path} given, but the bundle's layers use no static activation scales", field="act_mode"
        )
    for target, (data, per_token) in scales.items():
        static[target].set_act_scale(torch.from_numpy(data), per_token=per_token)


def _read_scales(f: SealedReader, target: str, layer: DuQuantLinear) -> tuple[np.ndarray, bool]:
    """A layer's scales and whether calibration chose per-token scales for it (files before 0.9: no)."""
    at = f"scales/{layer.bundle_name}"
    node = f.node(at)
    if node is None:
        raise ActScalesError(f"{f.path} has no scales for layer {layer.bundle_name}", layer=target, field="scales")
    if node.shape != tuple(layer.act_scale.shape):
        raise ActScalesError(f"{f.path}: scales of layer {layer.bundle_name} are damaged", layer=target, field="scales")
    data = np.asarray(f.read(at), dtype=np.float32)
    if not f.sealed and int(f.attr("crc32", at)) != crc32(data):
        raise ActScalesError(f"{f.path}: scales of layer {layer.bundle_name} are damaged", layer=target, field="scales")
    return data, f.has_attr("per_token", at) and bool(int(f.attr("per_token", at)))
