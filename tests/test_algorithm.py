"""The pack algorithm against the slow float64 reference in tests/reference.py."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import outlier_weight
from duquant_pipeline.basis import Transform
from duquant_pipeline.recipe import compute_transform
from duquant_pipeline.weightquant import quantize_weight
from duquant_runtime.config import TransformConfig
from reference import blocks_from_stacked, reference_forward, reference_pack


def svd_transform(w: np.ndarray, t: TransformConfig) -> Transform:
    """The seed's method alone (no equalization candidate)."""
    return compute_transform(w, t)


def svd_config(**kw: object) -> TransformConfig:
    """The seed's transform settings (full_w4a8_seed), overridden by ``kw``."""
    seed = {"method": "svd", "block_size": 16, "permute": True, "row_rot": "restore"}
    return TransformConfig(**{**seed, **kw})  # type: ignore[arg-type]


SHAPES = [(64, 48), (40, 37), (23, 50), (33, 16), (96, 5)]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "outlier"])
@pytest.mark.parametrize("permute,row_rot", [(True, "restore"), (False, "0"), (True, "0")])
def test_transform_matches_reference(shape, kind, permute, row_rot):
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    out, inp = shape
    w = outlier_weight(rng, out, inp) if kind == "outlier" else rng.standard_normal(shape)
    t = svd_config(block_size=16, block_out_size=8, permute=permute, row_rot=row_rot)
    got = svd_transform(w, t)
    ref = reference_pack(w, block=16, block_out=8, permute=permute, row_rot=row_rot)
    perm = got.value("perm")
    assert (perm is not None) == permute
    np.testing.assert_array_equal(perm if permute else np.arange(inp), ref["perm"])
    # Each block's U is unique (up to the sign convention) when the block has full rank.
    for b, u in enumerate(blocks_from_stacked(got.value("r_in"), inp)):
        if u.shape[0] <= out:
            np.testing.assert_allclose(u, ref["r_in"][b], atol=1e-8)
        np.testing.assert_allclose(u.T @ u, np.eye(u.shape[0]), atol=1e-10)
    if row_rot == "restore":
        for b, u in enumerate(blocks_from_stacked(got.value("r_out"), out)):
            if u.shape[0] <= inp:
                np.testing.assert_allclose(u, ref["r_out"][b], atol=1e-8)
    else:
        assert got.value("r_out") is None and not got.out_stages
    if out >= 16 and inp >= 8:
        np.testing.assert_allclose(got.w_t, ref["w_t"], atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_scales_and_codes_match_reference(bits):
    rng = np.random.default_rng(bits)
    w_t = outlier_weight(rng, 37, 29)
    w_t[5] = 0.0  # an all-zero row: scale clamps, codes are zero, no division by zero
    codes, scales, _ = quantize_weight(torch.from_numpy(w_t), bits, search="alpha")
    # block=1, no permutation, no row rotation: the reference's transform is the identity
    ref = reference_pack(w_t, block=1, permute=False, row_rot="0", bits=bits)
    np.testing.assert_allclose(ref["w_t"], w_t, atol=0)
    np.testing.assert_array_equal(scales, ref["scales"].astype(np.float32))
    np.testing.assert_array_equal(codes, ref["codes"])
    assert np.all(codes[5] == 0) and np.isfinite(scales).all()


@pytest.mark.parametrize("shape", [(64, 48), (40, 37), (7, 3)])
def test_quantization_off_is_output_preserving(shape):
    """With float32-stored rotations and no quantization, outputs equal x Wᵀ + b (≤ 1e-5 rel)."""
    rng = np.random.default_rng(7)
    w = outlier_weight(rng, *shape)
    bias = rng.standard_normal(shape[0])
    t = svd_transform(w, svd_config(block_size=16, block_out_size=16))
    x = rng.standard_normal((11, shape[1])) * np.where(rng.random(shape[1]) < 0.1, 20, 1)
    r_in = blocks_from_stacked(t.value("r_in").astype(np.float32), shape[1])
    r_out = blocks_from_stacked(t.value("r_out").astype(np.float32), shape[0])
    y = reference_forward(x, perm=t.value("perm"), r_in=r_in, r_out=r_out, w_t=t.w_t, bias=bias)
    assert _rel(y, x @ w.T + bias) <= 1e-5


def test_rank_deficient_blocks_are_completed():
    """A block with fewer rows than B still gets a full orthogonal B x B basis."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 40))
    w[:, 3] = 0.0
    t = svd_transform(w, svd_config(block_size=16, block_out_size=16))
    for u in t.value("r_in"):
        np.testing.assert_allclose(u.T @ u, np.eye(16), atol=1e-10)
    x = rng.standard_normal((4, 40))
    y = reference_forward(
        x,
        perm=t.value("perm"),
        r_in=blocks_from_stacked(t.value("r_in"), 40),
        r_out=blocks_from_stacked(t.value("r_out"), 5),
        w_t=t.w_t,
    )
    assert _rel(y, x @ w.T) <= 1e-10
