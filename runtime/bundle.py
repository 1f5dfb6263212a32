"""The bundle format (HDF5), defined once: the pipeline writes with it, the runtime reads.

Layout (format_version 2; format 1 is the same without ``in_scale``, with ``r_in`` always
present, and is still read)::

    /                   attrs: format, format_version, fingerprint, fingerprint_json,
                               config_json, provenance_json, tool_version, created_at
    /layers/<module>    attr meta (JSON): in_features, out_features, weight_bits, storage,
                               block_size, block_out_size, source_dtype,
                               source_sum, source_sumsq (float64 signature of the weight),
                               crc32 {dataset: crc32 of its bytes},
                               choice (the candidate transform build kept, e.g.
                               "hadamard+eq1.0", "rtn"), quality (its measured SQNR)
        in_scale  float32 [in]              (per-channel equalization x·in_scale, applied
                                             first; absent when the layer has none)
        perm      int32  [in]               (absent when permute is off)
        r_in      float32 [n_in_blocks, B, B]   (absent: no rotation; last block identity-padded;
                                             rows carry the smoothing 1/s of a format-1 build)
        perm2     int32  [in]               (duquant: zigzag between its two rotations)
        r_in2     float32 [n_in_blocks, B, B]   (duquant: the second rotation)
        r_out     float32 [n_out_blocks, Bo, Bo] (absent when row_rot is off)
        qweight   uint8 [out, ceil(in/2)] (int4x2) or int8 [out, in]
        w_scale   float32 [out]
        bias      float32 [out]          (absent when the layer has none)
        act_scale float32 [in]           (static activation scales, from build --calib)
    every dataset's crc32 is checked on read. ``quality`` holds weight_sqnr_db (the error
    of the effective weight in the original basis), output_sqnr_db when built with
    calibration statistics, and rtn_* figures of plain round-to-nearest for comparison.

Format 2 files are sealed: the first ``USERBLOCK`` bytes (an HDF5 user block, which HDF5
skips) hold a magic, the length and the crc32 of the rest of the file. The reader checks the
seal before HDF5 parses a single byte, so damage anywhere (metadata included, which could
make libhdf5 spin or crash) is one ``BundleReadError``; a verified seal also vouches for
every dataset, so per-dataset checksums are not recomputed on load.

Every h5py failure is translated into :class:`BundleReadError`; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import BundleReadError, BundleVersionError
from .fingerprint import FORMAT_VERSION, digest
from .packing import INT4, INT8

FORMAT_NAME = "duquant-packs-bundle"
# HDF5's v110 file format checksums every metadata block (superblock, object headers,
# attribute heaps), so a damaged header is reported as an error instead of being parsed
# (a fuzzed v0 file could segfault libhdf5). Readable by HDF5 >= 1.10 (h5py >= 2.8).
HDF5_LIBVER = ("v110", "latest")
LAYERS = "layers"
USERBLOCK = 512  # HDF5 user block (a power of two >= 512): the seal lives here
SEAL_MAGIC = b"duquant-bundle\x00\x02"  # 16 bytes
SEAL = struct.Struct("<16sQI")  # magic, length of the HDF5 part, its crc32
SEAL_CHUNK = 16 << 20
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
DATASETS = ("in_scale", "perm", "r_in", "perm2", "r_in2", "r_out", "qweight", "w_scale", "bias", "act_scale")
# Which tool release first wrote each format version (for "built by X" messages).
FORMAT_WRITERS = {1: "0.1", 2: "0.2"}
# Format 2 adds in_scale and makes r_in optional: a format-1 reader would ignore in_scale and
# compute wrong numbers, so the version is bumped and this reader reads both.
READABLE_FORMATS = (1, 2)


@dataclass
class LayerPack:
    """Everything the runtime needs for one layer; produced offline, stored as-is."""

    name: str
    in_features: int
    out_features: int
    weight_bits: int
    storage: str
    block_size: int
    block_out_size: int
    perm: np.ndarray | None
    r_in: np.ndarray | None
    r_out: np.ndarray | None
    qweight: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    source_dtype: str
    source_sum: float
    source_sumsq: float
    perm2: np.ndarray | None = None
    r_in2: np.ndarray | None = None
    act_scale: np.ndarray | None = None
    quality: dict[str, float] | None = None
    in_scale: np.ndarray | None = None
    choice: str | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in DATASETS if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


@dataclass(frozen=True)
class BundleHeader:
    path: Path
    format_version: int
    fingerprint: str
    fingerprint_doc: dict[str, Any]
    config: dict[str, Any]
    provenance: dict[str, Any]
    tool_version: str
    created_at: str
    layer_names: tuple[str, ...]

    @property
    def name(self) -> str:
        return str(self.config.get("name", "?"))


def crc32(array: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(array)).cast("B"))


def _crc_of_file(fh: object, start: int) -> tuple[int, int]:
    """(crc32, byte count) of a file from ``start`` to its end, in bounded chunks."""
    fh.seek(start)  # type: ignore[attr-defined]
    crc, n = 0, 0
    while chunk := fh.read(SEAL_CHUNK):  # type: ignore[attr-defined]
        crc = zlib.crc32(chunk, crc)
        n += len(chunk)
    return crc, n


def seal(path: str | Path) -> None:
    """Write the seal of a closed bundle created with ``userblock_size=USERBLOCK``."""
    with open(path, "r+b") as fh:
        crc, n = _crc_of_file(fh, USERBLOCK)
        fh.seek(0)
        fh.write(SEAL.pack(SEAL_MAGIC, n, crc))
        fh.flush()
        os.fsync(fh.fileno())


def check_seal(path: Path) -> bool:
    """True when the file carries a valid seal, False when it has none (format 1 or not a
    bundle); raises BundleReadError when the seal does not match the bytes."""
    with open(path, "rb") as fh:
        head = fh.read(SEAL.size)
        if len(head) < SEAL.size or not head.startswith(SEAL_MAGIC):
            fh.seek(USERBLOCK)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:  # a user block without our seal
                raise BundleReadError(
                    f"{path}: the bundle's seal is damaged, so its contents cannot be trusted — rebuild it with "
                    "`duquant-packs build`",
                    field="file",
                )
            return False
        _, length, want = SEAL.unpack(head)
        crc, n = _crc_of_file(fh, USERBLOCK)
    if n != length:
        raise BundleReadError(
            f"{path}: the file holds {n + USERBLOCK} bytes, its seal says {length + USERBLOCK}: it is truncated or "
            "was extended — rebuild it with `duquant-packs build`",
            field="file",
        )
    if crc != want:
        raise BundleReadError(
            f"{path}: the file fails its checksum (crc32 {crc:08x}, sealed {want:08x}); it is damaged — "
            "rebuild it with `duquant-packs build`",
            field="file",
        )
    return True


# ---------------------------------------------------------------- writing


def write_header(
    f: h5py.File,
    *,
    fingerprint_doc: dict[str, Any],
    config: dict[str, Any],
    provenance: dict[str, Any],
    tool_version: str,
    created_at: str,
) -> None:
    from .fingerprint import canonical_json

    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["fingerprint"] = digest(fingerprint_doc)
    f.attrs["fingerprint_json"] = canonical_json(fingerprint_doc)
    f.attrs["config_json"] = json.dumps(config, sort_keys=True)
    f.attrs["provenance_json"] = json.dumps(provenance, sort_keys=True)
    f.attrs["tool_version"] = tool_version
    f.attrs["created_at"] = created_at
    f.require_group(LAYERS)


INT_FIELDS = ("in_features", "out_features", "weight_bits", "block_size", "block_out_size")


SHARED = "shared"  # datasets identical across layers (e.g. one Hadamard per width), stored once
SHAREABLE = ("r_in", "r_in2", "perm", "perm2")


def write_layer(f: h5py.File, pack: LayerPack, shared: dict[tuple, tuple[np.ndarray, str]] | None = None) -> None:
    """One group per layer; all its metadata in one JSON attribute (h5py attribute reads
    cost ~0.1 ms each, which dominated load time when every field was its own).

    ``shared`` (a dict kept across one bundle) stores rotation and permutation arrays that
    are identical to an earlier layer's once, under ``/shared``, hard-linked from each layer:
    readers see an ordinary dataset, checked by the same per-layer crc32."""
    g = f[LAYERS].create_group(pack.name)
    arrays = pack.arrays()
    meta = {k: int(getattr(pack, k)) for k in INT_FIELDS}
    meta.update(
        storage=pack.storage,
        source_dtype=pack.source_dtype,
        source_sum=float(pack.source_sum),
        source_sumsq=float(pack.source_sumsq),
        crc32={k: crc32(a) for k, a in arrays.items()},
    )
    if pack.quality:
        meta["quality"] = pack.quality
    if pack.choice:
        meta["choice"] = pack.choice
    g.attrs["meta"] = json.dumps(meta, sort_keys=True)
    for key, array in arrays.items():
        data = np.ascontiguousarray(array)
        if shared is None or key not in SHAREABLE:
            g.create_dataset(key, data=data)
            continue
        ident = (key, data.shape, data.dtype.str, meta["crc32"][key])
        hit = shared.get(ident)
        if hit is None or not np.array_equal(hit[0], data):
            path = f"{SHARED}/{key}-{len(shared)}"
            f.create_dataset(path, data=data)
            hit = shared[ident] = (data, path)
        g[key] = f[hit[1]]  # a hard link: the layer reads it like its own dataset


# ---------------------------------------------------------------- reading


@contextlib.contextmanager
def _translated(path: Path, what: str) -> Iterator[None]:
    """Turn any low-level failure while reading into one BundleReadError sentence."""
    try:
        yield
    except (BundleReadError, BundleVersionError):
        raise
    except (
        OSError,
        KeyError,
        ValueError,
        TypeError,
        RuntimeError,
        AttributeError,
        IndexError,
        OverflowError,
        UnicodeDecodeError,
        json.JSONDecodeError,
    ) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleReadError(
            f"{path}: cannot read {what} ({detail}); the file is damaged or not a "
            "duquant bundle — rebuild it with `duquant-packs build`"
        ) from None


class BundleReader:
    """Read-only access to a bundle; use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleReadError(f"bundle not found: {self.path}")
        with _translated(self.path, "the file"):
            self.sealed = check_seal(self.path)
            self._linked: dict[int, np.ndarray] = {}  # object address -> array of a /shared dataset
            if not h5py.is_hdf5(self.path):
                raise BundleReadError(f"{self.path} is not an HDF5 file, so not a duquant bundle")
            self._f = h5py.File(self.path, "r")
        self.header = self._read_header()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()

    def _attr(self, key: str) -> Any:
        if key not in self._f.attrs:
            raise BundleReadError(
                f"{self.path}: header attribute {key!r} is missing; the file is not a complete duquant bundle"
            )
        return _read_attr(self._f, key)

    def _read_header(self) -> BundleHeader:
        with _translated(self.path, "the header"):
            fmt = _read_attr(self._f, "format") if "format" in self._f.attrs else None
            if fmt != FORMAT_NAME:
                raise BundleReadError(
                    f"{self.path} is an HDF5 file but not a duquant bundle (format attribute {fmt!r})"
                )
            version = int(self._attr("format_version"))
            tool = str(self._attr("tool_version"))
            if version not in READABLE_FORMATS:
                reader = FORMAT_WRITERS.get(FORMAT_VERSION, "?")
                raise BundleVersionError(
                    f"{self.path} was built by duquant-packs {tool} (format {version}); this runtime "
                    f"reads formats {', '.join(map(str, READABLE_FORMATS))} (duquant-packs {reader}): "
                    f"install a duquant-packs "
                    f"that reads format {version}, or rebuild the bundle with this one",
                    field="format_version",
                )
            if version >= 2 and not self.sealed:
                raise BundleReadError(
                    f"{self.path}: a format-{version} bundle must carry its seal and this one does not; the file "
                    "is damaged — rebuild it with `duquant-packs build`"
                )
            fp = str(self._attr("fingerprint"))
            fp_doc = json.loads(self._attr("fingerprint_json"))
            if digest(fp_doc) != fp:
                raise BundleReadError(
                    f"{self.path}: the stored fingerprint does not match the document "
                    "it was hashed from; the header was edited or damaged",
                    field="fingerprint",
                )
            config = json.loads(self._attr("config_json"))
            provenance = json.loads(self._attr("provenance_json"))
            source = fp_doc.get("source") if isinstance(fp_doc, dict) else None
            if not (
                isinstance(fp_doc, dict)
                and isinstance(fp_doc.get("config"), dict)
                and isinstance(source, list)
                and all(isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) for r in source)
                and isinstance(config, dict)
                and isinstance(provenance, dict)
            ):
                raise BundleReadError(f"{self.path}: the header's JSON documents are malformed", field="header")
            if LAYERS not in self._f or not isinstance(self._f[LAYERS], h5py.Group):
                raise BundleReadError(f"{self.path}: the layers group is missing; the bundle is incomplete")
            return BundleHeader(
                path=self.path,
                format_version=version,
                fingerprint=fp,
                fingerprint_doc=fp_doc,
                config=config,
                provenance=provenance,
                tool_version=tool,
                created_at=str(self._attr("created_at")),
                layer_names=tuple(sorted(self._f[LAYERS].keys())),
            )

    def _read(self, ds: h5py.Dataset, key: str) -> np.ndarray:
        """A dataset's values; one linked from several layers (/shared) is read once per reader
        and the same array is returned to each (callers only read it)."""
        if key not in SHAREABLE:
            return ds[()]
        info = h5py.h5o.get_info(ds.id)
        if info.rc < 2:
            return ds[()]
        data = self._linked.get(info.addr)
        if data is None:
            data = self._linked[info.addr] = ds[()]
        return data

    def layer_summary(self, name: str) -> dict[str, Any]:
        """A layer's metadata and stored bytes without reading any dataset (for ``inspect``):
        the ``meta`` JSON plus ``datasets`` {dataset: [bytes, object address]} from the
        datasets' shapes (a dataset shared by several layers has one address)."""
        with _translated(self.path, f"layer {name!r}"):
            g = self._f[LAYERS].get(name)
            if not isinstance(g, h5py.Group):
                raise BundleReadError(f"{self.path}: layer {name!r} is missing", layer=name)
            meta = json.loads(_text(_read_attr(g, "meta")))
            if not isinstance(meta, dict):
                raise ValueError("malformed layer metadata")
            meta["datasets"] = {
                k: [int(ds.size) * ds.dtype.itemsize, int(h5py.h5o.get_info(ds.id).addr)]
                for k, ds in g.items()
                if isinstance(ds, h5py.Dataset)
            }
            return meta

    def read_layer(self, name: str, *, check: bool = True) -> LayerPack:
        """One layer's pack; ``check`` verifies every dataset's crc32 (a verified seal
        already covers every byte, so sealed files skip it).

        Shapes and dtypes are checked against the layer's attributes before any data is
        read, so a damaged header can never make us allocate a huge array.
        """
        with _translated(self.path, f"layer {name!r}"):
            g = self._f[LAYERS].get(name)
            if not isinstance(g, h5py.Group):
                raise BundleReadError(f"{self.path}: layer {name!r} is missing", layer=name)
            meta = json.loads(_text(_read_attr(g, "meta")))
            ints = {k: int(meta[k]) for k in INT_FIELDS}
            storage = str(meta["storage"])
            crcs = meta["crc32"]
            expected = _expected_datasets(ints, storage)
            present = dict(g.items())
            arrays: dict[str, np.ndarray | None] = {}
            for key in DATASETS:
                ds = present.get(key)
                if ds is None:
                    if key in ("qweight", "w_scale") or (key == "r_in" and self.header.format_version < 2):
                        raise BundleReadError(
                            f"{self.path}: layer {name!r} has no {key!r} dataset", layer=name, field=key
                        )
                    arrays[key] = None
                    continue
                shape, dtypes = expected[key]
                if not isinstance(ds, h5py.Dataset) or ds.shape != shape or ds.dtype not in dtypes:
                    got = (getattr(ds, "shape", None), str(getattr(ds, "dtype", type(ds).__name__)))
                    raise BundleReadError(
                        f"{self.path}: layer {name!r} dataset {key!r} has shape/dtype {got}, "
                        f"expected {shape}; the bundle is inconsistent",
                        layer=name,
                        field=key,
                    )
                data = self._read(ds, key)
                if check and not self.sealed and int(crcs[key]) != crc32(data):
                    raise BundleReadError(
                        f"{self.path}: layer {name!r} dataset {key!r} fails its checksum; the file is "
                        "corrupted — rebuild it with `duquant-packs build`",
                        layer=name,
                        field=key,
                    )
                arrays[key] = data
            pack = LayerPack(
                name=name,
                storage=storage,
                source_dtype=str(meta["source_dtype"]),
                source_sum=float(meta["source_sum"]),
                source_sumsq=float(meta["source_sumsq"]),
                quality=_quality(meta.get("quality")),
                choice=str(meta["choice"]) if "choice" in meta else None,
                **ints,
                **arrays,  # type: ignore[arg-type]
            )
        _check_pack_values(self.path, pack)
        return pack


