"""What a new user meets in the first hour, on their own small model: messages that say what
a file is, what an environment variable changed, where a bundle is, and what a build measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight
from duquant_pipeline.cli import main
from duquant_runtime import capture_stats
from safetensors.torch import save_model
from torch import nn

CONFIG = """name = "tiny"
[select]
scope = "net."
[transform]
block_size = 16
"""


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), env=env)
    return r.exit_code, r.stdout, r.stderr


class Mlp(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        self.net = nn.Module()
        self.net.fc1 = nn.Linear(48, 64, bias=False)
        self.net.fc2 = nn.Linear(64, 32, bias=False)
        with torch.no_grad():
            self.net.fc1.weight.copy_(torch.from_numpy(outlier_weight(rng, 64, 48)))
            self.net.fc2.weight.copy_(torch.from_numpy(outlier_weight(rng, 32, 64)))
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(torch.relu(self.net.fc1(x)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer MLP checkpoint (F32), its config file, statistics and bundle."""
    root = tmp_path_factory.mktemp("first_hour")
    model = Mlp()
    save_model(model, str(root / "model.safetensors"))
    (root / "tiny.toml").write_text(CONFIG)
    with torch.no_grad(), capture_stats(model, str(root / "tiny.toml")) as cap:
        model(torch.randn(64, 48, generator=torch.Generator().manual_seed(0)))
    stats = cap.save(root / "stats.h5")
    code, out, err = _cli("build", "-c", str(root / "tiny.toml"), "--ckpt", str(root), "--out", str(root / "out"), "-q")
    assert code == 0, err
    return {"root": root, "config": root / "tiny.toml", "stats": stats, "bundle": Path(out.strip().splitlines()[-1])}


# item 3: a file of another kind is named, not called damaged


def test_a_statistics_file_given_as_a_bundle_is_named(tiny):
    code, _, err = _cli("inspect", str(tiny["stats"]))
    assert code == 2
    assert "this is a statistics file" in err and "not a bundle" in err
    assert "damaged" not in err
    code, out, err = _cli("verify", str(tiny["stats"]))
    assert code != 0 and "this is a statistics file" in out + err and "damaged" not in out + err


def test_a_bundle_given_as_statistics_is_named(tiny):
    code, _, err = _cli(
        "build", "-c", str(tiny["config"]), "--ckpt", str(tiny["root"]), "--out", str(tiny["root"] / "o2"),
        "--calib", str(tiny["bundle"]), "-q",
    )  # fmt: skip
    assert code == 2
    assert "this is a bundle" in err and "not a statistics file" in err and "damaged" not in err
    assert not (tiny["root"] / "o2").exists() or not list((tiny["root"] / "o2").glob("*.h5"))


# item 4: --quality 0 lists every layer


def test_inspect_quality_zero_lists_every_layer(tiny):
    code, out, err = _cli("inspect", str(tiny["bundle"]), "--quality", "0")
    assert code == 0, err
    assert "not recorded" not in out
    assert "all 2 layers by weight SQNR" in out
    assert "net.fc1" in out and "net.fc2" in out
    code, _, err = _cli("inspect", str(tiny["bundle"]), "--quality", "-1")
    assert code == 2 and "-1" in err


# item 9: figures that say what they are


def test_inspect_counts_the_checkpoint_bytes_in_their_own_dtype(tiny):
    code, out, _ = _cli("inspect", str(tiny["bundle"]))
    assert code == 0
    assert "F32 weights" in out and "bf16" not in out.lower()
    code, out, _ = _cli("inspect", str(tiny["bundle"]), "--json")
    info = json.loads(out)
    assert info["components"]["other"]["source_bytes"] == 4 * (48 * 64 + 64 * 32)
    assert info["components"]["other"]["source_dtypes"] == ["F32"]


def test_inspect_json_always_has_per_layer_quality_and_component_means(tiny):
    code, out, _ = _cli("inspect", str(tiny["bundle"]), "--json")
    assert code == 0
    info = json.loads(out)
    rows = {r["layer"]: r for r in info["quality"]}
    assert set(rows) == {"net.fc1", "net.fc2"} and all("weight_sqnr_db" in r for r in rows.values())
    summary = info["quality_summary"]["other"]
    values = [r["weight_sqnr_db"] for r in rows.values()]
    assert summary["layers"] == 2
    assert summary["mean_db"] == pytest.approx(sum(values) / 2, abs=1e-3)
    assert summary["worst_db"] == min(values)
    assert summary["rtn_mean_db"] == pytest.approx(sum(r["rtn_weight_sqnr_db"] for r in rows.values()) / 2, abs=1e-3)


