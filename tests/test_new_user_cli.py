"""What a new user met on their own models (issue 40): a table rule that matched nothing, plot
paths, verify's exit codes, the lists and help, and the build's table line. The model is a small
tied-embedding Llama written by transformers' own ``save_pretrained``, which drops the tied
``lm_head.weight``."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_checkpoint
from duquant_pipeline.cli import main

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def cli(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def one_error(code: int, err: str) -> str:
    """The one stderr sentence of a refusal (exit 2), with no traceback."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    return lines[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tied 2-layer Llama saved by transformers, configs for it, and a bundle with its table
    (down_proj at 8 bits, so the bundle holds two bit widths)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    size = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, num_hidden_layers=2, tie_word_embeddings=True, **size))
    model.save_pretrained(root / "ckpt")
    configs = {
        "emb_head": 'name = "emb_head"\n[select]\nscope = "model.layers."\n[embed]\ninclude = "lm_head$"\n',
        "emb_typo": 'name = "emb_typo"\n[select]\nscope = "model.layers."\n[embed]\ninclude = "embed_token$"\n',
        "on_full": 'name = "on_full"\nbase = "full_w4a8"\n[select]\nscope = "model."\n',
        "emb": 'name = "emb"\n[select]\nscope = "model."\n[quant]\nweight_bits_by_pattern = { "down_proj$" = 8 }\n'
        '[embed]\ninclude = "embed_tokens$"\n',
    }
    paths = {"root": root, "ckpt": root / "ckpt"}
    for name, text in configs.items():
        paths[name] = root / f"{name}.toml"
        paths[name].write_text(text)
    code, out, err = cli("build", "-c", paths["emb"], "--ckpt", paths["ckpt"], "--out", root / "out", "-q")
    assert code == 0, err
    paths["bundle"], paths["build_err"] = Path(out.strip().splitlines()[-1]), root / "build_err.txt"
    paths["build_err"].write_text(err)
    return paths


# ---------------------------------------------------------------- 1: a table rule matching nothing


def test_save_pretrained_drops_the_tied_head(llama):
    from safetensors import safe_open

    with safe_open(str(llama["ckpt"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "emb_head",
            "error: embed.include 'lm_head$' matches no table; nearest: model.embed_tokens (a tied lm_head.weight "
            "is not saved: include the embedding it is tied to)",
        ),
        ("emb_typo", "error: embed.include 'embed_token$' matches no table; nearest: model.embed_tokens"),
    ],
)
def test_a_users_table_rule_matching_nothing_is_refused(llama, tmp_path, config, expected):
    for command in ("build", "list-layers"):
        extra = ("--out", tmp_path, "-q") if command == "build" else ()
        code, _, err = cli(command, "-c", llama[config], "--ckpt", llama["ckpt"], *extra)
        assert one_error(code, err) == expected
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_presets_table_rule_matching_nothing_is_said_and_the_build_goes_on(llama, tmp_path):
    note = (
        r"note: embed.include '(?:language_model\.embed_tokens|paligemma\.lm_head)$', a preset's rule for "
        "PaliGemma's token table, matches no table on this checkpoint: the bundle quantizes no embedding"
    )
    code, out, err = cli("build", "-c", llama["on_full"], "--ckpt", llama["ckpt"], "--out", tmp_path, "-q")
    assert code == 0, err
    assert note in err.splitlines() and "embedding " not in err
    code, listing, err = cli("list-layers", "-c", llama["on_full"], "--ckpt", llama["ckpt"])
    assert code == 0 and note in err.splitlines() and "embed_tokens" not in listing
    code, report, _ = cli("inspect", out.strip())
    lines = [line for line in report.splitlines() if line.startswith("embedding")]
    assert code == 0 and lines == [
        r"embedding    none: embed.include '(?:language_model\.embed_tokens|paligemma\.lm_head)$' matched no "
        "table in the checkpoint"
    ]


# ---------------------------------------------------------------- 8: the table's own summary line


def test_the_build_summary_gives_the_table_its_own_line(llama):
    lines = llama["build_err"].read_text().splitlines()
    quality = [line.strip() for line in lines if "SQNR" in line]
    assert len(quality) == 2, lines
    assert re.fullmatch(r"other +14 layers  weight SQNR mean [\d.]+ dB, worst [\d.]+  \(RTN: .*\)", quality[0])
    assert re.fullmatch(
        r"embedding    model\.embed_tokens  int8 \(per row\)  weight SQNR [\d.]+ dB \(RTN [\d.]+\)", quality[1]
    )


# ---------------------------------------------------------------- 2 and 8: inspect --plot


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (
            "/nonexistent/dir/x.png",
            "error: --plot /nonexistent/dir/x.png: there is no folder /nonexistent/dir; create it, or write the "
            "plot elsewhere",
        ),
        (
            "x.pdff",
            "error: --plot x.pdff: .pdff is not a picture format matplotlib writes; end the name with .png, .pdf "
            "or .svg",
        ),
        ("x", "error: --plot x: no suffix names its format; end the name with .png, .pdf or .svg"),
    ],
)
def test_inspect_plot_to_a_bad_path_is_one_sentence(llama, tmp_path, monkeypatch, where, expected):
    monkeypatch.chdir(tmp_path)  # matplotlib alone would write x.png for x: nothing may land here
    code, out, err = cli("inspect", llama["bundle"], "--plot", where)
    assert one_error(code, err) == expected and out == ""
    assert not any(tmp_path.iterdir())


