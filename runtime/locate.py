"""Where the bundle is when a folder is given: the build's layout is
``<out>/<config>/<config>-<fp12>.h5``, so a user passes either folder as often as the file."""

from __future__ import annotations

from pathlib import Path

from .errors import BundleReadError
from .h5file import BUNDLE_MAGIC

SHOWN = 5  # bundles listed when a folder holds several


def _is_bundle(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(BUNDLE_MAGIC)) == BUNDLE_MAGIC
    except OSError:
        return False


def locate_bundle(path: str | Path) -> Path:
    """``path`` itself when it is a file; in a folder (or its config sub-folders), its one
    bundle. A folder with several or none is refused, listing what it holds."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise BundleReadError(f"bundle not found: {path}")
    found = sorted(p for p in [*path.glob("*.h5"), *path.glob("*/*.h5")] if p.is_file() and _is_bundle(p))
    if len(found) == 1:
        return found[0]
    if not found:
        raise BundleReadError(
            f"{path} is a directory holding no bundle: build one with `duquant-packs build --out {path}`, "
            "or pass the bundle file"
        )
    listed = ", ".join(str(p) for p in found[:SHOWN]) + (
        f" and {len(found) - SHOWN} more" if len(found) > SHOWN else ""
    )
    raise BundleReadError(f"{path} is a directory holding {len(found)} bundles ({listed}): pass one of them")