# No legitimate attribute comes near this; a damaged header can claim gigabytes, which
# HDF5 would try to allocate and read before we could look at the value.
MAX_ATTR_BYTES = 64 << 20


def _read_attr(obj: h5py.Group, key: str) -> Any:
    aid = h5py.h5a.open(obj.id, key.encode())
    size = aid.get_storage_size()
    if size > MAX_ATTR_BYTES or (aid.shape is not None and int(np.prod(aid.shape)) > MAX_ATTR_BYTES):
        raise ValueError(f"attribute {key!r} claims {size} bytes")
    value = obj.attrs[key]
    return value.decode() if isinstance(value, bytes) else value


def _quality(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise ValueError("malformed quality report")
    return {str(k): float(v) for k, v in value.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _expected_datasets(meta: dict[str, int], storage: str) -> dict[str, tuple[tuple[int, ...], tuple[np.dtype, ...]]]:
    """Shape and allowed dtypes of every dataset, from the layer attributes alone."""
    n_in, n_out, b, bo = meta["in_features"], meta["out_features"], meta["block_size"], meta["block_out_size"]
    if min(n_in, n_out, b, bo) < 1 or max(n_in, n_out) > 1 << 24 or max(b, bo) > 1 << 12:
        raise ValueError(f"implausible layer attributes {meta}")
    if storage not in (INT4, INT8):
        raise ValueError(f"unknown storage {storage!r}")
    f32 = (np.dtype(np.float32),)
    q_shape = (n_out, (n_in + 1) // 2) if storage == INT4 else (n_out, n_in)
    return {
        "in_scale": ((n_in,), f32),
        "perm": ((n_in,), (np.dtype(np.int32), np.dtype(np.int64))),
        "r_in": ((-(-n_in // b), b, b), f32),
        "perm2": ((n_in,), (np.dtype(np.int32), np.dtype(np.int64))),
        "r_in2": ((-(-n_in // b), b, b), f32),
        "act_scale": ((n_in,), f32),
        "r_out": ((-(-n_out // bo), bo, bo), f32),
        "qweight": (q_shape, (np.dtype(np.uint8) if storage == INT4 else np.dtype(np.int8),)),
        "w_scale": ((n_out,), f32),
        "bias": ((n_out,), f32),
    }


def _check_pack_values(path: Path, p: LayerPack) -> None:
    """Values that shapes cannot vouch for: a permutation must be one, numbers finite."""
    for key in ("perm", "perm2"):
        perm = getattr(p, key)
        if perm is not None and not np.array_equal(np.sort(perm), np.arange(p.in_features)):
            raise BundleReadError(
                f"{path}: layer {p.name!r} {key} is not a permutation of the input channels", layer=p.name, field=key
            )
    for key in ("in_scale", "r_in", "r_in2", "r_out", "w_scale", "bias", "act_scale"):
        value = getattr(p, key)
        if value is not None and not np.isfinite(value).all():
            raise BundleReadError(f"{path}: layer {p.name!r} {key} holds NaN/Inf", layer=p.name, field=key)
    if p.in_scale is not None and not (p.in_scale > 0).all():
        raise BundleReadError(f"{path}: layer {p.name!r} in_scale is not positive", layer=p.name, field="in_scale")
