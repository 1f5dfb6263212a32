"""The bundle format (HDF5), defined once: the pipeline writes with it, the runtime reads.

Layout (format_version 2; format 1 is the same without ``in_scale``, with ``r_in`` always
present, and is still read)::

    /                   attrs: format, format_version, fingerprint, fingerprint_json,
                               config_json, provenance_json, tool_version, created_at,
                               index_json (from 0.5: {"layers": {module: {"meta": the layer's
                               meta, "datasets": {dataset: [byte offset, dtype, shape]}}}})
    /layers/<module>    attr meta (JSON): in_features, out_features, weight_bits, storage,
                               block_size, block_out_size, source_dtype,
                               source_sum, source_sumsq (float64 signature of the weight),
                               source_bits (int64 sum of its raw bytes; from 0.4),
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
every dataset, so per-dataset checksums are not recomputed on load. A load keeps the bytes
it checked and cuts every layer out of them by the index's offsets: one read of the file,
no HDF5 call per layer (``verify`` checks that the index agrees with the groups).

Every h5py failure is translated into :class:`BundleReadError`; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np

from . import h5file
from .errors import BundleReadError, BundleVersionError
from .fingerprint import FORMAT_VERSION, digest
from .locate import locate_bundle
from .packing import INT4, INT8
from .stages import LEGACY_INPUT, LEGACY_OUTPUT, StageSpec, check_plan

FORMAT_NAME = "duquant-packs-bundle"
LAYERS = "layers"
INDEX = "index_json"  # root attribute (from 0.5): every layer's meta and dataset offsets
SEAL_MAGIC = h5file.BUNDLE_MAGIC
FIXED = ("qweight", "w_scale", "bias", "act_scale")  # every layer's own datasets besides its stages
# Which tool release first wrote each format version (for "built by X" messages).
FORMAT_WRITERS = {1: "0.1", 2: "0.2"}
# Format 2 adds in_scale and makes r_in optional: a format-1 reader would ignore in_scale and
# compute wrong numbers, so the version is bumped and this reader reads both.
READABLE_FORMATS = (1, 2)
FIX = "rebuild it with `duquant-packs build`"


@dataclass
class LayerPack:
    """Everything the runtime needs for one layer; produced offline, stored as-is.

    ``stages`` / ``out_stages`` list the transform in order; ``stage_values`` holds each
    stage's array under its key (float32 scales and rotation blocks, int32 permutations).
    """

    name: str
    in_features: int
    out_features: int
    weight_bits: int
    storage: str
    qweight: np.ndarray
    w_scale: np.ndarray
    bias: np.ndarray | None
    source_dtype: str
    source_sum: float
    source_sumsq: float
    stages: tuple[StageSpec, ...] = ()
    source_bits: int | None = None  # signature.bits_digest of the source tensor (absent before 0.4)
    out_stages: tuple[StageSpec, ...] = ()
    stage_values: dict[str, np.ndarray] = field(default_factory=dict)
    act_scale: np.ndarray | None = None
    quality: dict[str, float] | None = None
    choice: str | None = None

    def array(self, key: str) -> np.ndarray | None:
        """A stage's array (``"r_in"``, ``"perm"``...) or a fixed dataset, None when absent."""
        return self.stage_values.get(key) if key not in FIXED else getattr(self, key)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every dataset of the layer, stages first in order."""
        out = {s.key: self.stage_values[s.key] for s in (*self.stages, *self.out_stages)}
        out.update((k, getattr(self, k)) for k in FIXED if getattr(self, k) is not None)
        return out

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


crc32 = h5file.crc32


def seal(path: str | Path) -> None:
    """Write the seal of a closed bundle made by ``h5file.create``."""
    h5file.seal(Path(path), SEAL_MAGIC)


# ---------------------------------------------------------------- writing


def write_header(
    f: h5py.File,
    *,
    fingerprint_doc: dict[str, Any],
    config: dict[str, Any],
    provenance: dict[str, Any],
    tool_version: str,
    created_at: str,
    index: dict[str, dict[str, Any] | None] | None = None,
) -> None:
    """The root attributes. ``index`` ({layer: ``write_layer``'s entry}) is stored as one JSON
    attribute when every layer has an entry: a reader holding the sealed bytes then loads
    every layer from one attribute read and byte offsets, with no per-layer HDF5 call."""
    from .fingerprint import canonical_json

    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION
    f.attrs["fingerprint"] = digest(fingerprint_doc)
    f.attrs["fingerprint_json"] = canonical_json(fingerprint_doc)
    f.attrs["config_json"] = json.dumps(config, sort_keys=True)
    f.attrs["provenance_json"] = json.dumps(provenance, sort_keys=True)
    f.attrs["tool_version"] = tool_version
    f.attrs["created_at"] = created_at
    if index and all(entry is not None for entry in index.values()):
        f.attrs[INDEX] = json.dumps({"layers": index}, sort_keys=True)
    f.require_group(LAYERS)


SHARED = "shared"  # datasets identical across layers (e.g. one Hadamard per width), stored once
SHAREABLE_KINDS = ("perm", "rotate")


def _block(specs: tuple[StageSpec, ...], values: dict[str, np.ndarray]) -> int:
    """The first rotation's block size (0 without one): written for readers of 0.2.0."""
    return next((int(values[s.key].shape[1]) for s in specs if s.kind == "rotate"), 0)


def write_layer(
    f: h5py.File, pack: LayerPack, shared: dict[tuple, tuple[np.ndarray, str]] | None = None
) -> dict[str, Any] | None:
    """One group per layer; all its metadata in one JSON attribute (h5py attribute reads
    cost ~0.1 ms each, which dominated load time when every field was its own).

    ``shared`` (a dict kept across one bundle) stores permutation and rotation arrays that
    are identical to an earlier layer's once, under ``/shared``, hard-linked from each layer:
    readers see an ordinary dataset, checked by the same per-layer crc32.

    Returns the layer's entry for the bundle's index (see ``write_header``): its metadata and
    each dataset's [byte offset in the file, dtype, shape]; None when a dataset has no
    contiguous storage to point at."""
    check_plan(pack.stages, pack.out_stages)
    g = f[LAYERS].create_group(pack.name)
    arrays = pack.arrays()
    meta: dict[str, Any] = {
        "in_features": int(pack.in_features),
        "out_features": int(pack.out_features),
        "weight_bits": int(pack.weight_bits),
        "block_size": _block(pack.stages, pack.stage_values) or 1,
        "block_out_size": _block(pack.out_stages, pack.stage_values) or 1,
        "storage": pack.storage,
        "source_dtype": pack.source_dtype,
        "source_sum": float(pack.source_sum),
        "source_sumsq": float(pack.source_sumsq),
        **({} if pack.source_bits is None else {"source_bits": int(pack.source_bits)}),
        "stages": [[s.kind, s.key] for s in pack.stages],
        "out_stages": [[s.kind, s.key] for s in pack.out_stages],
        "crc32": {k: crc32(a) for k, a in arrays.items()},
    }
    if pack.quality:
        meta["quality"] = pack.quality
    if pack.choice:
        meta["choice"] = pack.choice
    g.attrs["meta"] = json.dumps(meta, sort_keys=True)
    kinds = {s.key: s.kind for s in (*pack.stages, *pack.out_stages)}
    located: dict[str, list[Any]] = {}
    for key, array in arrays.items():
        data = np.ascontiguousarray(array)
        if shared is None or kinds.get(key) not in SHAREABLE_KINDS:
            ds = g.create_dataset(key, data=data)
        else:
            ident = (kinds[key], data.shape, data.dtype.str, meta["crc32"][key])
            hit = shared.get(ident)
            if hit is None or not np.array_equal(hit[0], data):
                path = f"{SHARED}/{key}-{len(shared)}"
                f.create_dataset(path, data=data)
                hit = shared[ident] = (data, path)
            g[key] = ds = f[hit[1]]  # a hard link: the layer reads it like its own dataset
        located[key] = [ds.id.get_offset(), data.dtype.str, list(data.shape)]
    if any(offset is None for offset, _, _ in located.values()):
        return None
    return {"meta": meta, "datasets": located}


# ---------------------------------------------------------------- reading


def _translated(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    return h5file.translated(
        path,
        what,
        BundleReadError,
        "the file is damaged or not a duquant bundle",
        FIX,
        passthrough=(BundleVersionError,),
    )


def _plan(meta: dict[str, Any], present: dict[str, Any], version: int) -> tuple[tuple, tuple]:
    """The layer's (input, output) stage lists: stored in the metadata, or for bundles written
    before stages were listed, the legacy datasets present, in their fixed order."""
    if "stages" in meta:
        inputs = tuple(StageSpec(str(k), str(n)) for k, n in meta["stages"])
        outputs = tuple(StageSpec(str(k), str(n)) for k, n in meta.get("out_stages", []))
    else:
        inputs = tuple(StageSpec(k, n) for k, n in LEGACY_INPUT if n in present)
        outputs = tuple(StageSpec(k, n) for k, n in LEGACY_OUTPUT if n in present)
        if version < 2 and not any(s.key == "r_in" for s in inputs):
            raise ValueError("a format-1 layer must hold 'r_in'")
    check_plan(inputs, outputs)
    return inputs, outputs


class Stored(NamedTuple):
    """Where one dataset's values are: shape, dtype, its byte offset in the file (None when
    not stored contiguously), and the h5py dataset when read from a group. The offset is read
    from when the reader holds the sealed bytes; otherwise the dataset is."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None
    dataset: h5py.Dataset | None = None


class BundleReader:
    """Read-only access to a bundle; use as a context manager.

    With ``in_memory`` (the default) a sealed file is read once, into memory, while its seal is
    checked; layers are then cut out of those bytes by offset (from the bundle's index, or
    the datasets' own offsets in older bundles) instead of being read again through HDF5.
    Codes stay views of those bytes (the other arrays are copied out, so that they alone do
    not keep the file's bytes alive). ``in_memory=False`` checks the seal without keeping
    the bytes, for header and metadata reads (``inspect``, choosing among bundles).
    """

    def __init__(self, path: str | Path, *, in_memory: bool = True) -> None:
        self.path = locate_bundle(path)  # a folder holding one bundle is that bundle
        self._bytes: np.ndarray | None = None
        self._arrays: dict[tuple[str, int], np.ndarray] = {}  # one array per dataset shared by layers
        self._vetted: dict[int, np.ndarray] = {}  # stage arrays whose values passed, by id (held: ids stay unique)
        with _translated(self.path, "the file"):
            if in_memory:
                self._bytes = h5file.read_sealed(self.path, SEAL_MAGIC)
                self.sealed = self._bytes is not None
            else:
                self.sealed = h5file.check_seal(self.path, SEAL_MAGIC)
            if not h5py.is_hdf5(self.path):
                raise BundleReadError(f"{self.path} is not an HDF5 file, so not a duquant bundle")
            self._f = h5py.File(self.path, "r")
        self.header = self._read_header()
        self._index = self._read_index()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._bytes, self._arrays, self._vetted = None, {}, {}
        with contextlib.suppress(Exception):
            self._f.close()

    @property
    def indexed(self) -> bool:
        """Whether layers are read from the bundle's index (sealed bundles from 0.5)."""
        return self._index is not None

    def _attr(self, key: str) -> Any:
        if key not in self._f.attrs:
            raise BundleReadError(
                f"{self.path}: header attribute {key!r} is missing; the file is not a complete duquant bundle"
            )
        return h5file.read_attr(self._f, key)

    def _check_version(self, version: int, tool: str) -> None:
        if version not in READABLE_FORMATS:
            reader = FORMAT_WRITERS.get(FORMAT_VERSION, "?")
            raise BundleVersionError(
                f"{self.path} was built by duquant-packs {tool} (format {version}); this runtime "
                f"reads formats {', '.join(map(str, READABLE_FORMATS))} (duquant-packs {reader}): "
                f"install a duquant-packs that reads format {version}, or rebuild the bundle with this one",
                field="format_version",
            )
        if version >= 2 and not self.sealed:
            raise BundleReadError(
                f"{self.path}: a format-{version} bundle must carry its seal and this one does not; the file "
                f"is damaged — {FIX}"
            )

    def _read_header(self) -> BundleHeader:
        with _translated(self.path, "the header"):
            fmt = h5file.read_attr(self._f, "format") if "format" in self._f.attrs else None
            if fmt != FORMAT_NAME:
                raise BundleReadError(
                    f"{self.path} is an HDF5 file but not a duquant bundle (format attribute {fmt!r})"
                )
            version, tool = int(self._attr("format_version")), str(self._attr("tool_version"))
            self._check_version(version, tool)
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

    def _read_index(self) -> dict[str, Any] | None:
        """The layer index of a sealed file, checked to name exactly the bundle's layers (an
        unsealed file's index is never trusted: its offsets are not vouched for)."""
        if not self.sealed or INDEX not in self._f.attrs:
            return None
        with _translated(self.path, "the layer index"):
            layers = h5file.json_attr(self._f, INDEX).get("layers")
            if not isinstance(layers, dict) or sorted(layers) != list(self.header.layer_names):
                raise BundleReadError(
                    f"{self.path}: the layer index does not list the bundle's layers; the bundle is "
                    f"inconsistent — {FIX}",
                    field="index",
                )
            return layers

    def _group(self, name: str) -> h5py.Group:
        g = self._f[LAYERS].get(name)
        if not isinstance(g, h5py.Group):
            raise BundleReadError(f"{self.path}: layer {name!r} is missing", layer=name)
        return g

    def _entry(self, name: str, use_index: bool) -> tuple[dict[str, Any], dict[str, Stored]]:
        """A layer's metadata and where each of its datasets is: from the index when asked and
        there is one (no HDF5 call), else from the layer's group."""
        if use_index and self._index is not None:
            entry = self._index.get(name)
            if not isinstance(entry, dict) or not isinstance(entry.get("meta"), dict):
                raise BundleReadError(f"{self.path}: layer {name!r} is missing from the index", layer=name)
            located = entry["datasets"]
            if not isinstance(located, dict):
                raise ValueError("malformed index entry")
            stored = {
                str(k): Stored(tuple(int(n) for n in shape), np.dtype(str(dtype)), int(offset))
                for k, (offset, dtype, shape) in located.items()
            }
            return entry["meta"], stored
        g = self._group(name)
        stored = {}
        for key, ds in g.items():
            if not isinstance(ds, h5py.Dataset):
                raise BundleReadError(f"{self.path}: layer {name!r} {key!r} is not a dataset", layer=name, field=key)
            stored[key] = Stored(ds.shape, ds.dtype, ds.id.get_offset(), ds)
        return h5file.json_attr(g, "meta"), stored

    def _read(self, name: str, key: str, s: Stored, shareable: bool) -> np.ndarray:
        """A dataset's values. One shared by several layers (/shared) is read once per reader,
        and the same array is returned to each (callers only read it)."""
        if s.offset is not None and self._bytes is not None:
            where = ("offset", s.offset)
        else:
            assert s.dataset is not None
            info = h5py.h5o.get_info(s.dataset.id) if shareable else None
            if info is None or info.rc < 2:  # linked from one layer only
                return s.dataset[()]
            where = ("object", info.addr)
        data = self._arrays.get(where)
        if data is None:
            data = self._cut(name, key, s) if where[0] == "offset" else s.dataset[()]  # type: ignore[index]
            if shareable:
                self._arrays[where] = data
        return data

    def _cut(self, name: str, key: str, s: Stored) -> np.ndarray:
        """A dataset's values out of the sealed bytes: codes as a view, the rest copied (small
        arrays that would otherwise keep the whole file's bytes alive)."""
        assert self._bytes is not None and s.offset is not None
        count = int(np.prod(s.shape, dtype=np.int64))
        if not 0 <= s.offset <= len(self._bytes) - count * s.dtype.itemsize:
            raise BundleReadError(
                f"{self.path}: layer {name!r} dataset {key!r} points outside the file; the bundle is "
                f"inconsistent — {FIX}",
                layer=name,
                field=key,
            )
        data = np.frombuffer(self._bytes, s.dtype, count, s.offset).reshape(s.shape)
        return data if key == "qweight" and data.flags.aligned else data.copy()

    def layer_summary(self, name: str) -> dict[str, Any]:
        """A layer's metadata and stored bytes without reading any dataset (for ``inspect``):
        the ``meta`` JSON plus ``datasets`` {dataset: [bytes, location]} from the datasets'
        shapes (a dataset shared by several layers has one location)."""
        with _translated(self.path, f"layer {name!r}"):
            meta, stored = self._entry(name, use_index=True)

            def stored_bytes_at(s: Stored) -> list[int]:  # at: the index's offset, or the object's address
                at = s.offset if s.dataset is None else h5py.h5o.get_info(s.dataset.id).addr
                return [int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize, int(at)]

            return {**meta, "datasets": {k: stored_bytes_at(s) for k, s in stored.items()}}

    def index_problems(self) -> list[str]:
        """Where the index disagrees with the layers' groups (``verify`` checks both; a load
        reads the index alone)."""
        if self._index is None:
            return []
        problems = []
        with _translated(self.path, "the layer index"):
            for name in self.header.layer_names:
                (meta, indexed), (group_meta, grouped) = (self._entry(name, use_index=u) for u in (True, False))
                if meta != group_meta or _locations(indexed) != _locations(grouped):
                    problems.append(f"layer {name}: the bundle's index disagrees with the layer's datasets — {FIX}")
        return problems

    def read_layer(self, name: str, *, check: bool = True) -> LayerPack:
        """One layer's pack; ``check`` verifies every dataset's crc32 (a verified seal
        already covers every byte, so sealed files skip it).

        Shapes and dtypes are checked against the layer's attributes before any data is
        read, so a damaged header can never make us allocate a huge array.
        """
        with _translated(self.path, f"layer {name!r}"):
            # the index's offsets point into the bytes in memory; without them, HDF5 reads
            meta, present = self._entry(name, use_index=self._bytes is not None)
            n_in, n_out = int(meta["in_features"]), int(meta["out_features"])
            storage, crcs = str(meta["storage"]), meta["crc32"]
            inputs, outputs = _plan(meta, present, self.header.format_version)
            kinds = {s.key: s.kind for s in (*inputs, *outputs)}
            stray = sorted(set(present) - set(kinds) - set(FIXED))
            if stray:
                raise BundleReadError(f"{self.path}: layer {name!r} has an unknown dataset {stray[0]!r}", layer=name)
            out_keys = {s.key for s in outputs}
            arrays: dict[str, np.ndarray] = {}
            for key in (*kinds, *FIXED):
                stored = present.get(key)
                if stored is None:
                    if key in kinds or key in ("qweight", "w_scale"):
                        raise BundleReadError(
                            f"{self.path}: layer {name!r} has no {key!r} dataset", layer=name, field=key
                        )
                    continue
                width = n_out if key in out_keys or key in ("w_scale", "bias") else n_in
                _check_dataset(self.path, name, key, stored, kinds.get(key), width, n_out, storage)
                data = self._read(name, key, stored, key in kinds)
                if check and not self.sealed and int(crcs[key]) != crc32(data):
                    raise BundleReadError(
                        f"{self.path}: layer {name!r} dataset {key!r} fails its checksum; the file is "
                        f"corrupted — {FIX}",
                        layer=name,
                        field=key,
                    )
                arrays[key] = data
            pack = LayerPack(
                name=name,
                in_features=n_in,
                out_features=n_out,
                weight_bits=int(meta["weight_bits"]),
                storage=storage,
                qweight=arrays["qweight"],
                w_scale=arrays["w_scale"],
                bias=arrays.get("bias"),
                act_scale=arrays.get("act_scale"),
                source_dtype=str(meta["source_dtype"]),
                source_sum=float(meta["source_sum"]),
                source_sumsq=float(meta["source_sumsq"]),
                source_bits=_source_bits(meta.get("source_bits")),
                stages=inputs,
                out_stages=outputs,
                stage_values={k: arrays[k] for k in kinds},
                quality=_quality(meta.get("quality")),
                choice=str(meta["choice"]) if "choice" in meta else None,
            )
        _check_pack_values(self.path, pack, self._vetted)
        self._vetted.update((id(v), v) for k, v in pack.stage_values.items() if kinds[k] in SHAREABLE_KINDS)
        return pack


def _locations(stored: dict[str, Stored]) -> dict[str, tuple]:
    """Each dataset's (shape, dtype, offset), without the h5py object."""
    return {k: (s.shape, s.dtype, s.offset) for k, s in stored.items()}


def _source_bits(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not -(1 << 63) <= value < 1 << 63:
        raise ValueError("malformed source_bits")
    return value


def _quality(value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, int | float) for v in value.values()):
        raise ValueError("malformed quality report")
    return {str(k): float(v) for k, v in value.items()}


F32 = (np.dtype(np.float32),)
INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def _expected(key: str, kind: str | None, shape: tuple[int, ...], width: int, n_out: int, storage: str) -> tuple:
    """(shape, allowed dtypes) of a dataset, from the layer's attributes and, for a
    rotation, its block size (the dataset's second dimension, bounded)."""
    if kind == "rotate":
        b = int(shape[1]) if len(shape) == 3 else 0
        if not 1 <= b <= 1 << 12:
            raise ValueError(f"implausible rotation block size {b}")
        return (-(-width // b), b, b), F32
    if kind == "perm":
        return (width,), INDEX_DTYPES
    if key == "qweight":
        if storage == INT4:
            return (n_out, (width + 1) // 2), (np.dtype(np.uint8),)
        return (n_out, width), (np.dtype(np.int8),)
    return (width,), F32  # scales, w_scale, bias, act_scale


def _check_dataset(
    path: Path, name: str, key: str, stored: Stored, kind: str | None, width: int, n_out: int, storage: str
) -> None:
    if min(width, n_out) < 1 or max(width, n_out) > 1 << 24:
        raise ValueError(f"implausible layer size {n_out}x{width}")
    if storage not in (INT4, INT8):
        raise ValueError(f"unknown storage {storage!r}")
    shape, dtypes = _expected(key, kind, stored.shape, width, n_out, storage)
    if stored.shape != shape or stored.dtype not in dtypes:
        raise BundleReadError(
            f"{path}: layer {name!r} dataset {key!r} has shape/dtype {(stored.shape, str(stored.dtype))}, "
            f"expected {shape}; the bundle is inconsistent",
            layer=name,
            field=key,
        )


def _check_pack_values(path: Path, p: LayerPack, vetted: dict[int, np.ndarray]) -> None:
    """Values that shapes cannot vouch for: a permutation must be one, numbers finite,
    scales positive. Arrays in ``vetted`` (shared by layers, checked before) are skipped."""
    for spec in (*p.stages, *p.out_stages):
        value = p.stage_values[spec.key]
        if vetted.get(id(value)) is value:
            continue
        if spec.kind == "perm" and not np.array_equal(np.sort(value), np.arange(p.in_features)):
            raise BundleReadError(
                f"{path}: layer {p.name!r} {spec.key} is not a permutation of the input channels",
                layer=p.name,
                field=spec.key,
            )
        if spec.kind != "perm" and not np.isfinite(value).all():
            raise BundleReadError(f"{path}: layer {p.name!r} {spec.key} holds NaN/Inf", layer=p.name, field=spec.key)
        if spec.kind == "scale" and not (value > 0).all():
            raise BundleReadError(f"{path}: layer {p.name!r} {spec.key} is not positive", layer=p.name, field=spec.key)
    for key in ("w_scale", "bias", "act_scale"):
        value = getattr(p, key)
        if value is not None and not np.isfinite(value).all():
            raise BundleReadError(f"{path}: layer {p.name!r} {key} holds NaN/Inf", layer=p.name, field=key)
