"""The offline pipeline end to end: selection, bundle contents, fingerprint, CLI, atomicity."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight, start_build_and_wait_for_temp, write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_pipeline.cli import main
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import from_dict, resolve
from duquant_runtime.env import apply_env
from reference import blocks_from_stacked, reference_pack, unpack_int4


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    return r.exit_code, r.stdout, r.stderr


def tiny_config(**transform):
    return from_dict(
        {
            "name": "tiny",
            "base": "full_w4a8_seed",  # the seed's method: the reference below is tests/reference.py
            "select": {"scope": "net."},
            "transform": {"block_size": 16, "block_out_size": 16, **transform},
        }
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = {
        "net.a.q_proj.weight": rng.standard_normal((48, 64)),  # random
        "net.a.k_proj.weight": outlier_weight(rng, 40, 37),  # outliers, odd width
        "net.a.k_proj.bias": rng.standard_normal(40),
        "net.b.fc1.weight": outlier_weight(rng, 23, 50),  # odd both ways
        "net.b.fc2.weight": outlier_weight(rng, 70, 9),  # narrower than one block
        "net.b.norm.weight": np.ones(64),  # 1-D: never selected
        "net.b.layer_fc1.scale": np.ones((4, 4)),  # 2-D but not a .weight
    }
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "model.safetensors", tensors, torch.bfloat16), tensors


@pytest.mark.parametrize("transform", [{}, {"permute": False, "row_rot": "0"}])
def test_bundle_matches_slow_reference(tiny_ckpt, tmp_path, transform):
    path, tensors = tiny_ckpt
    cfg = tiny_config(**transform)
    result = build_bundle(cfg, path, tmp_path, jobs=2)
    with BundleReader(result.path) as r:
        assert set(r.header.layer_names) == {"net.a.q_proj", "net.a.k_proj", "net.b.fc1", "net.b.fc2"}
        for name in r.header.layer_names:
            pack = r.read_layer(name)
            # the reference sees the bf16-rounded weight, exactly as stored in the checkpoint
            w = torch.from_numpy(tensors[f"{name}.weight"].astype(np.float32)).bfloat16().double().numpy()
            ref = reference_pack(w, permute=cfg.transform.permute, row_rot=cfg.transform.row_rot)
            out, inp = w.shape
            if cfg.transform.permute:
                np.testing.assert_array_equal(pack.array("perm"), ref["perm"])
            else:
                assert pack.array("perm") is None
            for got, want in zip(blocks_from_stacked(pack.array("r_in"), inp), ref["r_in"], strict=True):
                if got.shape[0] <= out:
                    np.testing.assert_allclose(got, want, atol=2e-6)
            if cfg.transform.row_rot == "restore":
                for got, want in zip(blocks_from_stacked(pack.array("r_out"), out), ref["r_out"], strict=True):
                    if got.shape[0] <= inp:
                        np.testing.assert_allclose(got, want, atol=2e-6)
            codes = unpack_int4(pack.qweight, inp)
            if out >= 16 and inp >= 16:  # unique rotations -> codes and scales are determined
                np.testing.assert_allclose(pack.w_scale, ref["scales"], rtol=1e-6)
                mismatch = codes != ref["codes"]
                assert mismatch.mean() <= 1e-3 and np.abs(codes - ref["codes"]).max() <= 1
            # in every case (unique rotations or not) the codes quantize W in the stored basis
            w_t = transformed_with_stored_blocks(w, pack)
            deq = codes * pack.w_scale[:, None].astype(np.float64)
            assert np.linalg.norm(deq - w_t) / np.linalg.norm(w_t) < 0.2
            if name == "net.a.k_proj":
                np.testing.assert_allclose(pack.bias, tensors["net.a.k_proj.bias"].astype(np.float32), rtol=1e-2)


def transformed_with_stored_blocks(w: np.ndarray, pack) -> np.ndarray:
    """W[:, perm] · blockdiag(R_in), then blockdiag(R_out) ·, block by block from the bundle."""
    out, inp = w.shape
    w_t = w[:, pack.array("perm")] if pack.array("perm") is not None else w.copy()
    start = 0
    for u in blocks_from_stacked(pack.array("r_in"), inp):
        w_t[:, start : start + len(u)] = w_t[:, start : start + len(u)] @ u
        start += len(u)
    if pack.array("r_out") is not None:
        start = 0
        for u in blocks_from_stacked(pack.array("r_out"), out):
            w_t[start : start + len(u)] = u @ w_t[start : start + len(u)]
            start += len(u)
    return w_t


def test_demo_layer_counts(demo_ckpt):
    for config, count in [
        ("llm_w4a8", 126),
        ("dit_w4a8", 126),
        ("vision_w4a8", 162),
        ("llm_dit_w4a8", 252),
        ("full_w4a8", 452),  # 414 Linears, 37 adaptive norms, the token embedding
    ]:
        code, out, _ = _cli("list-layers", "-c", config, "--ckpt", str(demo_ckpt))
        assert code == 0
        assert out.strip().splitlines()[-1].startswith(f"{count} layers selected by {config}")
        assert "action_out_proj" not in out and "multi_modal_projector" not in out


def test_zero_match_names_the_nearest_scope(demo_ckpt, monkeypatch):
    monkeypatch.setenv("OPENPI_DUQUANT_SCOPE", "paligemma_with_expert.paligemma.language_model.")
    code, _, err = _cli("list-layers", "-c", "llm_w4a8", "--ckpt", str(demo_ckpt))
    assert code == 2
    assert "selects 0 layers" in err and "'paligemma_with_expert.paligemma.model.language_model.'" in err
    assert "Traceback" not in err


def test_action_out_proj_only_when_whitelisted(demo_ckpt, tmp_path):
    cfg = tmp_path / "head.toml"
    cfg.write_text('name = "head"\n[select]\nscope = ""\ninclude = "action"\nlayers = ["action_out_proj"]\n')
    code, out, _ = _cli("list-layers", "-c", str(cfg), "--ckpt", str(demo_ckpt))
    assert (
        code == 0 and "action_out_proj" in out and out.strip().splitlines()[-1].startswith("1 layers selected by head")
    )
    cfg.write_text('name = "head"\n[select]\nscope = ""\ninclude = "action_.*_proj$"\n')
    code, out, _ = _cli("list-layers", "-c", str(cfg), "--ckpt", str(demo_ckpt))
    assert code == 0 and "action_in_proj" in out and "action_out_proj" not in out


def test_env_override_changes_fingerprint(tiny_ckpt, tmp_path, monkeypatch):
    path, _ = tiny_ckpt
    base = build_bundle(tiny_config(), path, tmp_path, jobs=1)
    monkeypatch.setenv("OPENPI_DUQUANT_BLOCK", "32")
    cfg = apply_env(tiny_config())
    assert cfg.transform.block_size == 32 and cfg.transform.block_out_size == 32
    other = build_bundle(cfg, path, tmp_path, jobs=1)
    assert other.fingerprint != base.fingerprint and other.path != base.path
    with BundleReader(other.path) as r:
        assert r.header.config["transform"]["block_size"] == 32


@pytest.mark.parametrize("backend", ["threading", "sequential"])
def test_backends_build_identical_packs(tiny_ckpt, tmp_path, backend):
    path, _ = tiny_ckpt
    loky = build_bundle(tiny_config(), path, tmp_path / "loky", jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        other = build_bundle(tiny_config(), path, tmp_path / backend, jobs=2, backend=backend)
        assert torch.get_num_threads() == 2  # an in-process build leaves the caller's threads as they were
    finally:
        torch.set_num_threads(threads)
    assert other.fingerprint == loky.fingerprint
    with BundleReader(loky.path) as a, BundleReader(other.path) as b:
        for name in a.header.layer_names:
            pa, pb = a.read_layer(name), b.read_layer(name)
            for key, value in pa.arrays().items():
                np.testing.assert_array_equal(value, pb.arrays()[key])


def test_second_build_is_a_noop(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    first = build_bundle(tiny_config(), path, tmp_path, jobs=2)
    stamp = first.path.stat().st_mtime_ns
    second = build_bundle(tiny_config(), path, tmp_path, jobs=2)
    assert not first.skipped and second.skipped
    assert second.path == first.path and first.path.stat().st_mtime_ns == stamp


def test_a_bundle_of_another_tool_version_is_rebuilt(tiny_ckpt, tmp_path, monkeypatch):
    """Same inputs, older release: its choices (or layout) may differ from this release's."""
    from duquant_pipeline import build

    path, _ = tiny_ckpt
    monkeypatch.setattr(build, "__version__", "0.0.1")
    old = build_bundle(tiny_config(), path, tmp_path, jobs=1)
    monkeypatch.undo()
    new = build_bundle(tiny_config(), path, tmp_path, jobs=1)
    assert not new.skipped and new.fingerprint == old.fingerprint
    with BundleReader(new.path) as reader:
        assert reader.header.tool_version == build.__version__


