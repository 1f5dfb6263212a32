"""Reading (and streaming out) safetensors checkpoints without building a model.

The safetensors format is an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets) and the raw tensor bytes. We parse the header
ourselves: it lets us validate with one clear sentence, read bf16 without torch,
hash raw bytes, and write multi-GB files one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from duquant_runtime.errors import DuQuantError

INDEX_NAME = "model.safetensors.index.json"
MODEL_NAME = "model.safetensors"
_MAX_HEADER = 512 * 1024 * 1024
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class CheckpointError(DuQuantError):
    """The checkpoint is missing, unreadable, not safetensors, or holds unusable values."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path} is not a safetensors file (header length {n} is impossible for a {size}-byte file)"
                )
            raw = fh.read(n)
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON)") from None
    data_start = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(d) for d in meta["shape"]), meta["data_offsets"]
            itemsize = _ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is not a valid safetensors file (bad entry for {name!r})") from None
        if end - begin != math.prod(shape) * itemsize or begin < 0 or data_start + end > size:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} does not fit its bytes")
        out[name] = TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
    return out


class Checkpoint:
    """The tensors of one checkpoint: a .safetensors file, a directory, or a sharded index."""

    def __init__(self, path: Path, files: list[Path], tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.files = files
        self.tensors = tensors

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if path.is_dir():
            if (path / MODEL_NAME).is_file():
                return cls._single(path / MODEL_NAME)
            if (path / INDEX_NAME).is_file():
                return cls._sharded(path / INDEX_NAME)
            raise CheckpointError(f"{path} holds neither {MODEL_NAME} nor {INDEX_NAME}")
        if path.name.endswith(".index.json"):
            return cls._sharded(path)
        return cls._single(path)

    @classmethod
    def _single(cls, file: Path) -> Checkpoint:
        return cls(file, [file], _read_header(file))

    @classmethod
    def _sharded(cls, index: Path) -> Checkpoint:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map)") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (index.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"sharded checkpoint {index} points at missing shard(s): {', '.join(missing)}")
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            tensors.update(_read_header(index.parent / shard))
        absent = [n for n in weight_map if n not in tensors]
        if absent:
            raise CheckpointError(
                f"sharded checkpoint {index} lists {len(absent)} tensor(s) its shards lack, e.g. {absent[0]!r}"
            )
        return cls(index, [index.parent / s for s in shards], tensors)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 array, exactly as stored."""
        info = self.tensors[name]
        try:
            with info.file.open("rb") as fh:
                fh.seek(info.offset)
                data = fh.read(info.nbytes)
        except OSError as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {exc}") from None
        if len(data) != info.nbytes:
            raise CheckpointError(f"{info.file} is truncated: tensor {name!r} is incomplete")
        return np.frombuffer(data, dtype=np.uint8)

    def read(self, name: str, dtype: type = np.float64) -> np.ndarray:
        """A floating tensor, converted (exactly) to ``dtype``."""
        info = self.tensors[name]
        raw = self.raw(name)
        if info.dtype == "BF16":
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info.dtype in ("F16", "F32", "F64"):
            values = raw.view({"F16": np.float16, "F32": np.float32, "F64": np.float64}[info.dtype])
        else:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}; only floating tensors can be packed")
        return values.reshape(info.shape).astype(dtype, copy=False)

    def sha256(self, name: str) -> str:
        return hashlib.sha256(memoryview(self.raw(name))).hexdigest()

    def provenance(self) -> dict[str, Any]:
        return {
            "checkpoint": str(self.path.resolve()),
            "files": [{"name": f.name, "bytes": f.stat().st_size} for f in self.files],
            "tensors": len(self.tensors),
        }


# ---------------------------------------------------------------- writing


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def write_safetensors(
    path: Path,
    specs: Iterable[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], Iterable[np.ndarray]],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
) -> None:
    """Stream a safetensors file: ``produce(name)`` yields the tensor's bytes in chunks.

    Only one chunk is in memory at a time, so a 7 GB checkpoint needs far less RAM.
    Written to a temp file and renamed, so a crash never leaves a half checkpoint.
    """
    specs = list(specs)
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * _ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tmp.open("wb") as fh:
            fh.write(struct.pack("<Q", len(blob)))
            fh.write(blob)
            for name, dtype, shape in specs:
                expected = math.prod(shape) * _ITEMSIZE[dtype]
                written = 0
                for chunk in produce(name):
                    data = memoryview(np.ascontiguousarray(chunk)).cast("B")
                    fh.write(data)
                    written += data.nbytes
                if written != expected:
                    raise RuntimeError(f"tensor {name}: produced {written} bytes, expected {expected}")
                if on_tensor:
                    on_tensor(name, written)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
