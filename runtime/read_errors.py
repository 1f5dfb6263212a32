"""How a failure to read one of our files is said: the seal's errors, and ``translated``,
which turns any low-level failure (h5py's included) into one sentence of the caller's error
class, naming the file and the fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from .errors import BundleError

# What h5py, json and numpy raise on a damaged file (UnicodeDecodeError is a ValueError,
# KeyError and IndexError are LookupErrors).
READ_FAILURES = (OSError, LookupError, ValueError, TypeError, RuntimeError, AttributeError, OverflowError)


class SealError(Exception):
    """The seal does not match the bytes (message: what is wrong, without the fix)."""


class WrongKindError(SealError):
    """The file carries the seal of another of our kinds (message: what it is; no fix to
    suggest but passing the right file)."""


class NotHDF5Error(ValueError):
    """The file holds no HDF5 at all (so none of our kinds)."""


@contextlib.contextmanager
def translated(
    path: Path, what: str, error: type[Exception], damaged: str, fix: str, passthrough: tuple = ()
) -> Iterator[None]:
    """Any low-level failure inside the block becomes ``error("<path>: cannot read <what>
    (<detail>); <damaged> — <fix>")``; ``error`` itself and ``passthrough`` classes go through."""
    try:
        yield
    except (error, *passthrough):
        raise
    except WrongKindError as exc:
        where = {"field": "file"} if issubclass(error, BundleError) else {}
        raise error(f"{path}: {exc}", **where) from None
    except SealError as exc:
        where = {"field": "file"} if issubclass(error, BundleError) else {}
        raise error(f"{path}: {exc} — {fix}", **where) from None
    except READ_FAILURES as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: cannot read {what} ({detail}); {damaged} — {fix}") from None
