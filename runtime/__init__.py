"""duquant_runtime: load a DuQuant W4A8 bundle onto a live PyTorch model, no preprocessing.

Imports only torch, numpy and h5py (and the standard library), never the pipeline::

    from duquant_runtime import load_bundle
    report = load_bundle(policy.model, "artifacts/llm_w4a8/llm_w4a8-<fp12>.h5", expect_config="llm_w4a8")

Names are imported lazily, so tools that only need the bundle format (the pipeline's
CLI) do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.10.0"

_EXPORTS = {
    "calibrate": "calibration",
    "save_act_scales": "calibration",
    "capture_stats": "stats",
    "DuQuantConfig": "config",
    "DuQuantLinear": "layer",
    "QuantEmbedding": "embedding",
    "TiedHead": "embedding",
    "LoadReport": "load_report",
    "enable_from_env": "env_load",
    "load_bundle": "loader",
    "instrument": "denoise_wrapper",
    "flow_step": "flowsteps",
    "attach_clock": "flowsteps",
    "StepClock": "flowsteps",
    **{
        name: "errors"
        for name in (
            "ActScalesError",
            "AlreadyCalibratedError",
            "BundleError",
            "BundleReadError",
            "BundleVersionError",
            "CheckpointMismatchError",
            "ConfigError",
            "ConfigMismatchError",
            "DuQuantError",
            "ModelMismatchError",
            "NoStepError",
            "NotCalibratedError",
            "NothingLoadedWarning",
            "StatsError",
            "StepError",
            "StepOutOfTableError",
            "TiedWeightsError",
            "UnknownFlowTimeError",
        )
    },
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
