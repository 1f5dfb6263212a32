from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


def outlier_weight(rng: np.random.Generator, out: int, inp: int, heavy: int = 3) -> np.ndarray:
    w = rng.standard_normal((out, inp)) / np.sqrt(inp)
    cols = rng.choice(inp, size=min(heavy, inp), replace=False)
    w[:, cols] *= rng.uniform(8, 30, size=cols.size)
    return w


def write_checkpoint(path: Path, tensors: dict[str, np.ndarray], dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint written by the official safetensors library (independent of our writer)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.from_numpy(np.asarray(v, dtype=np.float32)).to(dtype).contiguous() for k, v in tensors.items()},
        str(path),
    )
    return path


# Set by tools/mutants.py: every mutant gets its own pytest session, and rebuilding the demo
# checkpoint and bundles in each would cost more than its tests. The first session (mutmut's
# unmutated run) builds them here; later sessions reuse them, so mutated code is tested
# against inputs built by the real code.
FIXTURE_CACHE = "DUQUANT_TEST_FIXTURE_CACHE"


def session_dir(tmp_path_factory: pytest.TempPathFactory, name: str, fill: Callable[[Path], object]) -> Path:
    """A directory ``fill`` has filled: a fresh temp one, or the cached one when a cache is set."""
    cache = os.environ.get(FIXTURE_CACHE)
    if not cache:
        out = tmp_path_factory.mktemp(name)
        fill(out)
        return out
    final = Path(cache) / name
    if not final.exists():
        scratch = Path(cache) / f".{name}.{os.getpid()}"
        fill(scratch)
        os.replace(scratch, final)  # whole or absent: a session stopped halfway leaves no half-built cache
    return final


@pytest.fixture(scope="session")
def demo_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from duquant_pipeline.checkpoint import MODEL_NAME
    from duquant_pipeline.demo import write_demo_checkpoint

    return session_dir(tmp_path_factory, "demo", write_demo_checkpoint) / MODEL_NAME


DEMO_BUNDLE_CONFIGS = ("llm_w4a8", "dit_w4a8", "full_w4a8")


@pytest.fixture(scope="session")
def demo_bundles(demo_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Demo bundles for the configs the runtime and fingerprint tests use."""
    from duquant_pipeline.build import build_bundle
    from duquant_runtime.config import resolve

    def fill(out: Path) -> None:
        for name in DEMO_BUNDLE_CONFIGS:
            build_bundle(resolve(name), demo_ckpt, out, jobs=2)

    out = session_dir(tmp_path_factory, "bundles", fill)
    return {name: next((out / name).glob(f"{name}-*.h5")) for name in DEMO_BUNDLE_CONFIGS}


def start_build_and_wait_for_temp(
    config: str, ckpt: Path, out: Path, jobs: int, extra: tuple[str, ...] = ()
) -> subprocess.Popen:
    """Start `duquant-packs build` in its own process group; return once it writes its temp file."""
    cmd = [
        sys.executable,
        "-m",
        "duquant_pipeline.cli",
        "build",
        "-c",
        config,
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--jobs",
        str(jobs),
        "-q",
        *extra,
    ]
    # A foreground command: Ctrl-C is SIGINT's default. (Run from a background job of a
    # non-interactive shell, pytest itself starts with SIGINT ignored, and children inherit that.)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list((out / config).glob(".*.tmp")):
        time.sleep(0.05)
    assert list((out / config).glob(".*.tmp")), "the build never started writing"
    time.sleep(0.3)
    return proc
