"""The sealed container every file of the project is (bundles, statistics, activation scales):
the one module that touches HDF5. A file's kind (its seal's magic, ``format`` attribute and
version) is a :class:`FileKind`; everything else is the same for every kind.

* Writing (:class:`SealedWriter`): under a unique temp name (``atomic``), with a 512-byte
  HDF5 user block (which HDF5 skips) that holds the seal once closed — magic, length and
  crc32 of the rest — then fsynced and renamed over the target; removed on any failure.
* Reading (:class:`SealedReader`): the seal is checked before HDF5 parses a byte, so damage
  anywhere (metadata included, which could make libhdf5 spin or crash) is one sentence and a
  verified seal vouches for every dataset; the checked bytes can be kept, so nothing read from
  them needs checking again. Large files are checked in pieces on several threads.
* Attribute reads are bounded in size, so a damaged header cannot make HDF5 allocate
  gigabytes; callers read inside ``read_errors.translated``, so nothing from h5py escapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from .atomic import Pending
from .crc import crc32_combine
from .read_errors import NotHDF5Error, SealError, WrongKindError

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


@dataclass(frozen=True)
class FileKind:
    """One kind of sealed file: its seal's magic, its ``format`` attribute, the version this
    tool writes, and older versions read without a seal (their datasets carry crc32s)."""

    magic: bytes
    format: str
    version: int
    unsealed: tuple[int, ...] = ()

    def stamp(self) -> dict[str, Any]:
        """The root attributes that name the kind and version."""
        return {"format": self.format, "format_version": self.version}


def create(path: Path) -> h5py.File:
    """A new HDF5 file with room for the seal (write it with ``seal`` once closed)."""
    return h5py.File(path, "w", libver=LIBVER, userblock_size=USERBLOCK)


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


class SealedWriter:
    """A file of one kind being written: datasets, groups and attributes by path, then
    ``seal`` (closed, crc32 of every byte) and, leaving the ``with`` block, renamed over
    ``target``; a failure anywhere removes the temp file."""

    def __init__(self, target: Path, kind: FileKind) -> None:
        self.kind, self.pending, self.sealed = kind, Pending(Path(target)), False
        try:
            self._f = create(self.pending.tmp)
        except BaseException:
            self.pending.discard()
            raise

    def __enter__(self) -> SealedWriter:
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is None:
            self.seal()
            self.pending.commit()
        else:
            with contextlib.suppress(Exception):  # closing after a failure
                self._f.close()
            self.pending.discard()

    def attrs(self, values: Mapping[str, Any], at: str = "/") -> None:
        """Set attributes in this order (the order they are laid out in the file)."""
        obj = self._f[at]
        for key, value in values.items():
            obj.attrs[key] = value

    def group(self, at: str, *, exist_ok: bool = False) -> None:
        _ = self._f.require_group(at) if exist_ok else self._f.create_group(at)

    def dataset(self, at: str, data: np.ndarray) -> int | None:
        """Store an array; its byte offset in the file (None without contiguous storage)."""
        return self._f.create_dataset(at, data=data).id.get_offset()

    def link(self, at: str, target: str) -> int | None:
        """A hard link to a stored dataset: read like its own, stored once; its offset."""
        self._f[at] = ds = self._f[target]
        return ds.id.get_offset()

    def seal(self) -> None:
        """Close the file and write its seal (once; ``__exit__`` does it when not done)."""
        if not self.sealed:
            self._f.close()
            seal(self.pending.tmp, self.kind.magic)
            self.sealed = True


class Node(NamedTuple):
    """Where one dataset's values are: shape, dtype, its byte offset in the file (None when
    not stored contiguously) and its path, to read it through HDF5."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None
    path: str | None = None


class SealedReader:
    """A file of one kind, open read-only, its seal checked first. ``keep``: the checked bytes
    are kept in ``bytes``; ``check=False`` skips the seal (a build's workers, once the build
    has checked it), so ``sealed`` is False and datasets must be checked by their crc32."""

    def __init__(self, path: Path, kind: FileKind, *, keep: bool = False, check: bool = True) -> None:
        self.path, self.kind, self.bytes = path, kind, None
        if keep:
            self.bytes = read_sealed(path, kind.magic)
            self.sealed = self.bytes is not None
        else:
            self.sealed = check_seal(path, kind.magic) if check else False
        if not h5py.is_hdf5(path):
            raise NotHDF5Error("it holds no HDF5 data")
        self._f = h5py.File(path, "r")

    def __enter__(self) -> SealedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.bytes = None
        with contextlib.suppress(Exception):
            self._f.close()

    def has_attr(self, key: str, at: str = "/") -> bool:
        return key in self._f[at].attrs

    def attr(self, key: str, at: str = "/") -> Any:
        return read_attr(self._f[at], key)

    def json(self, key: str, at: str = "/", kind: type = dict) -> Any:
        return json_attr(self._f[at], key, kind)

    def is_group(self, at: str) -> bool:
        return isinstance(self._f.get(at), h5py.Group)

    def names(self, at: str) -> list[str]:
        """The names in a group, sorted."""
        return sorted(self._f[at].keys())

    def node(self, at: str) -> Node | None:
        """A dataset's place; None when nothing, or no dataset, is at ``at``."""
        ds = self._f.get(at)
        return Node(ds.shape, ds.dtype, ds.id.get_offset(), at) if isinstance(ds, h5py.Dataset) else None

    def read(self, at: str) -> np.ndarray:
        return self._f[at][()]

    def stored_at(self, at: str) -> tuple[int, int]:
        """A dataset's object address (one per stored array) and how many links it has."""
        info = h5py.h5o.get_info(self._f[at].id)
        return int(info.addr), int(info.rc)