def test_cli_build_prints_path_last_and_verifies(tiny_ckpt, tmp_path):
    path, _ = tiny_ckpt
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "tiny"\n[select]\nscope = "net."\n')
    code, out, _ = _cli("build", "-c", str(cfg), "--ckpt", str(path), "--out", str(tmp_path), "-q")
    assert code == 0
    bundle = Path(out.strip().splitlines()[-1])
    assert bundle.is_file() and bundle.parent == tmp_path / "tiny"
    code, out, _ = _cli("verify", str(bundle), "-c", str(cfg), "--ckpt", str(path))
    assert code == 0 and "OK" in out
    code, out, _ = _cli("inspect", str(bundle))
    assert code == 0 and re.search(r"^layers +4 ", out, re.M) and re.search(r"^fingerprint +[0-9a-f]{64}$", out, re.M)


def test_sigkill_mid_build_leaves_no_bundle(demo_ckpt, tmp_path):
    """SIGKILL during a build: no bundle appears; the next build cleans up and succeeds."""
    proc = start_build_and_wait_for_temp("full_w4a8", demo_ckpt, tmp_path, jobs=1)
    target = tmp_path / "full_w4a8"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(target.glob("*.h5")), "a killed build must not leave a bundle"
    result = build_bundle(resolve("full_w4a8"), demo_ckpt, tmp_path, jobs=2)
    assert result.path.is_file() and not result.skipped
    assert not list(target.glob(".*.tmp")), "the dead build's temp file is cleaned up"
    with h5py.File(result.path) as f:
        assert len(f["layers"]) == 452


