"""duquant_runtime: load a DuQuant W4A8 bundle onto a live PyTorch model, no preprocessing.

Imports only torch, numpy and h5py (and the standard library), never the pipeline.
"""

__version__ = "0.1.0"
