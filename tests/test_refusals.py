"""Issue 5: every mismatch, corruption and bad input is refused before a number is produced."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight, start_build_and_wait_for_temp, write_checkpoint
from duquant_pipeline.cli import main
from duquant_runtime import (
    BundleError,
    BundleReadError,
    BundleVersionError,
    CheckpointMismatchError,
    ConfigMismatchError,
    enable_from_env,
    load_bundle,
)
from duquant_runtime.bundle import BundleReader, seal
from duquant_runtime.signature import bits_digest

LAYER = "paligemma_with_expert.paligemma.model.language_model.layers.3.mlp.up_proj"


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def cli_subprocess(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "duquant_pipeline.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def mismatch_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("MISMATCH")]


def flip_bit_in_dataset(bundle: Path, dest: Path, layer: str, key: str = "qweight") -> Path:
    shutil.copy(bundle, dest)
    with h5py.File(dest, "r") as f:
        ds = f["layers"][layer][key]
        offset = ds.id.get_offset()
    with dest.open("r+b") as fh:
        fh.seek(offset + 3)
        byte = fh.read(1)[0]
        fh.seek(offset + 3)
        fh.write(bytes([byte ^ 0x10]))
    return dest


def truncated(bundle: Path, dest: Path) -> Path:
    data = bundle.read_bytes()
    dest.write_bytes(data[: len(data) * 2 // 3])
    return dest


@pytest.fixture(scope="module")
def ulp_ckpt(demo_ckpt, tmp_path_factory) -> Path:
    """The demo checkpoint with one selected bf16 weight changed by one ulp."""
    out = tmp_path_factory.mktemp("ulp") / "model.safetensors"
    shutil.copy(demo_ckpt, out)
    with out.open("r+b") as fh:  # the safetensors layout, read here: header length, JSON, data
        header_len = int.from_bytes(fh.read(8), "little")
        begin = json.loads(fh.read(header_len))[f"{LAYER}.weight"]["data_offsets"][0]
        offset = 8 + header_len + begin + 2 * 1000
        fh.seek(offset)
        bits = int.from_bytes(fh.read(2), "little")
        fh.seek(offset)
        fh.write(((bits + 1) & 0xFFFF).to_bytes(2, "little"))  # next bf16 value: one ulp
    return out


# ---------------------------------------------------------------- verify (CLI), as CI proves


def test_demo_bundles_verify(demo_bundles, demo_ckpt):
    for name in ("llm_w4a8", "dit_w4a8"):
        code, out, _ = cli("verify", demo_bundles[name], "-c", name, "--ckpt", demo_ckpt)
        assert code == 0 and "OK (integrity, config, checkpoint)" in out


def test_verify_refuses_another_preset(demo_bundles):
    code, _, err = cli("verify", demo_bundles["llm_w4a8"], "-c", "dit_w4a8")
    lines = mismatch_lines(err)
    assert code == 1 and len(lines) == 1 and "config select.scope" in lines[0]


def test_verify_refuses_a_one_ulp_checkpoint_change(demo_bundles, ulp_ckpt):
    code, _, err = cli("verify", demo_bundles["llm_w4a8"], "-c", "llm_w4a8", "--ckpt", ulp_ckpt)
    lines = mismatch_lines(err)
    assert code == 1 and len(lines) == 1
    assert f"checkpoint {LAYER}.weight: differs (sha256 bundle " in lines[0]


def test_verify_refuses_a_truncated_copy(demo_bundles, tmp_path):
    bad = truncated(demo_bundles["llm_w4a8"], tmp_path / "cut.h5")
    code, _, err = cli("verify", bad)
    lines = mismatch_lines(err)
    assert code == 1 and len(lines) == 1 and "it is truncated" in lines[0]


def test_verify_refuses_a_flipped_bit(demo_bundles, tmp_path):
    bad = flip_bit_in_dataset(demo_bundles["llm_w4a8"], tmp_path / "flip.h5", LAYER)
    code, _, err = cli("verify", bad)
    lines = mismatch_lines(err)
    assert code == 1 and len(lines) == 1
    # the seal covers every byte and is checked before HDF5 parses anything
    assert "the file fails its checksum" in lines[0] and "rebuild it" in lines[0]


def test_future_format_version_is_refused(demo_bundles, tmp_path, demo_model):
    bad = tmp_path / "future.h5"
    shutil.copy(demo_bundles["dit_w4a8"], bad)
    with h5py.File(bad, "r+") as f:
        f.attrs["format_version"] = 7
        f.attrs["tool_version"] = "9.1"
    seal(bad)  # a well-formed file of a future format
    with pytest.raises(BundleVersionError) as info:
        load_bundle(copy.deepcopy(demo_model), bad)
    assert "built by duquant-packs 9.1 (format 7); this runtime reads format 2" in str(info.value)
    code, _, err = cli("verify", bad)
    assert code == 1 and "format 7" in err


# ---------------------------------------------------------------- runtime refusals


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    from duquant_pipeline.demo_model import load_demo_model

    return load_demo_model(demo_ckpt)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def refusal(model, path, expect=None, **kw) -> BundleError:
    before = snapshot(model)
    with pytest.raises(BundleError) as info:
        load_bundle(model, path, expect, **kw)
    assert_untouched(model, before)
    return info.value


def test_runtime_refuses_another_preset(demo_model, demo_bundles):
    err = refusal(copy.deepcopy(demo_model), demo_bundles["llm_w4a8"], "dit_w4a8")
    assert isinstance(err, ConfigMismatchError) and err.field == "select.scope"


@pytest.mark.parametrize("ahead", [False, True])
def test_runtime_refuses_weights_one_ulp_away(ulp_ckpt, demo_ckpt, demo_bundles, monkeypatch, ahead):
    from duquant_pipeline.demo_model import load_demo_model
    from duquant_runtime import live_weights as loader

    # digests summed in line, or all of them on the background threads
    monkeypatch.setattr(loader, "AHEAD_MIN_BYTES", 0 if ahead else 1 << 60)
    # bf16 (the checkpoint's dtype): its raw bytes against the bundle's exact digest; float32:
    # the float64 sums, which a dtype change leaves comparable.
    for dtype, check in ((torch.float32, "weight signature differs"), (torch.bfloat16, "raw-bytes digest")):
        model = load_demo_model(ulp_ckpt, dtype)
        err = refusal(model, demo_bundles["llm_w4a8"], "llm_w4a8")
        assert isinstance(err, CheckpointMismatchError)
        assert err.layer == LAYER and err.field == "weight signature" and LAYER in str(err)
        assert check in str(err)
    report = load_bundle(load_demo_model(demo_ckpt, torch.bfloat16), demo_bundles["llm_w4a8"], "llm_w4a8")
    assert len(report.replaced) == 126  # the checkpoint's own weights pass, each against its own digest


def test_bits_digest_is_the_wrapping_sum_of_raw_int64_words():
    """Against numpy on the raw bytes: zero-padded last word, sum modulo 2**64 (signed)."""
    rng = np.random.default_rng(0)
    for n, dtype in ((1000, torch.bfloat16), (1001, torch.bfloat16), (333, torch.float32), (7, torch.float16)):
        t = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 1e3).to(dtype)
        raw = t.view(torch.uint8).numpy().tobytes()
        raw += bytes(-len(raw) % 8)
        want = int(np.frombuffer(raw, dtype="<i8").sum(dtype=np.int64))  # numpy int64 sums wrap
        assert bits_digest(t) == want
        assert bits_digest(t[1:]) != bits_digest(t[:-1]) or n < 2  # an unaligned view is read too
        bumped = t.clone()
        bumped.view(torch.int16 if t.element_size() == 2 else torch.int32)[n // 2] += 1  # one ulp
        assert bits_digest(bumped) != bits_digest(t)


def test_runtime_refuses_truncated_and_flipped(demo_model, demo_bundles, tmp_path):
    err = refusal(copy.deepcopy(demo_model), truncated(demo_bundles["llm_w4a8"], tmp_path / "cut.h5"))
    assert isinstance(err, BundleReadError)
    flipped = flip_bit_in_dataset(demo_bundles["llm_w4a8"], tmp_path / "flip.h5", LAYER)
    err = refusal(copy.deepcopy(demo_model), flipped)
    assert isinstance(err, BundleReadError) and err.field == "file" and "fails its checksum" in str(err)


def test_enable_from_env_refuses_the_same_cases(demo_model, demo_bundles, tmp_path, ulp_ckpt):
    flipped = flip_bit_in_dataset(demo_bundles["llm_w4a8"], tmp_path / "flip.h5", LAYER)
    cases = [
        (
            {"OPENPI_DUQUANT_BUNDLE": str(demo_bundles["llm_w4a8"]), "OPENPI_DUQUANT_CONFIG": "dit_w4a8"},
            ConfigMismatchError,
        ),
        ({"OPENPI_DUQUANT_BUNDLE": str(flipped)}, BundleReadError),
        ({"OPENPI_DUQUANT_BUNDLE": str(truncated(demo_bundles["llm_w4a8"], tmp_path / "cut.h5"))}, BundleReadError),
    ]
    for env, error in cases:
        model = copy.deepcopy(demo_model)
        before = snapshot(model)
        with pytest.raises(error):
            enable_from_env(model, environ=env)
        assert_untouched(model, before)
    from duquant_pipeline.demo_model import load_demo_model

    model = load_demo_model(ulp_ckpt)
    before = snapshot(model)
    env = {"OPENPI_DUQUANT_PACKDIR": str(demo_bundles["llm_w4a8"].parent), "OPENPI_DUQUANT_CONFIG": "llm_w4a8"}
    with pytest.raises(CheckpointMismatchError, match="none was built from this model's weights"):
        enable_from_env(model, environ=env)
    assert_untouched(model, before)


# ---------------------------------------------------------------- pipeline input validation


def assert_one_sentence(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_bad_checkpoints_get_one_sentence(tmp_path):
    not_st = tmp_path / "notes.safetensors"
    not_st.write_text("these are not tensors")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a.q_proj.weight": "model-00001-of-00002.safetensors"}}'
    )
    for ckpt, needle in [
        (tmp_path / "nowhere", "checkpoint not found"),
        (not_st, "is not a safetensors file"),
        (empty_dir, "holds neither model.safetensors nor model.safetensors.index.json"),
        (shard_dir, "points at missing shard(s): model-00001-of-00002.safetensors"),
    ]:
        for command in ("build", "list-layers"):
            code, _, err = cli(command, "-c", "llm_w4a8", "--ckpt", ckpt)
            assert_one_sentence(code, err, needle)


def test_nan_weight_is_named_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 32))
    w[4, 5] = np.nan
    ckpt = write_checkpoint(
        tmp_path / "nan.safetensors", {"net.x.q_proj.weight": rng.standard_normal((32, 32)), "net.x.k_proj.weight": w}
    )
    cfg = tmp_path / "net.toml"
    cfg.write_text('name = "net"\n[select]\nscope = "net."\n')
    for jobs in ("1", "2"):
        proc = cli_subprocess("build", "-c", cfg, "--ckpt", ckpt, "--out", tmp_path / "out", "--jobs", jobs, "-q")
        assert_one_sentence(proc.returncode, proc.stderr, "layer net.x.k_proj has 1 NaN/Inf value(s)")
    assert not list((tmp_path / "out").rglob("*.h5*")) and not list((tmp_path / "out").rglob(".*"))


def test_nan_in_an_embedding_table_is_named_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((20_000, 16))  # more rows than one chunk: the NaN is in the third
    table[17_000, 3] = np.inf
    ckpt = write_checkpoint(
        tmp_path / "nan.safetensors", {"net.x.q_proj.weight": rng.standard_normal((16, 16)), "net.tok.weight": table}
    )
    cfg = tmp_path / "net.toml"
    cfg.write_text('name = "net"\n[select]\nscope = "net."\n[embed]\ninclude = "tok$"\n')
    proc = cli_subprocess("build", "-c", cfg, "--ckpt", ckpt, "--out", tmp_path / "out", "--jobs", "1", "-q")
    assert_one_sentence(proc.returncode, proc.stderr, "embedding net.tok has NaN/Inf value(s), the first in row 17000")
    assert not list((tmp_path / "out").rglob("*.h5*")) and not list((tmp_path / "out").rglob(".*"))


def test_zero_rows_columns_and_odd_sizes_build(tmp_path):
    rng = np.random.default_rng(1)
    w = outlier_weight(rng, 45, 53)
    w[3, :] = 0.0
    w[:, 7] = 0.0
    ckpt = write_checkpoint(
        tmp_path / "z.safetensors",
        {"net.x.fc1.weight": w, "net.x.fc1.bias": np.zeros(45), "net.x.norm.weight": np.ones(53)},
    )
    cfg = tmp_path / "net.toml"
    cfg.write_text('name = "net"\n[select]\nscope = "net."\ninclude = ".*"\nexclude = ""\n')
    code, out, _ = cli("build", "-c", cfg, "--ckpt", ckpt, "--out", tmp_path, "-q")
    assert code == 0
    with BundleReader(out.strip().splitlines()[-1]) as r:
        assert r.header.layer_names == ("net.x.fc1",)  # the 1-D norm weight is never selected
        pack = r.read_layer("net.x.fc1")
        assert np.isfinite(pack.w_scale).all() and np.isfinite(pack.array("r_in")).all()


@pytest.mark.parametrize(
    "toml,needle",
    [
        ('name = "x"\n[select]\nscope = "net."\ncolour = "red"\n', "unknown key(s) in [select]: colour"),
        ('name = "x"\nflavour = 1\n', "unknown config key(s) flavour"),
        ('name = "x"\n[quant]\nweight_bits = 9\n', "quant.weight_bits must be between 2 and 8, got 9"),
        ('name = "x"\n[quant]\nweight_bits = 1\n', "quant.weight_bits must be between 2 and 8, got 1"),
        ('name = "x"\n[transform]\nblock_size = 1\n', "transform.block_size must be at least 2, got 1"),
        ('name = "x"\n[transform]\nrow_rot = "propagate"\n', "row_rot = 'propagate' is refused"),
        ('name = "x"\n[quant]\nweight_bits = "four"\n', "quant.weight_bits must be an integer"),
        ('name = "x"\n[select\n', "is not valid TOML"),
    ],
)
def test_bad_configs_get_one_sentence(tmp_path, demo_ckpt, toml, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    code, _, err = cli("list-layers", "-c", cfg, "--ckpt", demo_ckpt)
    assert_one_sentence(code, err, needle)


def test_bad_env_values_get_one_sentence(demo_ckpt, monkeypatch):
    monkeypatch.setenv("OPENPI_DUQUANT_ROW_ROT", "propagate")
    code, _, err = cli("list-layers", "-c", "llm_w4a8", "--ckpt", demo_ckpt)
    assert_one_sentence(code, err, "'propagate' is refused")
    monkeypatch.setenv("OPENPI_DUQUANT_ROW_ROT", "0")
    monkeypatch.setenv("OPENPI_DUQUANT_BLOCK", "sixteen")
    code, _, err = cli("list-layers", "-c", "llm_w4a8", "--ckpt", demo_ckpt)
    assert_one_sentence(code, err, "OPENPI_DUQUANT_BLOCK='sixteen' cannot be read as an integer")


# ---------------------------------------------------------------- concurrency and interruption


def test_two_concurrent_builds_end_with_one_valid_bundle(demo_ckpt, tmp_path):
    args = [
        sys.executable,
        "-m",
        "duquant_pipeline.cli",
        "build",
        "-c",
        "dit_w4a8",
        "--ckpt",
        str(demo_ckpt),
        "--out",
        str(tmp_path),
        "--jobs",
        "1",
        "-q",
    ]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    files = list((tmp_path / "dit_w4a8").iterdir())
    assert [f.name for f in files] == [Path(paths.pop()).name]  # no temp file left behind
    assert cli("verify", files[0], "-c", "dit_w4a8", "--ckpt", demo_ckpt)[0] == 0


def test_ctrl_c_stops_workers_and_cleans_up(demo_ckpt, tmp_path):
    proc = start_build_and_wait_for_temp("full_w4a8", demo_ckpt, tmp_path, jobs=2)
    target = tmp_path / "full_w4a8"
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: no bundle was written" in err and "Traceback" not in err
    assert not list(target.iterdir())
    assert_group_gone(proc.pid, "Ctrl-C")


def assert_group_gone(pgid: int, what: str, seconds: float = 20) -> None:
    """No process of the build's session is left: its workers, loky's resource tracker, a
    dask LocalCluster's nanny and workers."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    pytest.fail(f"worker processes survived {what}")


