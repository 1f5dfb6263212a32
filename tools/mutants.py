"""Mutation testing of the modules that guard users (`make mutants`; not part of CI).

mutmut names a mutant after its file's path, and our import names differ from our folder
names (``runtime/`` is ``duquant_runtime``). So the run happens in ``build/mutation``, a
copy laid out as ``src/duquant_runtime`` + ``src/duquant_pipeline`` + ``tests``, where the
names agree. Afterwards one line per module: mutants, killed, survived, score; then every
survivor's name (``cd build/mutation && mutmut show NAME`` prints its diff).
See docs/mutation.md for how to read the result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "mutation"
FIXTURE_CACHE = "DUQUANT_TEST_FIXTURE_CACHE"  # read by tests/conftest.py

# The modules that guard users, and the tests that cover them.
MODULES = [
    "duquant_runtime/bundle_checks.py",  # config comparison and the loader's integrity checks
    "duquant_runtime/h5file.py",  # seal and container
    "duquant_runtime/crc.py",  # the seal's crc32, combined across threads
    "duquant_runtime/atomic.py",  # temp names, their owners, the rename
    "duquant_runtime/prefix.py",  # the loader's module-prefix detection
    "duquant_runtime/env.py",  # OPENPI_DUQUANT_* -> config
    "duquant_runtime/actquant.py",  # activation quantization
    "duquant_runtime/calibration.py",  # static-scale calibration
    "duquant_runtime/fingerprint.py",  # fingerprint document and digest
]
TESTS = [
    "tests/test_guards.py",
    "tests/test_env.py",
    "tests/test_seal_fingerprint.py",
    "tests/test_act_scales_file.py",
    "tests/test_checks_prefix.py",
    "tests/test_refusals.py",
    "tests/test_bundle_io.py",
    "tests/test_runtime.py",
    "tests/test_first_hour.py",
    "tests/test_prefix.py",
]
MUTMUT_CONFIG = """
[tool.mutmut]
source_paths = ["src"]
# One fork server forks each mutant's run: the tests start loky and Dask workers, and
# plain fork mode reaps their exits as if they were mutants.
process_isolation = "forkserver"
timeout_multiplier = 5.0
timeout_constant = 5.0
only_mutate = {modules}
pytest_add_cli_args_test_selection = {tests}
pytest_add_cli_args = {pytest_args}

[tool.pytest.ini_options]
addopts = "-ra"
markers = ["slow: multi-second end-to-end tests"]
"""


# Tests left out of the mutation run, by the words in their names:
# - mutmut's trampolines read a ContextVar, which torch.compile(fullgraph=True) cannot trace;
# - these run the CLI in a fresh interpreter, which imports the installed, unmutated package,
#   so no mutant can reach them;
# - these are end-to-end builds of over a second each, run for every mutant of the functions
#   they cover (the seal, the fingerprint): the run would take an hour, and the fast tests
#   beside them check the same lines (the survivors listed after a run say where they do not).
DESELECTED = [
    "torch_compile",
    *("concurrent_builds", "ctrl_c", "sigterm"),
    *("nan_weight", "prefixed_checkpoint_builds", "prefix_leaves_the_fingerprint", "fuzz_mutated"),
    *("one_quality_line_per_component", "calibrate_save_and_reload", "enable_from_env_bundle_and_packdir"),
]
PYTEST_ARGS = ["-p", "no:cacheprovider", "-q", "-k", " and ".join(f"not {name}" for name in DESELECTED)]
# One thread per mutant run: two runs share the two cores, and OpenMP's busy-waiting threads
# would spend the CPU-time budget mutmut gives each run. The fixture cache lets every run
# reuse the demo checkpoint and bundles the first, unmutated session built (tests/conftest.py).
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def stage(modules: list[str]) -> None:
    """A fresh copy of the sources under their import names, plus the tests and a config."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    shutil.copytree(ROOT / "runtime", STAGE / "src" / "duquant_runtime", ignore=ignore)
    shutil.copytree(ROOT / "pipeline", STAGE / "src" / "duquant_pipeline", ignore=ignore)
    shutil.copytree(ROOT / "tests", STAGE / "tests", ignore=ignore)
    config = MUTMUT_CONFIG.format(  # a TOML array of strings is a JSON one
        modules=json.dumps([f"src/{m}" for m in modules]),
        tests=json.dumps(TESTS),
        pytest_args=json.dumps(PYTEST_ARGS),
    )
    (STAGE / "pyproject.toml").write_text(config)


def results() -> dict[str, str]:
    """mutant name -> status, from ``mutmut results --all true``."""
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=STAGE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(re.findall(r"^\s+(\S+): (.+)$", out, flags=re.M))


def module_of(mutant: str) -> str:
    dotted = [m[: -len(".py")].replace("/", ".") for m in MODULES]
    return next((d for d in dotted if mutant.startswith(d + ".")), "?")


def report(status_by_mutant: dict[str, str]) -> list[str]:
    counts: dict[str, Counter] = defaultdict(Counter)
    for mutant, status in status_by_mutant.items():
        counts[module_of(mutant)][status] += 1
    lines = [f"{'module':34} {'mutants':>7} {'killed':>6} {'survived':>8} {'other':>5} {'score':>6}"]
    for module in sorted(counts):
        c = counts[module]
        total = sum(c.values())
        killed = c["killed"] + c["timeout"]
        other = total - killed - c["survived"]
        lines.append(f"{module:34} {total:7} {killed:6} {c['survived']:8} {other:5} {100 * killed / total:5.1f}%")
    survivors = sorted(m for m, s in status_by_mutant.items() if s != "killed" and s != "timeout")
    lines.append(f"{len(survivors)} not killed (cd build/mutation && ../../.venv/bin/mutmut show NAME):")
    lines += [f"  {m}: {status_by_mutant[m]}" for m in survivors]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--report-only", action="store_true", help="summarize the last run in build/mutation")
    parser.add_argument(
        "--module", action="append", choices=[Path(m).stem for m in MODULES], help="only this module (repeatable)"
    )
    args = parser.parse_args()
    if not args.report_only:
        stage([m for m in MODULES if not args.module or Path(m).stem in args.module])
        run = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.jobs)]
        env = {**os.environ, **RUN_ENV, FIXTURE_CACHE: str(STAGE / "fixtures")}
        if subprocess.run(run, cwd=STAGE, env=env).returncode != 0:
            print("mutmut run failed; its output is above.", file=sys.stderr)
            return 1
    print("\n".join(report(results())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
