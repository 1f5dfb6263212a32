"""Every HDF5 file the project writes (bundles, statistics, activation scales), one way.

* ``atomic_file``: written under a unique temp name beside the target (so concurrent
  writers never collide), fsynced, renamed over the target, and removed on any failure.
* A seal: files are created with a 512-byte HDF5 user block (which HDF5 skips) holding a
  magic, the length and the crc32 of the rest of the file. ``check_seal`` reads it before
  HDF5 parses a byte, so damage anywhere (metadata included, which could make libhdf5
  spin or crash) is one error sentence, and a verified seal vouches for every dataset.
* ``read_attr``: attribute reads bounded in size, so a damaged header cannot make HDF5
  allocate gigabytes; ``json_attr``: a JSON attribute decoded and type-checked.
* ``translated``: any low-level failure while reading is one sentence of the caller's
  error class; nothing from h5py escapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import BundleError

# HDF5's v110 file format checksums every metadata block (superblock, object headers,
# attribute heaps), so a damaged header is reported as an error instead of being parsed.
# Readable by HDF5 >= 1.10 (h5py >= 2.8).
LIBVER = ("v110", "latest")
USERBLOCK = 512  # HDF5 user block (a power of two >= 512): the seal lives here
SEAL = struct.Struct("<16sQI")  # magic, length of the HDF5 part, its crc32
SEAL_CHUNK = 16 << 20
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# No legitimate attribute comes near this; a damaged header can claim gigabytes.
MAX_ATTR_BYTES = 64 << 20
READ_FAILURES = (
    OSError,
    KeyError,
    ValueError,
    TypeError,
    RuntimeError,
    AttributeError,
    IndexError,
    OverflowError,
    UnicodeDecodeError,
)


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def temp_name(path: Path) -> Path:
    """A temp file beside ``path``, unique per process and call: ``.<name>.<pid>.<hex>.tmp``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def temp_owner(tmp: Path) -> int | None:
    """The pid in a name made by ``temp_name`` (None for any other name)."""
    parts = tmp.name.split(".")
    return int(parts[-3]) if len(parts) >= 5 and parts[-1] == "tmp" and parts[-3].isdigit() else None


def _fsync_dir(directory: Path) -> None:
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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Pending]:
    """Write ``pending.tmp``; on success it is fsynced and renamed to ``pending.target``
    (readers see the old file or the whole new one), on any failure (Ctrl-C included) removed."""
    pending = Pending(Path(path))
    try:
        yield pending
        with open(pending.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(pending.tmp, pending.target)
        _fsync_dir(pending.target.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            pending.tmp.unlink(missing_ok=True)
        raise


def create(path: Path) -> h5py.File:
    """A new HDF5 file with room for the seal (write it with ``seal`` once closed)."""
    return h5py.File(path, "w", libver=LIBVER, userblock_size=USERBLOCK)


def _crc_of_file(fh: Any, start: int) -> tuple[int, int]:
    """(crc32, byte count) of a file from ``start`` to its end, in bounded chunks."""
    fh.seek(start)
    crc, n = 0, 0
    while chunk := fh.read(SEAL_CHUNK):
        crc = zlib.crc32(chunk, crc)
        n += len(chunk)
    return crc, n


def seal(path: Path, magic: bytes) -> None:
    """Write the seal of a closed file made by ``create``."""
    with open(path, "r+b") as fh:
        crc, n = _crc_of_file(fh, USERBLOCK)
        fh.seek(0)
        fh.write(SEAL.pack(magic, n, crc))


class SealError(Exception):
    """The seal does not match the bytes (message: what is wrong, without the fix)."""


def check_seal(path: Path, magic: bytes) -> bool:
    """True when the file carries a valid seal, False when it has none (an older unsealed
    file, or not ours); raises SealError when the seal does not match the bytes."""
    with open(path, "rb") as fh:
        head = fh.read(SEAL.size)
        if len(head) < SEAL.size or not head.startswith(magic):
            fh.seek(USERBLOCK)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:  # a user block without our seal
                raise SealError("the file's seal is damaged, so its contents cannot be trusted")
            return False
        _, length, want = SEAL.unpack(head)
        crc, n = _crc_of_file(fh, USERBLOCK)
    if n != length:
        raise SealError(f"the file holds {n + USERBLOCK} bytes, its seal says {length + USERBLOCK}: it is truncated")
    if crc != want:
        raise SealError(f"the file fails its checksum (crc32 {crc:08x}, sealed {want:08x}); it is damaged")
    return True


def read_attr(obj: h5py.Group | h5py.Dataset, key: str) -> Any:
    """An attribute's value (bytes decoded), refused when it claims an implausible size."""
    aid = h5py.h5a.open(obj.id, key.encode())
    size = aid.get_storage_size()
    if size > MAX_ATTR_BYTES or (aid.shape is not None and int(np.prod(aid.shape)) > MAX_ATTR_BYTES):
        raise ValueError(f"attribute {key!r} claims {size} bytes")
    value = obj.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def json_attr(obj: h5py.Group | h5py.Dataset, key: str, kind: type = dict) -> Any:
    """A JSON attribute, decoded and checked to be a ``kind``."""
    value = json.loads(str(read_attr(obj, key)))
    if not isinstance(value, kind):
        raise ValueError(f"attribute {key!r} is not a JSON {kind.__name__}")
    return value


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
    except SealError as exc:
        where = {"field": "file"} if issubclass(error, BundleError) else {}
        raise error(f"{path}: {exc} — {fix}", **where) from None
    except READ_FAILURES as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: cannot read {what} ({detail}); {damaged} — {fix}") from None
