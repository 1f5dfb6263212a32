"""duquant_pipeline: offline build of fingerprinted DuQuant pack bundles from safetensors checkpoints."""

from duquant_runtime import __version__

__all__ = ["__version__"]
