"""Which production files name each method, pre-transform, weight quantizer and stage kind.

    python tools/who_names.py

A file "names" a method when its code matches the method's pattern below: an identifier (a
config field, a class, a function) or a string the code uses (a registry key, a message).
Comments and docstrings are prose about the code and are not counted; ``--prose`` counts
them too. Tests and the preset TOMLs are left out: they exercise and choose a method, they do
not implement it. "duquant" is also the project's name: only the method's own words count.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runtime", "pipeline")

PATTERNS: dict[str, dict[str, str]] = {
    "rotation": {
        "svd": r"(?i)\bsvd\b",
        "hadamard": r"(?i)hadamard",
        "duquant": r'^"duquant"$|^DuQuant$|greedy_rotation|balanced_zigzag',
        "none (rtn candidate)": r'NoRotation|NO_ROTATION|rtn_candidate|^"rtn"$',
    },
    "pre-transform": {
        "equalize": r"(?i)equaliz|\+eq",
        "smooth": r"(?i)smoothquant|smooth_alpha|smooth_search|^Smooth$|smoothing",
    },
    "weight quantizer": {
        "alpha": r'^"alpha"$|SEED_ALPHAS|seed_alpha',
        "mse": r"(?i)\bmse\b",
        "round_to_nearest": r"round_to_nearest|_absmax_rtn",
        "gptq": r"(?i)gptq",
    },
    "stage kind": {
        "scale": r'^"scale"$|^SCALE$|^Scale$',
        "perm": r'^"perm"$|^PERM$|^Perm$',
        "rotate": r'^"rotate"$|^ROTATE$|^Rotate$',
        "tiled_rotate": r"tiled_rotate|TILED_ROTATE|TiledRotate",
    },
}


def production_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def code_words(text: str) -> list[str]:
    """The identifiers and the (non-docstring) string constants of a module, one per item,
    strings in double quotes."""
    tree = ast.parse(text)
    docs = _docstrings(tree)
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            words.append(node.name)
        elif isinstance(node, ast.arg | ast.keyword) and node.arg:
            words.append(node.arg)
        elif isinstance(node, ast.alias):
            words.extend((node.asname or node.name).split("."))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            words.append(f'"{node.value}"')  # quoted: a string, not an identifier
    return words


def naming_files(pattern: str, files: list[Path], prose: bool = False) -> list[str]:
    regex = re.compile(pattern, re.MULTILINE)
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        searched = text if prose else "\n".join(code_words(text))
        if regex.search(searched):
            found.append(str(path.relative_to(ROOT)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prose", action="store_true", help="count comments and docstrings too")
    prose = parser.parse_args().prose
    files = production_files()
    for group, methods in PATTERNS.items():
        print(f"{group}:")
        for name, pattern in methods.items():
            found = naming_files(pattern, files, prose)
            print(f"  {name:22s} {len(found)}  {' '.join(found)}")


if __name__ == "__main__":
    main()