def test_demo_checkpoint_is_deterministic_and_standard(tmp_path):
    from duquant_pipeline.demo import write_demo_checkpoint
    from safetensors import safe_open

    a = write_demo_checkpoint(tmp_path / "a")
    b = write_demo_checkpoint(tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    with safe_open(str(a), framework="pt") as f:  # the official reader agrees with our writer
        keys = list(f.keys())
        w = f.get_tensor(
            "paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.26.mlp.fc1.weight"
        )
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (600, 152)
    assert len([k for k in keys if k.endswith("q_proj.weight")]) == 18 + 18 + 27


def test_identical_rotations_are_stored_once(demo_ckpt, tmp_path):
    """Every hadamard layer of one width and block links the same /shared dataset; each still reads and
    verifies as its own, and inspect counts the shared bytes once."""
    from duquant_pipeline.build import build_bundle
    from duquant_runtime.bundle import SHARED, BundleReader
    from duquant_runtime.bundle_checks import integrity_problems
    from duquant_runtime.config import resolve

    path = build_bundle(resolve("llm_w4a8"), demo_ckpt, tmp_path, jobs=1).path
    with h5py.File(path, "r") as f:
        rotated = {n: g for n, g in f["layers"].items() if "r_in" in g}
        addresses = {h5py.h5o.get_info(g["r_in"].id).addr for g in rotated.values()}
        widths = {g["r_in"].shape for g in rotated.values()}
        assert len(rotated) > 100 and len(addresses) == len(widths) == len(f[SHARED])
    with BundleReader(path) as reader:
        assert integrity_problems(reader) == []
        packs = [reader.read_layer(n) for n in rotated]
    blocks = [p.array("r_in").shape[-1] for p in packs]  # 64, or 16 where block_search won
    assert set(blocks) <= {16, 64} and blocks.count(64) > len(blocks) // 2
    assert all(np.allclose(np.abs(p.array("r_in")), 1 / np.sqrt(b)) for p, b in zip(packs, blocks, strict=True))


def test_default_jobs_runs_small_selections_in_process(monkeypatch):
    """In-process below POOL_MIN_WEIGHTS selected weights, one worker per core from there on;
    a dask cluster is always sized to the machine."""
    from duquant_pipeline import build
    from duquant_pipeline.select import SelectedLayer

    monkeypatch.setattr(build.os, "cpu_count", lambda: 8)

    def layers(weights: int) -> list[SelectedLayer]:
        return [SelectedLayer(f"l{i}", f"l{i}.weight", None, -(-weights // 2048), 1024, "BF16", 4) for i in range(2)]

    assert build.default_jobs(layers(build.POOL_MIN_WEIGHTS - 4096), "loky") == 1
    assert build.default_jobs(layers(build.POOL_MIN_WEIGHTS), "loky") == 8
    assert build.default_jobs(layers(1 << 20), "dask") == 8


def test_in_process_builds_return_freed_memory_above_a_bound(tiny_ckpt, tmp_path, monkeypatch):
    """`--jobs 1` trims glibc's arenas after a layer only while the process holds more than
    TRIM_ABOVE_BYTES (the bound keeps small builds from re-faulting their temporaries)."""
    from duquant_pipeline import process

    trims: list[int] = []

    class FakeLibc:
        def malloc_trim(self, pad: int) -> int:
            trims.append(pad)
            return 1

    monkeypatch.setattr(process.ctypes, "CDLL", lambda name: FakeLibc())
    path, _ = tiny_ckpt
    monkeypatch.setattr(process, "TRIM_ABOVE_BYTES", 1 << 60)
    build_bundle(tiny_config(), path, tmp_path / "a", jobs=1)
    assert trims == []
    monkeypatch.setattr(process, "TRIM_ABOVE_BYTES", 0)
    build_bundle(tiny_config(), path, tmp_path / "b", jobs=1)
    assert trims == [0] * 4  # one per selected layer


def test_checkpoint_reuses_a_handle_for_a_bounded_number_of_bytes(tiny_ckpt, monkeypatch):
    """Reads share one safetensors handle until HANDLE_BYTES went through it, then reopen:
    no per-read open cost, and no handle that keeps a whole checkpoint's pages mapped."""
    from duquant_pipeline import checkpoint as ckpt_module
    from duquant_pipeline.checkpoint import Checkpoint

    path, _ = tiny_ckpt
    names = sorted(n for n, t in Checkpoint.open(path).tensors.items() if len(t.shape) == 2)
    want = {n: Checkpoint.open(path).raw(n) for n in names}
    opens: list[Path] = []
    real_open = ckpt_module._open
    monkeypatch.setattr(ckpt_module, "_open", lambda file: opens.append(file) or real_open(file))
    for budget, expected_opens in ((1 << 30, 1), (1, len(names))):
        monkeypatch.setattr(ckpt_module, "HANDLE_BYTES", budget)
        ckpt = Checkpoint.open(path)
        opens.clear()  # Checkpoint.open parses the header through a handle of its own
        assert all(torch.equal(ckpt.raw(n), want[n]) for n in names)
        assert len(opens) == expected_opens
