"""The README is the user's manual: short, its links resolve, and what it shows still runs.

Every relative link of README.md and docs/*.md points at a file (and, with an anchor, at one
of its headings); every `duquant-packs <command>` and `make <target>` the README shows exists,
with the options it shows; every python block in README.md and docs/ compiles and imports
names that exist. The README's python blocks are then run as written, on a two-layer
checkpoint under pi0.5's LLM names: only the paths (`artifacts/<cfg>/<cfg>-<fp12>.h5`) are
filled in, and openpi and LeRobot are stand-ins that hand over a plain torch model.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight, write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_pipeline.cli import main
from duquant_runtime.calibration import static_layers
from duquant_runtime.config import from_dict, resolve
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"\bduquant-packs\s+([a-z][a-z-]*)")
MAKE = re.compile(r"\bmake\s+([a-z][\w-]*)")
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")
BUNDLE_PATH = re.compile(r"artifacts/(\w+)/\1-<fp12>\.h5")


def blocks(text: str, lang: str | None = None) -> list[str]:
    return [src for tag, src in FENCE.findall(text) if lang is None or tag == lang]


def prose(text: str) -> str:
    return FENCE.sub("", text)


def code_lines(text: str) -> list[str]:
    """Every line of a fenced block, and every inline code span of the prose."""
    return [line for src in blocks(text) for line in src.splitlines()] + INLINE.findall(prose(text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(md.read_text()), re.M)}


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move details to docs/"


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(md):
    broken = []
    for target in LINK.findall(prose(md.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (md.parent / path).resolve() if path else md
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    assert not broken, f"{md.name}: " + "; ".join(broken)


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in LINK.findall(prose(README.read_text()))}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked]


def commands_shown(md: Path) -> dict[str, set[str]]:
    """Each `duquant-packs <command>` in the page's code, with the options shown on its line."""
    shown: dict[str, set[str]] = {}
    for line in code_lines(md.read_text()):
        for m in COMMAND.finditer(line):
            rest = line[m.end() :].split(" # ")[0]
            shown.setdefault(m.group(1), set()).update(OPTION.findall(rest))
    return shown


def test_the_readme_shows_every_command():
    assert set(commands_shown(README)) == set(main.commands), (
        "the README's CLI overview shows every command, only those"
    )


