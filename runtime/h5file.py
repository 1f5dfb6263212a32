"""Every HDF5 file the project writes (bundles, statistics, activation scales), one way.

* ``atomic_file``: written under a unique temp name beside the target (so concurrent
  writers never collide), fsynced, renamed over the target, and removed on any failure.
* A seal: files are created with a 512-byte HDF5 user block (which HDF5 skips) holding a
  magic, the length and the crc32 of the rest of the file. ``check_seal`` reads it before
  HDF5 parses a byte, so damage anywhere (metadata included, which could make libhdf5
  spin or crash) is one error sentence, and a verified seal vouches for every dataset.
  ``read_sealed`` does the same and keeps the bytes it checked. Large files are checked in
  pieces on several threads, their crcs combined (``crc32_combine``).
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
from concurrent.futures import ThreadPoolExecutor
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
SEAL_PIECE_MIN = 64 << 20  # files under twice this are checked in one thread
SEAL_MAX_THREADS = 8
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# The sealed files this project writes, by their magic (16 bytes: kind, format version):
# a file of one kind opened as another is told what it is, not that it is damaged.
BUNDLE_MAGIC = b"duquant-bundle\x00\x02"
STATS_MAGIC = b"duquant-stats\x00\x00\x02"
SCALES_MAGIC = b"duquant-scales\x00\x02"
KINDS = {
    BUNDLE_MAGIC: "a bundle (written by `duquant-packs build`)",
    STATS_MAGIC: "a statistics file (written by `capture_stats`, read by `build --calib`)",
    SCALES_MAGIC: "an activation-scales file (written by `calibrate`)",
}
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


class SealError(Exception):
    """The seal does not match the bytes (message: what is wrong, without the fix)."""


class WrongKindError(SealError):
    """The file carries the seal of another of our kinds (message: what it is; no fix to
    suggest but passing the right file)."""


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """crc32 of A+B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine, which Python's
    zlib does not expose): crc1 is advanced over len2 zero bytes by squaring the GF(2)
    operator of one zero bit, ~2.5 ms here for lengths of gigabytes."""

    def times(matrix: list[int], vector: int) -> int:
        total, row = 0, 0
        while vector:
            if vector & 1:
                total ^= matrix[row]
            vector >>= 1
            row += 1
        return total

    def square(matrix: list[int]) -> list[int]:
        return [times(matrix, column) for column in matrix]

    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]  # one zero bit
    odd = square(square(odd))  # four zero bits; the loop starts at one zero byte
    while len2:
        even = square(odd)
        if len2 & 1:
            crc1 = times(even, crc1)
        len2 >>= 1
        odd, even = even, odd
    return crc1 ^ crc2


def _piece_crc(path: Path, lo: int, hi: int, into: np.ndarray | None) -> int:
    """crc32 of the file's bytes [lo, hi), copied into ``into[lo:hi]`` when given. Each chunk
    is checked right after it is read, while it is still in cache."""
    scratch = None if into is not None else bytearray(min(SEAL_CHUNK, hi - lo))
    crc, pos = 0, lo
    with open(path, "rb", buffering=0) as fh:
        fh.seek(lo)
        while pos < hi:
            n = min(SEAL_CHUNK, hi - pos)
            view = memoryview(into)[pos : pos + n] if into is not None else memoryview(scratch)[:n]
            got = fh.readinto(view)
            if not got:
                raise SealError("the file shrank while it was read; it is being written or replaced")
            crc = zlib.crc32(view[:got], crc)
            pos += got
    return crc


def _file_crc(path: Path, lo: int, hi: int, into: np.ndarray | None = None) -> int:
    """crc32 of the file's bytes [lo, hi), split over threads for large files: zlib's crc32
    and file reads release the GIL, so pieces run on all cores (2.2x on 1.3 GB here)."""
    pieces = max(1, min(os.cpu_count() or 1, SEAL_MAX_THREADS, (hi - lo) // SEAL_PIECE_MIN))
    bounds = [lo + (hi - lo) * i // pieces for i in range(pieces + 1)]
    if pieces == 1:
        return _piece_crc(path, lo, hi, into)
    with ThreadPoolExecutor(pieces) as pool:
        crcs = list(pool.map(lambda i: _piece_crc(path, bounds[i], bounds[i + 1], into), range(pieces)))
    crc = crcs[0]
    for i in range(1, pieces):
        crc = crc32_combine(crc, crcs[i], bounds[i + 1] - bounds[i])
    return crc


def seal(path: Path, magic: bytes) -> None:
    """Write the seal of a closed file made by ``create``."""
    size = path.stat().st_size
    crc = _file_crc(path, USERBLOCK, size)
    with open(path, "r+b") as fh:
        fh.write(SEAL.pack(magic, size - USERBLOCK, crc))


def _check(path: Path, magic: bytes, keep: bool) -> np.ndarray | bool:
    """False without a seal; else the seal checked (raising SealError on a mismatch) and
    True, or with ``keep`` the file's bytes."""
    with open(path, "rb") as fh:
        head = fh.read(USERBLOCK + len(HDF5_SIGNATURE))
        size = os.fstat(fh.fileno()).st_size
    if len(head) < SEAL.size or not head.startswith(magic):
        found = KINDS.get(head[: len(magic)])
        if found is not None and magic in KINDS:
            raise WrongKindError(f"this is {found}, not {KINDS[magic]}")
        if head[USERBLOCK:] == HDF5_SIGNATURE:  # a user block without our seal
            raise SealError("the file's seal is damaged, so its contents cannot be trusted")
        return False
    _, length, want = SEAL.unpack(head[: SEAL.size])
    if size - USERBLOCK != length:
        how = "it is truncated" if size < length + USERBLOCK else "bytes were appended to it"
        raise SealError(f"the file holds {size} bytes, its seal says {length + USERBLOCK}: {how}")
    data = np.empty(size, dtype=np.uint8) if keep else None
    crc = _file_crc(path, USERBLOCK, size, data)
    if crc != want:
        raise SealError(f"the file fails its checksum (crc32 {crc:08x}, sealed {want:08x}); it is damaged")
    if data is None:
        return True
    data[:USERBLOCK] = np.frombuffer(head[:USERBLOCK], dtype=np.uint8)
    return data


