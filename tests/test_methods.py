"""Issue 7: methods by name, calibration statistics, smoothing, GPTQ, quality reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import outlier_weight, write_checkpoint
from duquant_pipeline.build import build_bundle, pack_layer
from duquant_pipeline.build_fingerprint import fingerprint_document
from duquant_pipeline.cli import main
from duquant_pipeline.recipe import compute_transform
from duquant_pipeline.rotations import check
from duquant_pipeline.rotations.duquant import balanced_zigzag, greedy_rotation
from duquant_pipeline.rotations.hadamard import hadamard_blocks
from duquant_pipeline.select import SelectedLayer
from duquant_pipeline.weightquant import gptq_codes, quantize_weight
from duquant_runtime import DuQuantLinear, StatsError, capture_stats, load_bundle
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import DuQuantConfig, QuantConfig, TransformConfig, from_dict
from duquant_runtime.fingerprint import digest
from duquant_runtime.stats import LayerStats, StatsReader
from torch import nn

# One candidate each (no per-layer choice), so the pack holds exactly compute_transform's stages.
ONE = {"equalize": (), "rtn_candidate": False}
METHODS = {
    "svd": {"method": "svd", "permute": True, "row_rot": "restore", **ONE},
    "hadamard": {"method": "hadamard", "row_rot": "0", "permute": False, **ONE},
    "hadamard_signs_zigzag": {"method": "hadamard", "row_rot": "0", "permute": True, "hadamard_signs": True, **ONE},
    "duquant": {"method": "duquant", "row_rot": "0", "permute": True, **ONE},
    "duquant_no_perm": {"method": "duquant", "row_rot": "0", "permute": False, "max_rotation_step": 3, **ONE},
}


def rtn(w: torch.Tensor, s: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Round-to-nearest codes of rows w with scales s (written here, as the reference)."""
    q = 2 ** (bits - 1) - 1
    return (w / s[:, None]).round().clamp(-q - 1, q).to(torch.int8)


def scales_of(w: torch.Tensor, search: str, cw: torch.Tensor | None = None) -> torch.Tensor:
    """The pipeline's per-row scales (float64) for a search, channel-weighted by cw."""
    hessian = None if cw is None else torch.diag(cw.double())
    return torch.from_numpy(quantize_weight(w, 4, search=search, hessian=hessian)[1]).double()