@pytest.mark.parametrize("backend", ["loky", "dask"])
def test_sigterm_stops_workers_and_cleans_up(demo_ckpt, tmp_path, backend):
    """What Slurm, Kubernetes, `timeout` and systemd do: SIGTERM to the build's own process
    only. The build stops its workers itself, removes its temp file and exits 143."""
    if backend == "dask":
        pytest.importorskip("distributed")
    proc = start_build_and_wait_for_temp("full_w4a8", demo_ckpt, tmp_path, jobs=2, extra=("--backend", backend))
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM: no bundle was written" in err and "Traceback" not in err
    assert not list((tmp_path / "full_w4a8").iterdir())
    assert_group_gone(proc.pid, "SIGTERM")


# ---------------------------------------------------------------- fuzzing the reader


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from duquant_pipeline.build import build_bundle
    from duquant_runtime.config import from_dict

    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(3)
    tensors = {
        "net.a.q_proj.weight": rng.standard_normal((20, 24)),
        "net.a.q_proj.bias": rng.standard_normal(20),
        "net.b.fc2.weight": rng.standard_normal((17, 33)),
        "net.tok.embed_tokens.weight": rng.standard_normal((50, 24)),  # an int4 table with group scales
    }
    ckpt = write_checkpoint(d / "model.safetensors", tensors)
    cfg = from_dict(
        {"name": "fuzz", "select": {"scope": "net."}, "embed": {"include": "embed_tokens$", "bits": 4, "group_size": 8}}
    )
    return build_bundle(cfg, ckpt, d, jobs=1).path, tensors


