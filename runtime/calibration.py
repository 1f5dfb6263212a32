"""Static activation scales: an explicit calibration step, saved and reloaded by fingerprint.

Semantics follow the seed: per input channel of the transformed basis, the
``act_percentile`` of |x| over ``calib_steps`` batches, scale = p / qmax. Each batch's
per-channel percentile (linear interpolation, as torch.quantile) is averaged over the
batches, so memory stays O(channels) however many tokens are seen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn

from .bundle import HDF5_LIBVER, crc32
from .errors import ActScalesError, DuQuantError
from .layer import DuQuantLinear
from .packing import qmax

SCALES_FORMAT = "duquant-packs-act-scales"
SCALES_VERSION = 1


def percentile_per_channel(x2d: torch.Tensor, pct: float) -> torch.Tensor:
    """torch.quantile(x2d, pct/100, dim=0) with linear interpolation, for any size."""
    values = x2d.sort(dim=0).values
    pos = (pct / 100.0) * (values.shape[0] - 1)
    lo, hi = int(pos), min(int(pos) + 1, values.shape[0] - 1)
    frac = pos - lo
    return values[lo] + (values[hi] - values[lo]) * frac


class _Observer:
    def __init__(self, layer: DuQuantLinear, steps: int, pct: float) -> None:
        self.steps, self.pct = steps, pct
        self.total: torch.Tensor | None = None
        self.batches = 0
        self.handle = layer.register_forward_pre_hook(self._hook)

    def _hook(self, layer: DuQuantLinear, args: tuple[torch.Tensor, ...]) -> None:
        if self.batches >= self.steps:
            return
        with torch.no_grad():
            x_t = layer.rotate_input(args[0].detach())
            p = percentile_per_channel(x_t.float().abs().reshape(-1, layer.in_features), self.pct)
        self.total = p if self.total is None else self.total + p
        self.batches += 1

    def result(self) -> torch.Tensor | None:
        return None if self.total is None else self.total / self.batches


def static_layers(model: nn.Module) -> dict[str, DuQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear) and m.act_scale is not None}


@contextlib.contextmanager
def calibrate(model: nn.Module, steps: int | None = None, percentile: float | None = None) -> Iterator[None]:
    """Run batches through ``model`` inside this block; on exit the static scales freeze.

    ``steps``/``percentile`` default to the bundle config's ``calib_steps`` and
    ``act_percentile``. While calibrating, layers quantize activations per token, so
    each layer is calibrated on the inputs it will see. Every static layer must have
    seen at least one batch, or the block raises and nothing is frozen.
    """
    layers = static_layers(model)
    if not layers:
        raise DuQuantError(
            "calibrate(): the model has no DuQuantLinear layer with static activation scales "
            "(the bundle's quant.act_mode is not 'per_channel_static', or act_bits is 0)"
        )
    observers = {}
    for name, layer in layers.items():
        cfg_steps, cfg_pct = getattr(layer, "calib_defaults", (32, 99.9))
        observers[name] = _Observer(layer, steps or cfg_steps, percentile or cfg_pct)
        layer.calibrating = True
    try:
        yield
        unseen = [n for n, o in observers.items() if o.result() is None]
        if unseen:
            raise DuQuantError(
                f"calibrate(): {len(unseen)} static layer(s) saw no batch (e.g. {unseen[0]}); "
                "run inputs that reach every quantized layer"
            )
        for name, layer in layers.items():
            layer.set_act_scale(observers[name].result() / qmax(layer.act_bits))  # type: ignore[operator]
    finally:
        for name, layer in layers.items():
            observers[name].handle.remove()
            layer.calibrating = False


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
    fingerprints = {getattr(m, "bundle_fingerprint", None) for m in layers.values()}
    if len(fingerprints) != 1 or None in fingerprints:
        raise DuQuantError("save_act_scales(): the static layers do not come from one loaded bundle")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w", libver=HDF5_LIBVER) as f:
            f.attrs["format"] = SCALES_FORMAT
            f.attrs["format_version"] = SCALES_VERSION
            f.attrs["bundle_fingerprint"] = fingerprints.pop()
            g = f.create_group("scales")
            for layer in layers.values():
                data = layer.act_scale.detach().float().cpu().numpy()
                ds = g.create_dataset(layer.bundle_name, data=data)
                ds.attrs["crc32"] = crc32(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def apply_act_scales(layers: Mapping[str, DuQuantLinear], path: str | Path, fingerprint: str) -> None:
    """Load a scales file into prepared (not yet swapped) layers; refuse any other bundle's file."""
    path = Path(path)
    static = {t: m for t, m in layers.items() if m.act_scale is not None}
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != SCALES_FORMAT:
                raise ActScalesError(f"{path} is not a duquant activation-scales file", field="format")
            theirs = str(f.attrs.get("bundle_fingerprint"))
            if theirs != fingerprint:
                raise ActScalesError(
                    f"{path} holds activation scales calibrated for bundle {theirs[:12]}, not for "
                    f"this bundle {fingerprint[:12]}: recalibrate with this bundle",
                    field="bundle_fingerprint",
                )
            scales = {}
            for target, layer in static.items():
                key = f"scales/{layer.bundle_name}"
                if key not in f:
                    raise ActScalesError(
                        f"{path} has no scales for layer {layer.bundle_name}", layer=target, field="scales"
                    )
                data = np.asarray(f[key][()], dtype=np.float32)
                if data.shape != (layer.in_features,) or int(f[key].attrs["crc32"]) != crc32(data):
                    raise ActScalesError(
                        f"{path}: scales of layer {layer.bundle_name} are damaged", layer=target, field="scales"
                    )
                scales[target] = data
    except ActScalesError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ActScalesError(f"cannot read activation scales {path} ({exc})") from None
    if not static:
        raise ActScalesError(
            f"act_scales={path} given, but the bundle's layers use no static activation scales", field="act_mode"
        )
    for target, data in scales.items():
        static[target].set_act_scale(torch.from_numpy(data))
