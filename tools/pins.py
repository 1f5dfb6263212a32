"""The pinned dev set, constraints.txt: write it from a venv, and check a venv against it.

    .venv/bin/python tools/pins.py check constraints.txt [--exact]   # make install runs this
    <scratch venv>/bin/python tools/pins.py freeze > constraints.txt  # make constraints runs this

Run it with the venv's own python: it reads that venv. ``freeze`` prints ``pip freeze --all``
(pip and setuptools included: torch needs setuptools) without the project and without local
version labels (``torch==2.13.0+cpu`` is pinned as ``torch==2.13.0``, which pip matches to the
local CPU wheel). ``check`` fails when a pinned package is missing or at another version, when
a package the project's ``[dev]`` set needs is not pinned (the pins went stale), or when a pin is
no longer needed; ``--exact`` also fails on packages installed by hand (``make mutants``'s mutmut).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "duquant-packs"
ROOTS = ((PROJECT, frozenset({"dev"})), ("pip", frozenset()))  # what the dev venv is for
HEADER = """\
# The dev/CI set, pinned: `make install` installs '.[dev]' with `pip install -c constraints.txt`
# and fails when .venv differs from these lines (tools/pins.py check). pyproject.toml keeps the
# ranges users install from; `make test-compat` tests them on openpi's and LeRobot's pins.
# Bump on purpose, never by hand: `make constraints` writes this file from a fresh resolve of
# torch==2.13.0 + '.[dev]' in a scratch venv; then `make test` and `make test-compat`, and
# commit the diff. torch is the CPU wheel 2.13.0+cpu, pinned without its local label.
"""


def freeze_lines() -> list[str]:
    """This venv's ``name==version`` lines, without the project and without local labels."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = []
    for line in out.splitlines():
        name, _, version = line.partition("==")
        if version and canonicalize_name(name) != PROJECT:
            lines.append(f"{name}=={Version(version).public}")
    return lines


def read_pins(path: Path) -> dict[str, str]:
    """constraints.txt as canonical name -> version."""
    pins = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """This venv's distributions as canonical name -> public version, without the project."""
    found = {}
    for line in freeze_lines():
        name, _, version = line.partition("==")
        found[canonicalize_name(name)] = version
    return found


def needed() -> set[str]:
    """Every distribution the roots need, transitively, under this interpreter's markers."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = list(ROOTS)
    names: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        names.add(name)
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue  # reported as missing (if pinned) or by pip check
        for req in map(Requirement, requires):
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return names - {PROJECT}


def problems(pins: dict[str, str], have: dict[str, str], need: set[str], exact: bool) -> list[str]:
    """What differs between the venv and the pins, one line each."""
    out = [f"{n}: pinned {v}, installed {have[n]}" for n, v in pins.items() if n in have and have[n] != v]
    out += [f"{n}: pinned {v}, not installed" for n, v in pins.items() if n not in have]
    out += [f"{n}: installed {have[n]} and needed, not pinned" for n in sorted(need & have.keys() - pins.keys())]
    out += [f"{n}: pinned {pins[n]}, no longer needed" for n in sorted(pins.keys() - need) if n in have]
    extra = sorted(have.keys() - pins.keys() - need)
    if exact:
        out += [f"{n}: installed {have[n]}, not pinned" for n in extra]
    elif extra:
        print(f"pins: also installed, not part of the dev set: {', '.join(extra)}", file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("freeze", help="print constraints.txt for this venv")
    check = sub.add_parser("check", help="compare this venv with a constraints file")
    check.add_argument("constraints", type=Path)
    check.add_argument("--exact", action="store_true", help="also fail on packages outside the dev set")
    args = parser.parse_args()
    if args.command == "freeze":
        print(HEADER + "\n".join(freeze_lines()))
        return 0
    found = problems(read_pins(args.constraints), installed(), needed(), args.exact)
    for line in found:
        print(f"pins: {line}", file=sys.stderr)
    if found:
        print(f"pins: {sys.prefix} differs from {args.constraints}: `rm -rf .venv && make install`", file=sys.stderr)
        print("pins: or, to move the pins on purpose, `make constraints`", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