def fuzz_spec(tensors: dict[str, np.ndarray], where: Path) -> dict:
    np.savez(where / "tensors.npz", **tensors)
    layers = {
        k[: -len(".weight")]: [*v.shape, f"{k[: -len('.weight')]}.bias" in tensors, "embed_tokens" in k]
        for k, v in tensors.items()
        if k.endswith(".weight")
    }
    return {"layers": layers, "tensors": str(where / "tensors.npz")}


def test_fuzz_mutated_bundles_in_a_child_with_a_deadline(tiny_bundle, tmp_path):
    """~100 damaged bundles (zeroed runs, copied blocks, bit flips, truncations, half aimed at
    HDF5 metadata) and random files, each read in a child process with a 20 s deadline: every
    case is refused with a BundleError or loads, never a crash, a hang or a dead process."""
    from fuzz_reader import make_cases, run_cases

    path, tensors = tiny_bundle
    cases = make_cases(path, tmp_path / "cases", n=92, seed=11, random_files=8)
    outcomes = run_cases(cases, fuzz_spec(tensors, tmp_path))
    bad = [(kind, outcome) for kind, outcome, _ in outcomes if not (outcome == "ok" or outcome.startswith("refused"))]
    assert not bad, bad[:5]
    assert sum(o.startswith("refused") for _, o, _ in outcomes) >= 90  # the seal refuses damage before HDF5


