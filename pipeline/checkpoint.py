"""Reading safetensors checkpoints through the ``safetensors`` library (mmap, bf16 included),
and streaming multi-GB ones out one tensor at a time (which the library cannot do).

Every failure is one :class:`CheckpointError` sentence. The digest of a tensor is the
sha256 of its raw stored bytes, exactly as they are in the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from duquant_runtime.atomic import atomic_file
from duquant_runtime.errors import DuQuantError
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
MODEL_NAME = "model.safetensors"
ITEMSIZE = {  # bytes per element, by safetensors dtype name
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
# openpi's converter from its JAX/Orbax checkpoints (a params/ folder with _METADATA) to model.safetensors
CONVERTER = "examples/convert_jax_model_to_pytorch.py --checkpoint_dir {jax} --config_name <config> --output_path <dir>"


class CheckpointError(DuQuantError):
    """The checkpoint is missing, unreadable, not safetensors, or holds unusable values."""


HANDLE_BYTES = 32 << 20  # a file's safetensors handle is reopened after this many bytes read through it


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # the safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path


def _open(path: Path) -> Any:
    """The library's handle on one file (header parsed, data mmap'ed)."""
    try:
        return safe_open(path, framework="pt")
    except PermissionError:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory, not a safetensors file") from None
    except (SafetensorError, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a safetensors file, or is truncated ({detail})") from None


def _read_header(path: Path) -> dict[str, TensorInfo]:
    handle = _open(path)
    out: dict[str, TensorInfo] = {}
    for name in handle.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
        part = handle.get_slice(name)
        out[name] = TensorInfo(name, str(part.get_dtype()), tuple(int(d) for d in part.get_shape()), path)
    return out


class Checkpoint:
    """The tensors of one checkpoint: a .safetensors file, a directory, or a sharded index."""

    def __init__(self, path: Path, files: list[Path], tensors: dict[str, TensorInfo]) -> None:
        self.path = path
        self.files = files
        self.tensors = tensors
        self._handles: dict[Path, tuple[Any, int]] = {}  # file -> (open handle, bytes read through it)
        self._lock = threading.Lock()  # the build hashes on a thread while it reads

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
            raise CheckpointError(_no_model_file(path))
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

    def _tensor(self, name: str) -> torch.Tensor:
        """The tensor, through a handle that is replaced after HANDLE_BYTES read through it.

        A handle keeps every page it touched mapped (resident), so one handle for a whole
        build held ~5 GB of a 7 GB checkpoint; a handle per read costs ~1 ms, which was a
        quarter of a 7 M-weight build. Replacing it every HANDLE_BYTES bounds both."""
        info = self.tensors[name]
        try:
            with self._lock:
                handle, used = self._handles.get(info.file, (None, HANDLE_BYTES))
                if used >= HANDLE_BYTES:
                    handle = _open(info.file)
                    used = 0
                tensor = handle.get_tensor(name)
                self._handles[info.file] = (handle, used + tensor.numel() * tensor.element_size())
                return tensor
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {exc}") from None

    def read(self, name: str, dtype: type = np.float64) -> np.ndarray:
        """A floating tensor, converted (exactly) to ``dtype`` (float32 or float64)."""
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype}; only floating tensors can be packed")
        to = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
        return self._tensor(name).to(to).numpy()

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own dtype, no conversion)."""
        return self._tensor(name)

    def sha256(self, name: str) -> str:
        """sha256 of the tensor's raw stored bytes (little-endian, as in the file)."""
        raw = self._tensor(name).reshape(-1).view(torch.uint8).numpy()
        return hashlib.sha256(memoryview(raw)).hexdigest()

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
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as out, out.tmp.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, dtype, shape in specs:
            expected = math.prod(shape) * ITEMSIZE[dtype]
            written = 0
            for chunk in produce(name):
                data = memoryview(np.ascontiguousarray(chunk)).cast("B")
                fh.write(data)
                written += data.nbytes
            if written != expected:
                raise RuntimeError(f"tensor {name}: produced {written} bytes, expected {expected}")
            if on_tensor:
                on_tensor(name, written)


def _no_model_file(folder: Path) -> str:
    """Why a checkpoint folder cannot be read, naming what it does hold."""
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    head = f"{folder} holds neither {MODEL_NAME} nor {INDEX_NAME}"
    orbax = (folder / "params" / "_METADATA").is_file() or (folder / "_CHECKPOINT_METADATA").is_file()
    if orbax:
        return f"{head}: it is a JAX/Orbax checkpoint; convert it first with openpi's {CONVERTER.format(jax=folder)}"
    if found:
        listed = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        return f"{head}, but holds {listed}: pass the file itself as the checkpoint, e.g. {folder / found[0]}"
    return (
        f"{head}, nor any .safetensors file; a JAX/Orbax checkpoint must first be converted with openpi's "
        + CONVERTER.format(jax="<jax dir>")
    )
