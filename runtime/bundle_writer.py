"""Writing a bundle: ``BundleWriter`` takes layer packs as they arrive (``add``), then the
header (``finish``), into a sealed file written atomically (``h5file``). The pipeline writes
through it and never touches HDF5."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import h5file
from .bundle_records import INDEX, KIND, LAYERS, SHARED, LayerPack
from .bundle_schema import layer_meta
from .fingerprint import canonical_json, digest
from .stages import check_plan


class BundleWriter:
    """A bundle being written; use as a context manager::

        with BundleWriter(out_dir / "name.h5") as writer:
            for pack in packs:
                writer.add(pack)
            fingerprint = writer.finish(fingerprint_doc=..., config=..., ...)
            writer.target = final_path  # optional: where the file goes on success

    Leaving the block without an error renames the sealed file over ``target``; with one,
    the temp file is removed and nothing is written.
    """

    def __init__(self, target: str | Path) -> None:
        self._file = h5file.SealedWriter(Path(target), KIND)
        # (kind, shape, dtype, crc32) -> (array, path) of arrays stored once under /shared
        self._shared: dict[tuple, tuple[np.ndarray, str]] = {}
        self._index: dict[str, dict[str, Any] | None] = {}
        self._file.group(LAYERS, exist_ok=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._file.__exit__(*exc)

    @property
    def target(self) -> Path:
        return self._file.pending.target

    @target.setter
    def target(self, path: Path) -> None:
        self._file.pending.target = Path(path)

    def add(self, pack: LayerPack) -> None:
        """One group per layer; all its metadata in one JSON attribute (h5py attribute reads
        cost ~0.1 ms each, which dominated load time when every field was its own).
        Permutation and rotation arrays identical to an earlier layer's are stored once,
        under ``/shared``, and hard-linked: readers see an ordinary dataset."""
        check_plan(pack.stages, pack.out_stages)
        at = f"{LAYERS}/{pack.name}"
        self._file.group(at)
        arrays = pack.arrays()
        meta = layer_meta(pack, arrays)
        self._file.attrs({"meta": json.dumps(meta, sort_keys=True)}, at)
        kinds = {s.key: s.kind for s in (*pack.stages, *pack.out_stages)}
        located: dict[str, list[Any]] = {}
        for key, array in arrays.items():
            data = np.ascontiguousarray(array)
            kind = kinds.get(key)
            if kind is not None and kind.shareable:
                offset = self._share(at, key, (kind.name, data.shape, data.dtype.str, meta["crc32"][key]), data)
            else:
                offset = self._file.dataset(f"{at}/{key}", data)
            located[key] = [offset, data.dtype.str, list(data.shape)]
        # the index points at byte offsets: a dataset without contiguous storage has none
        whole = all(offset is not None for offset, _, _ in located.values())
        self._index[pack.name] = {"meta": meta, "datasets": located} if whole else None

    def _share(self, group: str, key: str, ident: tuple, data: np.ndarray) -> int | None:
        """Link the layer's dataset to an identical stored array, storing it first if new."""
        hit = self._shared.get(ident)
        if hit is None or not np.array_equal(hit[0], data):
            path = f"{SHARED}/{key}-{len(self._shared)}"
            self._file.dataset(path, data)
            hit = self._shared[ident] = (data, path)
        return self._file.link(f"{group}/{key}", hit[1])  # a hard link: read like the layer's own

    def finish(
        self,
        *,
        fingerprint_doc: dict[str, Any],
        config: dict[str, Any],
        provenance: dict[str, Any],
        tool_version: str,
        created_at: str,
    ) -> str:
        """The root attributes, then the seal; returns the fingerprint. The index is stored
        when every layer has an entry: a reader holding the sealed bytes then loads every
        layer from one attribute read and byte offsets, with no per-layer HDF5 call."""
        fingerprint = digest(fingerprint_doc)
        header = {
            **KIND.stamp(),
            "fingerprint": fingerprint,
            "fingerprint_json": canonical_json(fingerprint_doc),
            "config_json": json.dumps(config, sort_keys=True),
            "provenance_json": json.dumps(provenance, sort_keys=True),
            "tool_version": tool_version,
            "created_at": created_at,
        }
        if self._index and all(entry is not None for entry in self._index.values()):
            header[INDEX] = json.dumps({"layers": self._index}, sort_keys=True)
        self._file.attrs(header)
        self._file.group(LAYERS, exist_ok=True)
        self._file.seal()
        return fingerprint
