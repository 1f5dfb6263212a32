"""Bundle fuzzing with a deadline per case: mutated files are read in a child process, so
that a reader hang (libhdf5 spinning on damaged metadata) fails instead of stalling.

``make_cases`` writes mutated copies of a bundle (zeroed runs of 1-4096 bytes, copied
blocks, bit flips, truncations; half of them aimed at HDF5 metadata, i.e. offsets outside
every dataset's payload) and random-byte files. ``run_cases`` feeds them to
``python tests/fuzz_reader.py`` (the child, ``main`` below) and returns each outcome:
``ok`` (a valid load), ``refused <BundleError subclass>``, ``crash ...`` (any other
exception: a bug), ``hang`` (past the deadline) or ``died <rc>`` (the process died).
Used by tests/test_refusals.py (~100 cases) and bench/fuzz.py (1000).
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import torch

KINDS = ("zero", "copy", "flip", "truncate")


def payload_ranges(path: Path) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []

    def visit(_: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            offset = obj.id.get_offset()
            if offset is not None:
                ranges.append((offset, offset + obj.id.get_storage_size()))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    return sorted(ranges)


def make_cases(bundle: Path, out: Path, n: int, seed: int, random_files: int = 10) -> list[tuple[str, Path]]:
    data = bundle.read_bytes()
    size = len(data)
    covered = np.zeros(size, dtype=bool)
    for lo, hi in payload_ranges(bundle):
        covered[lo:hi] = True
    metadata = np.flatnonzero(~covered)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        aimed = (i // len(KINDS)) % 2 == 0  # every kind, half aimed at metadata
        pos = int(rng.choice(metadata)) if aimed else int(rng.integers(0, size))
        mutated = bytearray(data)
        if kind == "zero":
            length = int(rng.integers(1, 4097))
            mutated[pos : pos + length] = bytes(len(mutated[pos : pos + length]))
        elif kind == "copy":
            length = int(rng.integers(1, 4097))
            src = int(rng.integers(0, size))
            block = data[src : src + length]
            mutated[pos : pos + len(block)] = block[: size - pos]
        elif kind == "flip":
            for _ in range(int(rng.integers(1, 9))):
                p = int(rng.choice(metadata)) if aimed else int(rng.integers(0, size))
                mutated[p] ^= 1 << int(rng.integers(0, 8))
        else:
            mutated = mutated[:pos]
        path = out / f"case{i:04d}-{kind}{'-meta' if aimed else ''}.h5"
        path.write_bytes(bytes(mutated))
        cases.append((f"{kind}{'/metadata' if aimed else ''}", path))
    for j in range(random_files):
        path = out / f"random{j:03d}.h5"
        path.write_bytes(rng.integers(0, 256, size=int(rng.integers(0, 4097)), dtype=np.uint8).tobytes())
        cases.append(("random", path))
    return cases


def _reader(stream: object, lines: queue.Queue) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.strip())
    lines.put(None)


def _start(spec: dict) -> tuple[subprocess.Popen, queue.Queue]:
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    proc.stdin.write(json.dumps(spec) + "\n")  # type: ignore[union-attr]
    proc.stdin.flush()  # type: ignore[union-attr]
    if lines.get(timeout=120) != "ready":
        raise RuntimeError("the fuzz child did not start")
    return proc, lines


def run_cases(cases: list[tuple[str, Path]], spec: dict, deadline: float = 20.0) -> list[tuple[str, str, float]]:
    """(kind, outcome, seconds) per case; ``spec`` = {"layers": {name: [out, in, bias]}, "tensors": npz path}."""
    results = []
    proc, lines = _start(spec)
    try:
        for kind, path in cases:
            start = time.perf_counter()
            proc.stdin.write(f"{path}\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            try:
                outcome = lines.get(timeout=deadline)
            except queue.Empty:
                outcome = "hang"
            if outcome is None:
                outcome = f"died {proc.wait()}"
            results.append((kind, outcome, time.perf_counter() - start))
            if outcome == "hang" or outcome.startswith("died"):
                proc.kill()
                proc.wait()
                proc, lines = _start(spec)
    finally:
        proc.kill()
        proc.wait()
    return results


def linear_tree(layers: dict[str, list], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A module tree holding one nn.Linear per dotted name ({name: [out, in, bias]}), or an
    nn.Embedding of out rows where a fourth item is true."""
    model = torch.nn.Module()
    for name, (out, inp, bias, *table) in layers.items():
        parent = model
        *parents, leaf = name.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        kind = torch.nn.Embedding(out, inp, dtype=dtype) if table and table[0] else None
        parent.add_module(leaf, kind or torch.nn.Linear(inp, out, bias=bias, dtype=dtype))
    return model


def main() -> None:
    """The child: read the spec, then one file path a line; print one outcome a line."""
    from duquant_runtime import load_bundle
    from duquant_runtime.bundle import BundleReader
    from duquant_runtime.bundle_checks import integrity_problems
    from duquant_runtime.errors import BundleError

    spec = json.loads(sys.stdin.readline())
    tensors = dict(np.load(spec["tensors"]))
    print("ready", flush=True)
    for line in sys.stdin:
        model = linear_tree(spec["layers"])
        model.load_state_dict({k: torch.from_numpy(v).float() for k, v in tensors.items()})
        path = line.strip()
        try:
            with BundleReader(path) as reader:
                integrity_problems(reader)
            load_bundle(model, path, verify="signature")
            print("ok", flush=True)
        except BundleError as exc:
            print(f"refused {type(exc).__name__}", flush=True)
        except Exception as exc:
            print(f"crash {type(exc).__name__}: {str(exc)[:200]}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
