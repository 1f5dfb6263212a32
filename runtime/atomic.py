"""Atomic writes: a file is written under a unique temp name beside its target (so concurrent
writers never collide), fsynced, and renamed over the target; on any failure it is removed.
Readers see the old file or the whole new one, never a part."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """A temp file beside ``path``, unique per process and call: ``.<name>.<pid>.<hex>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temp_owner(tmp: Path) -> int | None:
    """The pid in a name made by ``temp_name`` (None for any other name)."""
    parts = tmp.name.split(".")
    return int(parts[-3]) if len(parts) >= 5 and parts[-1] == "tmp" and parts[-3].isdigit() else None


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the file system allows it."""
    with contextlib.suppress(OSError):  # not every file system can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Pending:
    """A file being written: ``tmp`` is where, ``target`` where it goes on success (the
    writer may change it before the end: a bundle's name holds its fingerprint)."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.tmp = temp_name(target)

    def commit(self) -> None:
        """fsync the temp file and rename it over the target, durably."""
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.target)
        fsync_dir(self.target.parent)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Pending]:
    """Write ``pending.tmp``; on success it is fsynced and renamed to ``pending.target``
    (readers see the old file or the whole new one), on any failure (Ctrl-C included) removed."""
    pending = Pending(Path(path))
    try:
        yield pending
        pending.commit()
    except BaseException:
        pending.discard()
        raise
