"""The ``duquant-packs`` command: the CLI, or one sentence when the build extra is missing.

The script is installed with the core package (the runtime), whose environments may lack
the pipeline's dependencies; they get the install line instead of an ImportError traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as cli
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in ("click", "joblib", "tqdm", "safetensors", "numba"):
            raise
        sys.stderr.write(
            f"duquant-packs needs the build extra ({missing} is not installed): pip install 'duquant-packs[build]'\n"
        )
        sys.exit(2)
    cli()