def test_inspect_plot_says_where_and_draws_depths_bits_and_the_table(llama, tmp_path):
    from duquant_pipeline.plot import plot_report
    from duquant_pipeline.report import read_report

    picture = tmp_path / "q.svg"
    code, _, err = cli("inspect", llama["bundle"], "--plot", picture, "--json")
    assert code == 0 and err.strip() == f"plot written to {picture}" and picture.stat().st_size > 0
    fig = plot_report(read_report(llama["bundle"]), tmp_path / "q.png")
    layers_ax, table_ax = fig.axes
    assert [t for t in layers_ax.get_xticks() if layers_ax.get_xlim()[0] <= t <= layers_ax.get_xlim()[1]] == [0, 1]
    chosen = [c for c in layers_ax.collections if c.get_gid() == "chosen"]
    hollow = sum(len(c.get_offsets()) for c in chosen if len(c.get_facecolors()) == 0)
    assert sum(len(c.get_offsets()) for c in chosen) == 14 and hollow == 2  # the two 8-bit down_proj
    assert any(text.get_text().endswith("(w8)") for text in layers_ax.get_legend().get_texts())
    assert table_ax.get_title() == "embedding: 1 table(s)"
    assert [len(c.get_offsets()) for c in table_ax.collections if c.get_gid() == "table"] == [1]


# ---------------------------------------------------------------- 3: verify's exit codes


@pytest.fixture(scope="module")
def verify_cases(llama, tmp_path_factory) -> dict[str, list[object]]:
    """verify's arguments per case."""
    root = tmp_path_factory.mktemp("verify")
    other = write_checkpoint(root / "other" / "model.safetensors", {"net.fc.weight": [[1.0, 2.0], [3.0, 4.0]]})
    (root / "empty").mkdir()
    (root / "notes.h5").write_text("not a bundle")
    data = llama["bundle"].read_bytes()
    (root / "cut.h5").write_bytes(data[: len(data) // 2])
    (root / "w8.toml").write_text('name = "emb"\nbase = "' + str(llama["emb"]) + '"\n[quant]\nweight_bits = 8\n')
    relatives = root / "relatives"  # the same names, other weights
    shutil.copytree(llama["ckpt"], relatives)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(relatives / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"] * 2
    save_file(tensors, str(relatives / "model.safetensors"))
    b = llama["bundle"]
    return {
        "intact": [b],
        "matching": [b, "-c", llama["emb"], "--ckpt", llama["ckpt"]],
        "damaged": [root / "cut.h5"],
        "not a bundle": [root / "notes.h5"],
        "another config": [b, "-c", root / "w8.toml"],
        "other weights": [b, "--ckpt", relatives],
        "another checkpoint": [b, "-c", llama["emb"], "--ckpt", other.parent],
        "no such bundle": [root / "nope.h5"],
        "no bundle in the folder": [root / "empty"],
        "unreadable config": [b, "-c", root / "nope.toml"],
        "no such checkpoint": [b, "--ckpt", root / "nowhere"],
    }


# (case, exit code, a phrase docs/configuration.md's exit-code table says for that code)
VERIFY_CODES = [
    ("intact", 0, "intact"),
    ("matching", 0, "matches"),
    ("damaged", 1, "damaged"),
    ("not a bundle", 1, "not a bundle"),
    ("another config", 1, "another config"),
    ("other weights", 1, "other weights"),
    ("another checkpoint", 1, "selects no layer"),
    ("no such bundle", 2, "no such bundle"),
    ("no bundle in the folder", 2, "a folder holding no bundle"),
    ("unreadable config", 2, "config"),
    ("no such checkpoint", 2, "checkpoint"),
]


def documented_codes() -> dict[int, str]:
    """docs/configuration.md's table of verify's exit codes: code -> its row."""
    text = DOCS.read_text()
    table = text[text.index("| `verify` exit |") :].split("\n\n")[0]
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| `(\d+)` \|.*$", table, re.M)}


def test_every_documented_verify_exit_code_is_tested():
    assert sorted(documented_codes()) == sorted({code for _, code, _ in VERIFY_CODES}) == [0, 1, 2]


@pytest.mark.parametrize(("case", "code", "doc"), VERIFY_CODES, ids=[c[0] for c in VERIFY_CODES])
def test_verify_exit_codes(verify_cases, llama, case, code, doc):
    assert doc in documented_codes()[code]
    got, out, err = cli("verify", *verify_cases[case])
    assert got == code, (out, err)
    assert "Traceback" not in err
    if code == 0:
        assert out.strip().endswith(("OK (integrity)", "OK (integrity, config, checkpoint)"))
    elif code == 2:
        one_error(got, err)
    if case == "another checkpoint":  # names the checkpoint the bundle was built from
        built_from = str((llama["ckpt"] / "model.safetensors").resolve())
        assert f"is not the one this bundle was built from ({built_from}, whose 15 source tensors include" in err


# ---------------------------------------------------------------- 7: lists and help


def test_configs_and_help_say_per_step_calibration_and_the_token_table():
    code, out, _ = cli("configs")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert code == 0
    assert " w4a4 (per-step static, 10 steps: needs calibration, or build --calib) " in lines["dit_w4a4"]
    assert "per-step" not in lines["dit_w4a8"] and "token table" not in lines["llm_w4a8"]
    assert "+ token table int8 (a scale per row): embed.include=" in lines["full_w4a8"]
    code, out, _ = cli("build", "--help")
    calib = " ".join(out[out.index("--calib") : out.index("--min-sqnr")].split())
    assert code == 0 and "per_channel_static, or per_step_static" in calib
