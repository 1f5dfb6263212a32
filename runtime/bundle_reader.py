"""Reading a bundle: ``BundleReader`` checks the seal and the header, then reads layers,
each checked against the layer's schema (``bundle_schema``) before it is handed out.

A load keeps the bytes it checked and cuts every layer out of them by the index's offsets:
one read of the file, no HDF5 call per layer (``verify`` checks that the index agrees with
the groups). Every failure is one :class:`BundleReadError` sentence; nothing else escapes.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from . import h5file
from .bundle_records import FIX, FIXED, FORMAT_WRITERS, INDEX, KIND, LAYERS, REBUILD, BundleHeader, LayerPack
from .bundle_schema import check_dataset, check_pack_values, header_docs_ok, layer_kind, pack_of, plan
from .errors import BundleReadError, BundleVersionError
from .fingerprint import FORMAT_VERSION, digest
from .h5file import Node
from .locate import locate_bundle
from .read_errors import NotHDF5Error, translated

Where = tuple[str, int]  # ("offset", byte offset) or ("object", HDF5 address): one stored array


def _translated(path: Path, what: str) -> contextlib.AbstractContextManager[None]:
    return translated(
        path, what, BundleReadError, "the file is damaged or not a duquant bundle", FIX, (BundleVersionError,)
    )


class BundleReader:
    """Read-only access to a bundle; use as a context manager.

    With ``in_memory`` (the default) the file is read once, into memory, while its seal is
    checked; layers are then cut out of those bytes by offset (from the bundle's index, or
    the datasets' own offsets in bundles before 0.5) instead of being read again through
    HDF5. Codes stay views of those bytes (the other arrays are copied out, so that they
    alone do not keep the file's bytes alive). ``in_memory=False`` checks the seal without
    keeping the bytes, for header and metadata reads (``inspect``, choosing among bundles).
    """

    def __init__(self, path: str | Path, *, in_memory: bool = True) -> None:
        self.path = locate_bundle(path)  # a folder holding one bundle is that bundle
        self._arrays: dict[Where, np.ndarray] = {}  # one array per dataset shared by layers
        self._vetted: set[Where] = set()  # stored stage arrays whose values passed, by where they are stored
        with _translated(self.path, "the file"):
            try:
                self._file = h5file.SealedReader(self.path, KIND, keep=in_memory)
            except NotHDF5Error:
                raise BundleReadError(f"{self.path} is not an HDF5 file, so not a duquant bundle") from None
        self.sealed = self._file.sealed
        self.header = self._read_header()
        self._index = self._read_index()

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._arrays, self._vetted = {}, set()
        self._file.close()

    @property
    def _bytes(self) -> np.ndarray | None:
        """The sealed bytes, when kept."""
        return self._file.bytes

    @property
    def indexed(self) -> bool:
        """Whether layers are read from the bundle's index (sealed bundles from 0.5)."""
        return self._index is not None

    def _attr(self, key: str) -> Any:
        if not self._file.has_attr(key):
            raise BundleReadError(
                f"{self.path}: header attribute {key!r} is missing; the file is not a complete duquant bundle"
            )
        return self._file.attr(key)

    def _check_version(self, version: int, tool: str) -> None:
        if version == 1:
            raise BundleVersionError(
                f"{self.path} was built by duquant-packs {tool} (format 1), which this runtime no longer reads: "
                f"{REBUILD}",
                field="format_version",
            )
        if version != FORMAT_VERSION:
            raise BundleVersionError(
                f"{self.path} was built by duquant-packs {tool} (format {version}); this runtime reads format "
                f"{FORMAT_VERSION} (duquant-packs {FORMAT_WRITERS[FORMAT_VERSION]} on): install a duquant-packs "
                f"that reads format {version}, or rebuild the bundle with this one",
                field="format_version",
            )
        if not self.sealed:
            raise BundleReadError(
                f"{self.path}: a format-{version} bundle must carry its seal and this one does not; the file "
                f"is damaged — {FIX}"
            )

    def _read_header(self) -> BundleHeader:
        with _translated(self.path, "the header"):
            fmt = self._file.attr("format") if self._file.has_attr("format") else None
            if fmt != KIND.format:
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
            config, provenance = json.loads(self._attr("config_json")), json.loads(self._attr("provenance_json"))
            if not header_docs_ok(fp_doc, config, provenance):
                raise BundleReadError(f"{self.path}: the header's JSON documents are malformed", field="header")
            if not self._file.is_group(LAYERS):
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
                layer_names=tuple(self._file.names(LAYERS)),
            )

    def _read_index(self) -> dict[str, Any] | None:
        """The layer index, checked to name exactly the bundle's layers."""
        if not self._file.has_attr(INDEX):
            return None
        with _translated(self.path, "the layer index"):
            layers = self._file.json(INDEX).get("layers")
            if not isinstance(layers, dict) or sorted(layers) != list(self.header.layer_names):
                raise BundleReadError(
                    f"{self.path}: the layer index does not list the bundle's layers; the bundle is "
                    f"inconsistent — {FIX}",
                    field="index",
                )
            return layers

    def _group(self, name: str) -> str:
        """The path of a layer's group."""
        at = f"{LAYERS}/{name}"
        if not self._file.is_group(at):
            raise BundleReadError(f"{self.path}: layer {name!r} is missing", layer=name)
        return at

    def _entry(self, name: str, use_index: bool) -> tuple[dict[str, Any], dict[str, Node]]:
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
                str(k): Node(tuple(int(n) for n in shape), np.dtype(str(dtype)), int(offset))
                for k, (offset, dtype, shape) in located.items()
            }
            return entry["meta"], stored
        at = self._group(name)
        stored = {}
        for key in self._file.names(at):
            node = self._file.node(f"{at}/{key}")
            if node is None:
                raise BundleReadError(f"{self.path}: layer {name!r} {key!r} is not a dataset", layer=name, field=key)
            stored[key] = node
        return self._file.json("meta", at), stored

    def _read(self, name: str, key: str, s: Node, shareable: bool) -> tuple[np.ndarray, Where | None]:
        """A dataset's values, and where they are stored when several layers may share them.
        One shared by several layers (/shared) is read once per reader, and the same array is
        returned to each (callers only read it)."""
        if s.offset is not None and self._bytes is not None:
            where: Where = ("offset", s.offset)
        else:
            assert s.path is not None
            address, links = self._file.stored_at(s.path) if shareable else (0, 1)
            if links < 2:  # linked from one layer only
                return self._file.read(s.path), None
            where = ("object", address)
        data = self._arrays.get(where)
        if data is None:
            data = self._cut(name, key, s) if where[0] == "offset" else self._file.read(s.path)  # type: ignore[arg-type]
            if shareable:
                self._arrays[where] = data
        return data, where

    def _cut(self, name: str, key: str, s: Node) -> np.ndarray:
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

            def stored_bytes_at(s: Node) -> list[int]:  # at: the index's offset, or the object's address
                at = s.offset if s.path is None else self._file.stored_at(s.path)[0]
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
        """One layer's pack, every dataset's shape and dtype checked against the layer's sizes
        before it is read, and its values after. ``check`` is for callers of 0.5, when
        unsealed bundles were read: every bundle read now is sealed, and its verified seal
        covers every byte."""
        with _translated(self.path, f"layer {name!r}"):
            # the index's offsets point into the bytes in memory; without them, HDF5 reads
            meta, present = self._entry(name, use_index=self._bytes is not None)
            stages = plan(self.path, name, meta)
            arrays, places = self._datasets(name, meta, present, stages)
            pack = pack_of(name, meta, arrays, stages)
            pack.shared = places
        check_pack_values(self.path, pack, {k for k, where in places.items() if where in self._vetted})
        self._vetted.update(places.values())
        return pack

    def _datasets(
        self, name: str, meta: dict[str, Any], present: dict[str, Node], stages: tuple[tuple, tuple]
    ) -> tuple[dict[str, np.ndarray], dict[str, Where]]:
        """The layer's arrays, each checked for shape and dtype first, and where each stage
        array shared by layers is stored."""
        inputs, outputs = stages
        kinds = {s.key: s.kind for s in (*inputs, *outputs)}
        stray = sorted(set(present) - set(kinds) - set(FIXED))
        if stray:
            raise BundleReadError(f"{self.path}: layer {name!r} has an unknown dataset {stray[0]!r}", layer=name)
        n_in, n_out, storage = int(meta["in_features"]), int(meta["out_features"]), str(meta["storage"])
        groups = layer_kind(meta)[1]
        out_keys = {s.key for s in outputs}
        arrays: dict[str, np.ndarray] = {}
        places: dict[str, Where] = {}
        for key in (*kinds, *FIXED):
            stored = present.get(key)
            if stored is None:
                if key in kinds or key in ("qweight", "w_scale"):
                    raise BundleReadError(f"{self.path}: layer {name!r} has no {key!r} dataset", layer=name, field=key)
                continue
            width = n_out if key in out_keys or key in ("w_scale", "bias") else n_in
            if groups is not None:  # an embedding: its sizes are the table's
                width = n_in
            check_dataset(self.path, name, key, stored, kinds.get(key), width, n_out, storage, groups)
            arrays[key], where = self._read(name, key, stored, key in kinds and kinds[key].shareable)
            if where is not None and key in kinds:
                places[key] = where
        return arrays, places


def _locations(stored: dict[str, Node]) -> dict[str, tuple]:
    """Each dataset's (shape, dtype, offset), without its path."""
    return {k: (s.shape, s.dtype, s.offset) for k, s in stored.items()}