def _stats(x: np.ndarray, gram_block: int | None = None) -> LayerStats:
    """Statistics computed here, independently of capture_stats: mean xᵀx, max |x|, all rows."""
    n = x.shape[1]
    g = gram_block or n
    full = x.astype(np.float64).T @ x.astype(np.float64) / x.shape[0]
    nblk = -(-n // g)
    gram = np.zeros((nblk, g, g), dtype=np.float32)
    for b in range(nblk):
        lo, hi = b * g, min(n, (b + 1) * g)
        gram[b, : hi - lo, : hi - lo] = full[lo:hi, lo:hi]
    absmax = np.abs(x).max(axis=0).astype(np.float32)
    return LayerStats(absmax, gram, x.astype(np.float32), x.shape[0])


def _correlated_inputs(rng: np.random.Generator, tokens: int, n: int) -> np.ndarray:
    x = rng.standard_normal((tokens, n)) + 2.0 * rng.standard_normal((tokens, 4)) @ rng.standard_normal((4, n))
    x[:, rng.choice(n, 2, replace=False)] *= 20.0  # outlier channels
    return x


@pytest.mark.parametrize("shape", [(40, 37), (24, 64), (33, 16)])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("smooth", [0.0, 0.5])
def test_every_method_preserves_output_with_quantization_off(method, shape, smooth):
    """x·T·W_tᵀ (runtime layer, stored float32 factors, no quantization) equals x·Wᵀ."""
    rng = np.random.default_rng(1)
    out, inp = shape
    w = outlier_weight(rng, out, inp)
    x = _correlated_inputs(rng, 64, inp)
    t = TransformConfig(block_size=16, block_out_size=16, smooth_alpha=smooth, **METHODS[method])
    stats = _stats(x) if smooth else None
    tr = compute_transform(w, t, stats)
    layer = SelectedLayer("l", "l.weight", None, out, inp, "F32", 4)
    pack = pack_layer(w, None, layer, "F32", DuQuantConfig(name="x", transform=t), stats)
    runtime = DuQuantLinear.from_pack(pack, act_bits=0, act_mode="per_token_dynamic", weight_storage="dequant")
    runtime.w_t = torch.from_numpy(tr.w_t).float()  # unquantized transformed weight
    xt = torch.from_numpy(x).float()
    with torch.no_grad():
        got = runtime(xt).double().numpy()
        eff = runtime.weight.double().numpy()
    want = x @ w.T
    assert np.linalg.norm(got - want) <= 2e-5 * np.linalg.norm(want)
    assert np.abs(eff - w).max() <= 2e-5 * np.abs(w).max()  # .weight: back in the original basis


@pytest.mark.parametrize("n,block", [(64, 16), (37, 16), (130, 64), (5, 8)])
def test_hadamard_blocks_are_orthogonal_and_spread_outliers(n, block):
    for signs in (False, True):
        h = hadamard_blocks(n, block, signs=signs, seed=3)
        for b in h:
            np.testing.assert_allclose(b @ b.T, np.eye(block), atol=1e-12)
        full = h[0]
        if n >= block:  # a one-hot channel is spread evenly over the block
            assert np.allclose(np.abs(full[0]), 1 / np.sqrt(block))


def test_greedy_rotation_is_orthogonal_and_never_worse_than_identity():
    rng = np.random.default_rng(0)
    peaks = torch.from_numpy(outlier_weight(rng, 50, 40))
    rot = greedy_rotation(peaks, 16, steps=8, seed=0)
    for b in rot:
        np.testing.assert_allclose(b @ b.T, np.eye(16), atol=1e-12)
    padded = np.pad(peaks.numpy(), ((0, 0), (0, 8)))  # 40 channels: blocks 16, 16 and a tail of 8
    before = np.abs(padded).reshape(50, 3, 16).max(axis=(0, 2))
    after = np.stack([np.abs(padded[:, 16 * b : 16 * b + 16] @ rot[b]).max() for b in range(3)])
    assert (after <= before + 1e-12).all()  # the kept step is never worse than the identity
    assert (after < before).any()  # and it does flatten the outlier columns
    np.testing.assert_array_equal(rot[2, 8:, 8:], np.eye(8))  # the tail block is identity-padded


def test_balanced_zigzag_is_a_permutation_that_balances_block_maxima():
    peak = np.array([100.0, 90, 80, 70, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    perm = balanced_zigzag(peak, 4)
    assert sorted(perm.tolist()) == list(range(20))
    block_max = peak[perm].reshape(5, 4).max(axis=1)
    assert sorted(block_max.tolist(), reverse=True)[:4] == [100.0, 90.0, 80.0, 70.0]  # one per block
    tail = balanced_zigzag(np.arange(10.0), 4)  # short last block takes only its 2 channels
    assert sorted(tail.tolist()) == list(range(10))


def test_mse_search_is_no_worse_than_the_seed_alpha_search():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(outlier_weight(rng, 64, 128))
    for cw in (None, torch.from_numpy(rng.uniform(0.1, 10, 128))):
        errs = {}
        for search in ("alpha", "mse"):
            s = scales_of(w, search, cw)
            deq = rtn(w, s).double() * s[:, None]
            e = (deq - w).square() * (1 if cw is None else cw)
            errs[search] = float(e.sum())
        assert errs["mse"] <= errs["alpha"] * 1.0001


def test_gptq_with_identity_hessian_is_rtn():
    rng = np.random.default_rng(0)
    w = torch.from_numpy(outlier_weight(rng, 32, 70))
    s = scales_of(w, "mse")
    assert torch.equal(gptq_codes(w, s, 4, torch.eye(70, dtype=torch.float64), damp=0.01, group=16), rtn(w, s))


def test_gptq_lowers_output_error_on_correlated_inputs():
    rng = np.random.default_rng(0)
    n = 96
    w = outlier_weight(rng, 48, n)
    x = _correlated_inputs(rng, 2048, n)
    h = torch.from_numpy(x.T @ x / x.shape[0])
    wt = torch.from_numpy(w)
    s = scales_of(wt, "mse")
    errors = {}
    for label, codes in (("rtn", rtn(wt, s)), ("gptq", gptq_codes(wt, s, 4, h, damp=0.01, group=32))):
        w_hat = codes.double().numpy() * s.numpy()[:, None]
        errors[label] = np.linalg.norm(x @ (w - w_hat).T)  # output error, computed here
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_fingerprint_changes_with_method_and_with_stats():
    base = DuQuantConfig(name="x")
    docs = {
        m: digest(fingerprint_document(base.replace("transform", method=m, row_rot="0"), []))
        for m in ("svd", "hadamard")
    }
    assert docs["svd"] != docs["hadamard"]
    a = digest(fingerprint_document(base, [], "a" * 64))
    assert a != digest(fingerprint_document(base, [], "b" * 64)) and a != digest(fingerprint_document(base, []))
    # schema 2 lists every field
    assert base.fingerprint_fields()["quant"]["gptq"] is False


def test_fingerprint_fields_of_schema_1_are_refused_naming_the_rebuild():
    from duquant_runtime.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"schema 1 .*no longer compared: rebuild the bundle with `duquant-packs build`"
    ):
        DuQuantConfig(name="x").fingerprint_fields(1)


class Tiny(nn.Module):
    def __init__(self, w1: np.ndarray, w2: np.ndarray) -> None:
        super().__init__()
        self.net = nn.Module()
        self.net.up_proj = nn.Linear(w1.shape[1], w1.shape[0], bias=False)
        self.net.down_proj = nn.Linear(w2.shape[1], w2.shape[0], bias=False)
        with torch.no_grad():
            self.net.up_proj.weight.copy_(torch.from_numpy(w1))
            self.net.down_proj.weight.copy_(torch.from_numpy(w2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.down_proj(torch.relu(self.net.up_proj(x)))


def _calib_config(**quant) -> DuQuantConfig:
    return from_dict(
        {
            "name": "tiny_calib",
            "select": {"scope": "net."},
            "quant": {"weight_search": "mse", **quant},
            "transform": {"method": "hadamard", "block_size": 16, "row_rot": "0", "permute": False},
        }
    )


@pytest.fixture(scope="module")
def tiny_model_ckpt(tmp_path_factory):
    rng = np.random.default_rng(0)
    w1, w2 = outlier_weight(rng, 64, 48), outlier_weight(rng, 40, 64)
    w1, w2 = (torch.from_numpy(w).to(torch.bfloat16).double().numpy() for w in (w1, w2))  # exact in the bf16 file
    path = write_checkpoint(
        tmp_path_factory.mktemp("tinym") / "m.safetensors",
        {"net.up_proj.weight": w1, "net.down_proj.weight": w2},
        torch.bfloat16,
    )
    model = Tiny(w1, w2).float()
    batches = [torch.from_numpy(_correlated_inputs(np.random.default_rng(s), 64, 48)).float() for s in range(4)]
    return path, model, batches


def _capture(model, batches, path, cfg):
    with torch.no_grad(), capture_stats(model, cfg, gram_block=32, sample_rows=100) as cap:
        for b in batches:
            model(b)
    return cap.save(path)


def test_capture_stats_records_what_the_layers_saw(tiny_model_ckpt, tmp_path):
    from duquant_runtime.stats import StatsReader

    _, model, batches = tiny_model_ckpt
    stats_path = _capture(model, batches, tmp_path / "s.h5", _calib_config())
    x = torch.cat(batches).double().numpy()
    got = StatsReader(stats_path).layer("net.up_proj")
    np.testing.assert_allclose(got.absmax, np.abs(x).max(axis=0), rtol=1e-6)
    full = x.T @ x / x.shape[0]
    h = got.hessian()
    np.testing.assert_allclose(h[:32, :32], full[:32, :32], rtol=1e-5, atol=1e-4)
    assert not h[:32, 32:].any()  # bounded: only diagonal blocks of gram_block channels
    assert got.sample.shape == (100, 48) and got.tokens == 256
    rows = {tuple(r) for r in x.astype(np.float32)}
    assert all(tuple(r) in rows for r in got.sample)  # the sample holds real input rows


def test_calibrated_build_gptq_static_scales_and_quality(tiny_model_ckpt, tmp_path):
    ckpt, model, batches = tiny_model_ckpt
    cfg = _calib_config(gptq=True, act_mode="per_channel_static")
    stats_path = _capture(model, batches, tmp_path / "s.h5", cfg)
    with pytest.raises(StatsError, match="--calib"):
        build_bundle(cfg, ckpt, tmp_path / "nocalib", jobs=1)
    result = build_bundle(cfg, ckpt, tmp_path, jobs=1, calib=stats_path)
    plain = build_bundle(_calib_config(act_mode="per_channel_static"), ckpt, tmp_path, jobs=1)
    assert result.fingerprint != plain.fingerprint
    m = Tiny(model.net.up_proj.weight.detach().double().numpy(), model.net.down_proj.weight.detach().double().numpy())
    load_bundle(m, result.path, cfg)
    with BundleReader(result.path) as r:
        for name in r.header.layer_names:
            pack = r.read_layer(name)
            assert pack.quality and "output_sqnr_db" in pack.quality and "held_out_sqnr_db" in pack.quality
            layer = m.get_submodule(name)
            # each layer keeps static scales, or per-token ones where they measured better held out
            if pack.act_mode == "per_channel_static":
                assert pack.act_scale is not None and layer.act_calibrated and not pack.choice.endswith("+tok")
                torch.testing.assert_close(layer.act_scale.float(), torch.from_numpy(pack.act_scale).float())
            else:
                assert pack.act_mode == "per_token_dynamic" and pack.choice.endswith("+tok")
                assert pack.act_scale is None and layer.act_mode == "per_token_dynamic" and layer.act_scale is None
    x = torch.from_numpy(_correlated_inputs(np.random.default_rng(9), 64, 48)).float()
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
    r = CliRunner().invoke(main, ["inspect", str(result.path), "--quality", "1"])
    assert r.exit_code == 0 and "worst 1 of 2 layers by output SQNR" in r.stdout


def test_static_scales_are_the_percentile_rule_on_the_captured_sample(tiny_model_ckpt, tmp_path):
    """A static candidate's stored scales: torch.quantile of |x_t| per channel over the sample's
    rows, over qmax, written out here."""
    from duquant_pipeline.quantizer import LayerQuantizer
    from duquant_pipeline.recipe import Candidate
    from duquant_pipeline.rotations import handler
    from duquant_runtime.signature import weight_signature

    _, model, batches = tiny_model_ckpt
    cfg = _calib_config(act_mode="per_channel_static")
    stats = StatsReader(_capture(model, batches, tmp_path / "s.h5", cfg)).layer("net.up_proj")
    w = model.net.up_proj.weight.detach().double().numpy()
    layer = SelectedLayer("net.up_proj", "net.up_proj.weight", None, 64, 48, "BF16", 4)
    packer = LayerQuantizer(w, None, layer, "BF16", cfg, stats, weight_signature(torch.from_numpy(w)))
    measured = packer.candidate(Candidate(handler("hadamard")), 4)
    runtime = packer.runtime(measured.pack)
    with torch.no_grad():
        x_t = runtime.rotate_input(torch.from_numpy(stats.sample).float()).abs()
    want = torch.quantile(x_t, cfg.quant.act_percentile / 100.0, dim=0) / 127.0
    torch.testing.assert_close(torch.from_numpy(measured.pack.act_scale).float(), want, rtol=1e-5, atol=1e-8)


def test_stats_from_another_checkpoint_are_refused(tiny_model_ckpt, tmp_path):
    ckpt, model, batches = tiny_model_ckpt
    cfg = _calib_config(gptq=True)
    other = Tiny(
        model.net.up_proj.weight.detach().double().numpy() * 1.01, model.net.down_proj.weight.detach().double().numpy()
    )
    stats_path = _capture(other, batches, tmp_path / "other.h5", cfg)
    with pytest.raises(StatsError, match="captured on another checkpoint"):
        build_bundle(cfg, ckpt, tmp_path, jobs=1, calib=stats_path)
    assert not list(tmp_path.glob("**/*.h5.*.tmp")) and not list((tmp_path / "tiny_calib").glob("*.h5"))
    code = CliRunner().invoke(main, ["build", "-c", "full_w4a8", "--ckpt", str(ckpt), "--calib", str(stats_path)])
    assert code.exit_code == 2


def test_quant_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        check(DuQuantConfig(name="x", transform=TransformConfig(method="hadamard", block_size=24)))
    with pytest.raises(ValueError, match="weight_search"):
        DuQuantConfig(name="x", quant=QuantConfig(weight_search="grid"))
    with pytest.raises(ValueError, match="only defined for method 'svd'"):
        check(DuQuantConfig(name="x", transform=TransformConfig(method="hadamard", row_rot="restore", **ONE)))
    with pytest.raises(ValueError, match=r"transform\.method must be one of duquant, hadamard, svd"):
        check(DuQuantConfig(name="x", transform=TransformConfig(method="quarot")))


def test_presets_default_to_the_measured_method_and_keep_the_seed_reproducible():
    from duquant_runtime.config import resolve

    full = resolve("full_w4a8")
    assert (full.transform.method, full.transform.block_size, full.quant.weight_search) == ("hadamard", 64, "mse")
    seed = resolve("full_w4a8_seed")
    assert (seed.transform.method, seed.transform.row_rot, seed.quant.weight_search) == ("svd", "restore", "alpha")


def test_tiled_hadamard_fast_path_matches_the_block_path():
    """The tiled rotation (one GEMM) gives the numbers of the same blocks stored one per block."""
    import dataclasses

    from duquant_runtime.stages import StageSpec

    rng = np.random.default_rng(2)
    w = outlier_weight(rng, 24, 64)
    cfg = DuQuantConfig(name="x", transform=TransformConfig(block_size=16, **METHODS["hadamard"]))
    pack = pack_layer(w, None, SelectedLayer("l", "l.weight", None, 24, 64, "F32", 4), "F32", cfg)
    assert [s.kind.name for s in pack.stages] == ["tiled_rotate"]
    stacked = dataclasses.replace(
        pack,
        stages=(StageSpec("rotate", "r_in"),),
        stage_values={"r_in": np.tile(pack.array("r_in"), (4, 1, 1))},
    )
    fast, slow = (DuQuantLinear.from_pack(p, act_bits=8, act_mode="per_token_dynamic") for p in (pack, stacked))
    assert tuple(fast.r_in.shape) == (16, 16) and tuple(slow.r_in.shape) == (4, 16, 16)
    x = torch.from_numpy(_correlated_inputs(rng, 32, 64)).float()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.dense_weight(), slow.dense_weight(), rtol=1e-6, atol=1e-6)


def test_statistics_files_of_0_2_are_refused_with_the_capture_command(tmp_path):
    """An unsealed format-1 statistics file (0.2 wrote a percentile dataset too) is refused:
    the sentence says to capture the statistics again."""
    import json

    import h5py
    from duquant_runtime.stats import StatsReader

    x = np.random.default_rng(3).standard_normal((20, 8)).astype(np.float32)
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(format="duquant-packs-stats", format_version=1, digest="d" * 64)
        g = f.create_group("layers/net.fc1")
        g.attrs["meta"] = json.dumps({"in_features": 8, "tokens": 20, "weight_sum": 0.0, "weight_sumsq": 1.0})
        g.create_dataset("sample", data=x)
    with pytest.raises(StatsError) as err:
        StatsReader(path)
    assert str(err.value) == (
        f"{path} holds statistics of format 1 (duquant-packs 0.2), which this tool no longer reads: "
        "capture them again with `capture_stats`"
    )


def _reference_mse_error(row: np.ndarray, cw: np.ndarray, q: int = 7) -> float:
    """The "mse" search as a plain loop (docs/algorithms.md, "Weights"): clip ratios 1.0 .. 0.6, then
    +-0.025 and +-0.05 around the best, error Σ cw (Q(x) - x)² in float64; the best error."""

    def err(clip: float) -> float:
        s = max(float(np.float32(np.abs(row).max() * np.float32(clip) / np.float32(q))), 1e-10)
        deq = np.clip(np.round(row / s), -q - 1, q) * s
        return float(np.sum(cw * (deq - row) ** 2))

    coarse = [1.0, 0.9, 0.8, 0.7, 0.6]
    best = min(coarse, key=err)
    pool = coarse + [min(max(best + d, 0.05), 1.0) for d in (-0.05, -0.025, 0.025, 0.05)]
    return min(err(c) for c in pool)


@pytest.mark.parametrize("weighted", [False, True])
def test_mse_search_follows_the_reference_loop(weighted):
    """The fused search picks, per row, a scale whose error is the reference loop's best (to
    float32 ranking precision); codes are the exact division's; an all-zero row gets the floor."""
    rng = np.random.default_rng(3)
    w = outlier_weight(rng, 40, 96).astype(np.float32)
    w[7] = 0.0
    cw = rng.uniform(0.1, 10, 96) if weighted else np.ones(96)
    s = scales_of(torch.from_numpy(w), "mse", torch.from_numpy(cw) if weighted else None).numpy()
    codes, scales, sq_err = quantize_weight(
        torch.from_numpy(w), 4, search="mse", hessian=torch.diag(torch.from_numpy(cw)) if weighted else None
    )
    assert np.array_equal(scales, s.astype(np.float32))
    for r in range(w.shape[0]):
        if r == 7:
            assert s[r] == np.float32(1e-10) and not codes[r].any()
            continue
        row = w[r].astype(np.float64)
        best = _reference_mse_error(row, cw)
        got = float(np.sum(cw * (np.clip(np.round(row / s[r]), -8, 7) * s[r] - row) ** 2))
        assert got <= best * (1 + 1e-5), (r, got, best)
    assert np.array_equal(codes, rtn(torch.from_numpy(w), torch.from_numpy(scales)).numpy())
    want = float(np.sum((codes.astype(np.float64) * scales[:, None] - w.astype(np.float64)) ** 2))
    assert sq_err == pytest.approx(want, rel=1e-6)  # differences rounded in float32, like the search