def check_seal(path: Path, magic: bytes) -> bool:
    """True when the file carries a valid seal, False when it has none (an older unsealed
    file, or not ours); raises SealError when the seal does not match the bytes."""
    return _check(path, magic, keep=False) is True


def read_sealed(path: Path, magic: bytes) -> np.ndarray | None:
    """The whole file as uint8 when it carries a valid seal (read once: the bytes checked are
    the bytes kept, so nothing read from them later needs checking again), None when it has
    none; raises SealError when the seal does not match the bytes."""
    data = _check(path, magic, keep=True)
    return data if isinstance(data, np.ndarray) else None


def read_attr(obj: h5py.Group | h5py.Dataset, key: str) -> Any:
    """An attribute's value (bytes decoded), refused when it claims an implausible size."""
    aid = h5py.h5a.open(obj.id, key.encode())
    # HDF5 sizes an attribute as elements x element size (an empty one raises here), so the byte
    # bound also bounds the element count.
    size = aid.get_storage_size()
    if size > MAX_ATTR_BYTES:
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
    except WrongKindError as exc:
        where = {"field": "file"} if issubclass(error, BundleError) else {}
        raise error(f"{path}: {exc}", **where) from None
    except SealError as exc:
        where = {"field": "file"} if issubclass(error, BundleError) else {}
        raise error(f"{path}: {exc} — {fix}", **where) from None
    except READ_FAILURES as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: cannot read {what} ({detail}); {damaged} — {fix}") from None
