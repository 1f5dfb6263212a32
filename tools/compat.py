"""`make test-compat`: the runtime's tests on the torch and transformers our users pin.

    python3 tools/compat.py                 # every target
    python3 tools/compat.py openpi lerobot  # some

One venv per target under .venv-compat/<target>, kept between runs (it is the wheel cache: the
registry's torch wheels for the older versions are CUDA builds, about 3 GB with their
dependencies, and run on the CPU here). A venv is rebuilt only when its target's pins change.
The tests are the runtime's, the transformers client's, the per-step and the compile tests:
what an eval environment exercises. The build pipeline installs beside them because the tests
build their own bundles. Not part of CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venv-compat"
TESTS = (
    "tests/test_runtime.py",
    "tests/test_stages.py",
    "tests/test_embedding.py",
    "tests/test_flowsteps.py",
    "tests/test_transformers_client.py",
    "tests/test_compile.py",
    "tests/test_pi0.py",
)


@dataclass(frozen=True)
class Target:
    name: str
    who: str
    pins: tuple[str, ...]
    constrained: bool = False  # install the rest of the set from constraints.txt (the dev set)


TARGETS = {
    t.name: t
    for t in (
        Target("openpi", "openpi's pins", ("torch==2.7.1", "transformers==4.53.2")),
        Target(
            "lerobot",
            "LeRobot's ceiling (torch<2.12, pi extra transformers<5.6)",
            ("torch==2.11.*", "transformers==5.5.*"),
        ),
        Target("dev", "the dev set (constraints.txt)", ("torch==2.13.0", "transformers"), constrained=True),
    )
}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def ensure_venv(target: Target) -> Path:
    """The target's venv, made or refreshed when its pins (or constraints.txt) changed."""
    venv = VENVS / target.name
    python = venv / "bin" / "python"
    wanted = "\n".join(target.pins)
    if target.constrained:
        wanted += "\n" + (ROOT / "constraints.txt").read_text()
    stamp = venv / ".compat-pins"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    run([sys.executable, "-m", "venv", "--clear", str(venv)])
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    extra = ["-c", str(ROOT / "constraints.txt")] if target.constrained else []
    # One resolve: the target's pins, the project with its build extra, pytest.
    run([str(python), "-m", "pip", "install", "-q", *extra, *target.pins, "-e", f"{ROOT}[build]", "pytest"])
    run([str(python), "-m", "pip", "check"])
    stamp.write_text(wanted)
    return python


def versions(python: Path) -> str:
    code = "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}')"
    return subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout.strip()


def test(target: Target) -> tuple[str, int, float, str]:
    start = time.perf_counter()
    python = ensure_venv(target)
    installed = versions(python)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    print(f"== {target.name}: {installed} ({target.who})", flush=True)
    rc = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env
    ).returncode
    return target.name, rc, time.perf_counter() - start, installed


def main(argv: list[str]) -> int:
    names = argv or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"test-compat: unknown target {unknown[0]!r}; the targets are {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    results = []
    try:
        for name in names:
            results.append(test(TARGETS[name]))
    except subprocess.CalledProcessError as err:
        print(f"test-compat: setting up {name!r} failed: {' '.join(err.cmd)} exited {err.returncode}", file=sys.stderr)
        return 1
    print("\ntarget    result  wall     versions")
    for name, rc, wall, installed in results:
        print(f"{name:<9} {'pass' if rc == 0 else 'FAIL':<7} {wall:6.0f} s  {installed}")
    return 0 if all(rc == 0 for _, rc, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