@pytest.mark.parametrize("md", [README, *DOCS], ids=lambda p: p.name)
def test_every_command_shown_exists_with_its_options(md):
    for name, options in sorted(commands_shown(md).items()):
        assert name in main.commands, f"{md.name} shows `duquant-packs {name}`, which is not a command"
        command = main.commands[name]
        known = {"-h", "--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        assert options <= known, f"{md.name}: duquant-packs {name} has no option {sorted(options - known)}"
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0, result.output


def test_every_make_target_the_readme_shows_exists():
    targets = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    shown = {t for line in code_lines(README.read_text()) for t in MAKE.findall(line)}
    assert {"packs", "test"} <= shown <= targets, sorted(shown - targets)


PY_BLOCKS = [(md.name, i, src) for md in (README, *DOCS) for i, src in enumerate(blocks(md.read_text(), "python"))]


@pytest.mark.parametrize(("doc", "index", "src"), PY_BLOCKS, ids=[f"{d}-{i}" for d, i, _ in PY_BLOCKS])
def test_python_blocks_compile_and_import_names_that_exist(doc, index, src):
    compile(src, doc, "exec")
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("duquant_"):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"{doc} block {index}: {node.module} has no {missing}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("duquant_"):
                    importlib.import_module(alias.name)


# ---------------------------------------------------------------- running the README's blocks

MLP = "paligemma_with_expert.paligemma.model.language_model.layers.0.mlp"
WIDTHS = {"up_proj": (48, 64), "down_proj": (64, 40)}  # in, out


EXPERT_MLP = "paligemma_with_expert.gemma_expert.model.layers.0.mlp"  # what dit_w4a4 selects
EXPERT_WIDTHS = {"up_proj": (16, 32), "down_proj": (32, 16)}


def tiny_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tensors = {f"{MLP}.{n}.weight": outlier_weight(rng, out, inp) for n, (inp, out) in WIDTHS.items()}
    tensors[f"{MLP}.down_proj.bias"] = rng.standard_normal(WIDTHS["down_proj"][1])
    tensors.update({f"{EXPERT_MLP}.{n}.weight": outlier_weight(rng, o, i) for n, (i, o) in EXPERT_WIDTHS.items()})
    return tensors


class TinyPi05(nn.Module):
    """Two Linears under pi0.5's LLM names, holding the checkpoint's weights: x -> up -> down;
    two under the expert's, run by openpi's denoising loop (``sample_actions``)."""

    def __init__(self) -> None:
        super().__init__()
        for path, widths in ((MLP, WIDTHS), (EXPERT_MLP, EXPERT_WIDTHS)):
            parent: nn.Module = self
            for part in path.split("."):
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            for name, (inp, out) in widths.items():
                parent.add_module(name, nn.Linear(inp, out, bias=path == MLP and name == "down_proj"))
        self.load_state_dict({k: torch.from_numpy(v).float() for k, v in tiny_tensors().items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The LLM's layers on x, and one expert step on its first channels (a full preset's capture)."""
        mlp = self.get_submodule(MLP)
        expert = self.get_submodule(EXPERT_MLP)
        expert.down_proj(expert.up_proj(x[:, : EXPERT_WIDTHS["up_proj"][0]]))
        return mlp.down_proj(mlp.up_proj(x))

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        mlp = self.get_submodule(EXPERT_MLP)
        return mlp.down_proj(mlp.up_proj(x_t * (1 + timestep[:, None, None]) + past_key_values))

    @torch.no_grad()
    def sample_actions(self, device: str, observation: torch.Tensor, num_steps: int = 10) -> torch.Tensor:
        dt, time, x_t = torch.tensor(-1.0 / num_steps), torch.tensor(1.0), torch.zeros_like(observation)
        while time >= -dt / 2:  # openpi's loop
            x_t = x_t + dt * self.denoise_step(None, None, observation, x_t, time.expand(observation.shape[0]))
            time += dt
        return x_t


class Policy:
    """An openpi policy's shape: the model in `_model` (the README's first block says `.model`)."""

    def __init__(self) -> None:
        self.model = self._model = TinyPi05()


class PI05Policy(nn.Module):
    """LeRobot's shape: the pi0.5 tree is the policy's `model` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyPi05()

    @classmethod
    def from_pretrained(cls, name: str) -> PI05Policy:
        return cls()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder laid out as the README assumes: the checkpoint, and artifacts/<cfg>/<cfg>-<fp12>.h5."""
    root = tmp_path_factory.mktemp("readme")
    ckpt = write_checkpoint(root / "ckpt" / "model.safetensors", tiny_tensors())
    static = from_dict({"name": "static", "base": "llm_w4a8", "quant": {"act_mode": "per_channel_static"}})
    bundles = {
        cfg.name: build_bundle(cfg, ckpt, root / "artifacts", jobs=1).path
        for cfg in (resolve("llm_w4a8"), resolve("full_w4a8"), resolve("dit_w4a4"), static)
    }
    return root, ckpt, bundles


def stand_in(monkeypatch, name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


README_PY = blocks(README.read_text(), "python")


@pytest.mark.parametrize("src", README_PY, ids=[f"README-{i}" for i in range(len(README_PY))])
def test_the_readme_python_blocks_run(src, site, monkeypatch, capsys):
    root, ckpt, bundles = site
    monkeypatch.chdir(root)
    for var in [v for v in os.environ if v.startswith("OPENPI_DUQUANT_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OPENPI_DUQUANT_BUNDLE", str(bundles["full_w4a8"]))  # for enable_from_env
    policy_config = stand_in(
        monkeypatch, "openpi.policies.policy_config", create_trained_policy=lambda *args, **kwargs: Policy()
    )
    stand_in(monkeypatch, "openpi")
    stand_in(monkeypatch, "openpi.policies", policy_config=policy_config)
    pi05 = stand_in(monkeypatch, "lerobot.policies.pi05", PI05Policy=PI05Policy)
    stand_in(monkeypatch, "lerobot")
    stand_in(monkeypatch, "lerobot.policies", pi05=pi05)

    def bundle_for(m: re.Match) -> str:
        assert m.group(1) in bundles, f"the README loads a {m.group(1)} bundle; build one in the fixture"
        return str(bundles[m.group(1)])

    code = BUNDLE_PATH.sub(bundle_for, src)
    batches = [torch.randn(4, WIDTHS["up_proj"][0], generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ns = {
        "__name__": "readme",
        "torch": torch,
        "policy": Policy(),
        "model": TinyPi05(),
        "other_model": TinyPi05(),
        "bundle": str(bundles["static"]),  # the calibration block's: quant.act_mode = "per_channel_static"
        "calibration_batches": batches,
        "calibration_observations": [torch.randn(2, 5, EXPERT_WIDTHS["up_proj"][0]) for _ in range(2)],
        "train_config": None,
        "checkpoint_dir": None,
    }
    exec(compile(code, "README.md", "exec"), ns)
    printed = capsys.readouterr().out

    if "report" in ns:  # a load: every layer replaced, and the report printed
        assert ns["report"].replaced and str(ns["report"]) in printed
        if "names under 'model.' (detected)" in src:
            assert "names under 'model.' (detected)" in printed
    if "calibrate(" in src:  # scales saved, and loaded next time without calibration
        layers = static_layers(ns["other_model"])
        assert layers and all(m.act_calibrated for m in layers.values())
        assert ns["other_model"](batches[0]).isfinite().all()
    for then in re.findall(r"#\s*then:\s*(duquant-packs .+)$", src, re.M):  # the command the block ends with
        args = [str(ckpt) if a == "CKPT" else a for a in shlex.split(then)[1:]]
        result = CliRunner().invoke(main, [*args, "-q"])
        assert result.exit_code == 0, result.output
        assert Path(result.stdout.strip().splitlines()[-1]).is_file()
