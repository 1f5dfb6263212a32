"""Where each method lives: its own file, plus the config contract when it has a field there
(``tools/who_names.py`` reads the code's identifiers and strings, not its prose)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from who_names import PATTERNS, code_words, naming_files, production_files

# fields, defaults and allowed values the runtime reads without the pipeline
CONTRACT = {"runtime/schema.py", "runtime/config_sections.py", "runtime/config_checks.py"}
HOMES = {
    "svd": "pipeline/rotations/svd.py",
    "hadamard": "pipeline/rotations/hadamard.py",
    "duquant": "pipeline/rotations/duquant.py",
    "none (rtn candidate)": "pipeline/rotations/base.py",
    "equalize": "pipeline/pretransforms.py",
    "smooth": "pipeline/pretransforms.py",
    "alpha": "pipeline/weightquant.py",
    "mse": "pipeline/weightquant.py",
    "gptq": "pipeline/weightquant.py",
}
# The RTN baseline is also what every quality record compares with (pack.rtn_figures, and
# embed.pack_embedding for tables).
ALSO = {"round_to_nearest": {"pipeline/weightquant.py", "pipeline/quantizer.py", "pipeline/embed.py"}}
# A stage kind is defined in stages.py and named besides only by the code that adds it.
KIND_PRODUCERS = {"runtime/stages.py", "pipeline/pretransforms.py", "pipeline/basis.py"}

METHODS = [(name, pattern) for group in PATTERNS.values() for name, pattern in group.items()]


@pytest.mark.parametrize(("name", "pattern"), METHODS, ids=[m for m, _ in METHODS])
def test_a_method_is_named_in_its_own_file_and_the_config_contract_only(name, pattern):
    found = set(naming_files(pattern, production_files()))
    if name in PATTERNS["stage kind"]:
        home = {"runtime/stages.py"}
        allowed = KIND_PRODUCERS | {f for f in found if f.startswith("pipeline/rotations/")}
    else:
        home = ALSO[name] if name in ALSO else {HOMES[name]}
        allowed = home | CONTRACT
    assert home & found, f"{name} is not named where it lives ({sorted(home)})"
    assert found <= allowed, f"{name} is also named in {sorted(found - allowed)}"


def test_prose_is_not_counted_but_strings_and_identifiers_are():
    words = code_words('"""svd in a docstring"""\n# svd in a comment\nx = svd_blocks("hadamard")\n')
    assert words.count('"hadamard"') == 1 and "svd_blocks" in words
    assert not any("docstring" in w or "comment" in w for w in words)
