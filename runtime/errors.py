"""Dedicated exceptions: every refusal names what differs, never a raw h5py/KeyError."""

from __future__ import annotations


class DuQuantError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(DuQuantError, ValueError):
    """A config (preset, TOML file or environment override) is invalid."""


class SelectionError(ConfigError):
    """A config selects no layer, or names layers the checkpoint or model lacks."""


class BundleError(DuQuantError):
    """A bundle cannot be used. ``layer`` and ``field`` name what is wrong, when known."""

    def __init__(self, message: str, *, layer: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.field = field


class BundleReadError(BundleError):
    """The file is missing, is not a duquant bundle, or is damaged (truncated, bad checksum)."""


class BundleVersionError(BundleError):
    """The bundle's format version is not one this runtime reads."""


class ConfigMismatchError(BundleError):
    """The bundle was built for another configuration than the one expected."""


class CheckpointMismatchError(BundleError):
    """The bundle was built from other weights than the live model's (or the checkpoint given)."""


class ModelMismatchError(BundleError):
    """A bundle layer is missing from the model, or has another shape or type there."""


class TiedWeightsError(ModelMismatchError):
    """A quantized embedding's table is also another module's weight (a tied output head), and
    the load was not allowed to make that module read the codes."""


class ActScalesError(BundleError):
    """An activation-scales file is unreadable or belongs to another bundle."""


class NotCalibratedError(DuQuantError, RuntimeError):
    """A static-activation layer was run before its scales were calibrated or loaded. ``layer``
    names it (its name in the bundle), when known."""

    def __init__(self, message: str, *, layer: str | None = None) -> None:
        super().__init__(message)
        self.layer = layer


class AlreadyCalibratedError(DuQuantError, RuntimeError):
    """``calibrate()`` was asked to replace activation scales the layers hold already (from a
    ``--calib`` build, ``act_scales=``, or an earlier calibration) without ``overwrite=True``."""


class StepError(DuQuantError, RuntimeError):
    """A layer with per-step activation scales cannot tell which denoising step is running.
    ``layer`` names it; ``step`` is the step index or flow time at fault (None when no step is set)."""

    def __init__(self, message: str, *, layer: str | None = None, step: float | int | None = None) -> None:
        super().__init__(message)
        self.layer = layer
        self.step = step


class NoStepError(StepError):
    """A per-step layer ran outside any denoising step (the model is not instrumented, or the
    layer ran outside the instrumented method)."""


class UnknownFlowTimeError(StepError):
    """The flow time a denoising step was called with is none of the table's times."""


class StepOutOfTableError(StepError):
    """A step index beyond the rows of a layer's per-step table."""


class StatsError(DuQuantError, ValueError):
    """A calibration statistics file is missing, damaged, or does not fit the checkpoint."""


class NothingLoadedWarning(UserWarning):
    """``enable_from_env`` found no bundle to load: the model stays unquantized. Silence it
    with ``warnings.filterwarnings("ignore", category=NothingLoadedWarning)`` where running
    unquantized is intended."""