def test_build_ends_with_one_quality_line_per_component(tiny, demo_ckpt, tmp_path):
    code, out, err = _cli("build", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), "--out", str(tmp_path), "-q")
    assert code == 0, err
    lines = [line for line in err.splitlines() if "SQNR mean" in line]
    assert len(lines) == 1 and lines[0].split()[0] == "llm"
    assert "RTN: mean" in lines[0]
    code, again, err_again = _cli("build", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), "--out", str(tmp_path), "-q")
    assert "reused verified" in err_again
    assert [line for line in err_again.splitlines() if "SQNR mean" in line] == lines  # read back from the bundle
    assert again.strip() == out.strip()


# item 5: environment overrides are said, and errors name the variable


def test_each_env_override_is_one_stderr_line(demo_ckpt):
    env = {"OPENPI_DUQUANT_BLOCK": "32", "OPENPI_DUQUANT_ABITS": "0"}
    code, _, err = _cli("list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), env=env)
    assert code == 0, err
    assert (
        "OPENPI_DUQUANT_BLOCK=32 overrides llm_w4a8's transform.block_size (64 → 32) "
        "and transform.block_out_size (16 → 32)"
    ) in err.splitlines()
    assert "OPENPI_DUQUANT_ABITS=0 overrides llm_w4a8's quant.act_bits (8 → 0)" in err.splitlines()
    code, _, err = _cli("list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), "--no-env", env=env)
    assert code == 0 and "overrides" not in err


def test_an_error_from_an_env_value_names_the_variable(demo_ckpt):
    code, _, err = _cli("list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), env={"OPENPI_DUQUANT_BLOCK": "33"})
    assert code == 2
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "got 33" in error[0] and error[0].endswith("(set by OPENPI_DUQUANT_BLOCK=33)")
    env = {"OPENPI_DUQUANT_ACT_PCT": "150", "OPENPI_DUQUANT_BLOCK": "32"}
    code, _, err = _cli("list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), env=env)
    assert code == 2 and err.strip().endswith("(set by OPENPI_DUQUANT_ACT_PCT=150)")
    code, _, err = _cli(
        "list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt), env={"OPENPI_DUQUANT_ROW_ROT": "propagate"}
    )
    assert code == 2 and err.count("(set by OPENPI_DUQUANT_ROW_ROT=propagate)") == 1


# item 6: enable_from_env with nothing to load says so


def test_enable_from_env_with_nothing_to_load_warns_once_per_call_site():
    import warnings

    from duquant_runtime import NothingLoadedWarning, enable_from_env

    model = Mlp()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(3):  # an eval loop: said once
            assert enable_from_env(model, environ={}) is None
    assert [type(w.message) for w in seen] == [NothingLoadedWarning]
    assert "nothing loaded: no OPENPI_DUQUANT_* variable set" in str(seen[0].message)
    assert seen[0].filename == __file__  # points at the caller's line, not into the runtime
    with pytest.warns(NothingLoadedWarning, match="config variables are set but no bundle is named"):
        enable_from_env(model, environ={"OPENPI_DUQUANT_BLOCK": "32"})
    assert type(model.net.fc1) is nn.Linear


# item 7: verify --ckpt against another checkpoint is a summary


def test_verify_against_another_checkpoint_summarizes(demo_bundles, tmp_path):
    from duquant_pipeline.demo import write_demo_checkpoint
    from duquant_runtime.bundle import BundleReader

    other = write_demo_checkpoint(tmp_path, size="small")
    bundle = demo_bundles["llm_w4a8"]
    with BundleReader(bundle) as reader:
        doc = reader.header.fingerprint_doc
        recorded = len(doc["source"]) + len(doc.get("producers", []))  # the layers' and the norm gains
    code, _, err = _cli("verify", str(bundle), "--ckpt", str(other))
    assert code == 1
    lines = err.splitlines()
    assert len(lines) <= 10, err
    assert f"checkpoint: {recorded} of {recorded} source tensors differ" in lines[0]
    assert f"... and {recorded - 5} more (`verify --all` lists every one)" in err
    code, _, err = _cli("verify", str(bundle), "--ckpt", str(other), "--all")
    assert code == 1
    per_tensor = [line for line in err.splitlines() if line.startswith("MISMATCH checkpoint ")]
    assert len(per_tensor) == recorded  # one line per tensor
    assert all("shape bundle" in line and "sha256 bundle" in line for line in per_tensor)


def test_a_few_differing_tensors_are_each_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny["root"] / "model.safetensors"))
    tensors["net.fc2.weight"] = tensors["net.fc2.weight"].to(torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    code, _, err = _cli("verify", str(tiny["bundle"]), "--ckpt", str(tmp_path))
    assert code == 1
    assert err.splitlines()[0].startswith(
        "MISMATCH checkpoint net.fc2.weight: differs (dtype bundle F32, checkpoint BF16;"
    )
    assert "does not verify (1 problem(s))" in err


# item 8: a folder given for a bundle or a checkpoint


def test_a_folder_holding_one_bundle_is_that_bundle(tiny):
    from duquant_runtime import load_bundle

    folder = tiny["bundle"].parent
    for given in (folder, folder.parent):  # <out>/<config>/ and <out>/
        model = Mlp()
        report = load_bundle(model, given, expect_config=str(tiny["config"]))
        assert report.bundle == tiny["bundle"] and type(model.net.fc1).__name__ == "DuQuantLinear"
    code, out, err = _cli("inspect", str(folder))
    assert code == 0, err
    assert f"bundle       {tiny['bundle']}" in out
    code, out, _ = _cli("verify", str(folder.parent))
    assert code == 0 and out.startswith(f"{tiny['bundle']}: OK")


def test_a_folder_with_several_bundles_or_none_says_so(tiny, tmp_path):
    import shutil

    from duquant_runtime import BundleReadError, load_bundle

    for name in ("tiny-aaaaaaaaaaaa.h5", "tiny-bbbbbbbbbbbb.h5"):
        shutil.copy(tiny["bundle"], tmp_path / name)
    (tmp_path / "notes.h5").write_bytes(b"not a bundle")
    with pytest.raises(BundleReadError, match=r"is a directory holding 2 bundles .*tiny-aaaaaaaaaaaa\.h5.*: pass one"):
        load_bundle(Mlp(), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleReadError, match="is a directory holding no bundle"):
        load_bundle(Mlp(), tmp_path / "empty")
    code, _, err = _cli("inspect", str(tmp_path / "empty"))
    assert code == 2 and "is a directory holding no bundle" in err


def test_a_checkpoint_folder_without_model_safetensors_names_what_it_holds(tiny, tmp_path):
    import shutil

    shutil.copy(tiny["root"] / "model.safetensors", tmp_path / "policy.safetensors")
    code, _, err = _cli("list-layers", "-c", str(tiny["config"]), "--ckpt", str(tmp_path))
    assert code == 2 and "but holds policy.safetensors" in err and str(tmp_path / "policy.safetensors") in err
    jax = tmp_path / "pi05_libero"
    (jax / "params").mkdir(parents=True)
    (jax / "params" / "_METADATA").write_text("{}")
    code, _, err = _cli("list-layers", "-c", str(tiny["config"]), "--ckpt", str(jax))
    assert code == 2 and "JAX/Orbax checkpoint" in err
    assert f"convert_jax_model_to_pytorch.py --checkpoint_dir {jax}" in err


# item 9: configs shows exclusions; base = accepts a TOML path


def test_configs_shows_what_a_preset_excludes():
    code, out, _ = _cli("configs")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "also excludes 'vision_tower'" in lines["llm_dit_w4a8"]
    assert "excludes" not in lines["full_w4a8"]


def test_base_may_be_a_toml_path_relative_to_the_including_file(tiny, tmp_path):
    from duquant_runtime import ConfigError
    from duquant_runtime.config import resolve

    (tmp_path / "team.toml").write_text('name = "team"\n[select]\nscope = "net."\n[transform]\nblock_size = 16\n')
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "w8.toml").write_text('name = "w8"\nbase = "../team.toml"\n[quant]\nweight_bits = 8\n')
    cfg = resolve(tmp_path / "mine" / "w8.toml")
    assert (cfg.name, cfg.select.scope, cfg.transform.block_size, cfg.quant.weight_bits) == ("w8", "net.", 16, 8)
    code, out, err = _cli("list-layers", "-c", str(tmp_path / "mine" / "w8.toml"), "--ckpt", str(tiny["root"]))
    assert code == 0, err
    assert "2 layers selected by w8" in out and " w8 " in out
    (tmp_path / "a.toml").write_text('name = "a"\nbase = "b.toml"\n')
    (tmp_path / "b.toml").write_text('name = "b"\nbase = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        resolve(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('name = "c"\nbase = "nowhere.toml"\n')
    with pytest.raises(ConfigError, match=r"base 'nowhere.toml': no such file"):
        resolve(tmp_path / "c.toml")
    (tmp_path / "d.toml").write_text('name = "d"\nbase = "dit_w4a8"\n')
    assert resolve(tmp_path / "d.toml").select.scope == "paligemma_with_expert.gemma_expert.model."