# ---------------------------------------------------------------- faults while writing


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (tests are skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_is_refused_before_writing(demo_ckpt, tmp_path):
    with tmpfs(tmp_path / "small", "size=2m") as out:
        code, _, err = cli("build", "-c", "llm_w4a8", "--ckpt", demo_ckpt, "--out", out, "-q", "--no-env")
        assert code == 2 and err.startswith("error: not enough space for the bundle in ")
        assert "MB needed" in err and "MB free" in err and len(err.strip().splitlines()) == 1
        assert not list(out.rglob("*.h5*"))


def test_disk_filling_up_while_writing_is_one_sentence(demo_ckpt, tmp_path, monkeypatch):
    import duquant_pipeline.output as output_module
    from duquant_pipeline.build import OutputError, build_bundle
    from duquant_runtime.config import resolve

    monkeypatch.setattr(output_module, "estimated_bundle_bytes", lambda layers, config: 0)
    with tmpfs(tmp_path / "small", "size=3m") as out:
        with pytest.raises(OutputError, match="the disk or quota is full") as info:
            build_bundle(resolve("llm_w4a8"), demo_ckpt, out, jobs=1)
        assert "No bundle was written" in str(info.value)
        assert not [p for p in out.rglob("*") if p.is_file()]  # no temp file, no partial bundle


def test_read_only_output_folder_is_one_sentence(demo_ckpt, tmp_path):
    with tmpfs(tmp_path / "ro", "size=64m,ro") as out:
        code, _, err = cli("build", "-c", "llm_w4a8", "--ckpt", demo_ckpt, "--out", out, "-q", "--no-env")
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "the file system is read-only; pass --out to a writable folder" in err and "Traceback" not in err
