"""The runtime layer and loader against an independent slow reference of the forward (tests/reference.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import outlier_weight
from duquant_pipeline.build import pack_layer
from duquant_pipeline.recipe import compute_transform
from duquant_pipeline.select import SelectedLayer
from duquant_runtime import (
    ActScalesError,
    ConfigMismatchError,
    DuQuantError,
    DuQuantLinear,
    NotCalibratedError,
    NothingLoadedWarning,
    calibrate,
    enable_from_env,
    load_bundle,
    save_act_scales,
)
from duquant_runtime.config import DuQuantConfig, TransformConfig
from duquant_runtime.embedding import QuantEmbedding
from duquant_runtime.stages import StageSpec
from reference import blocks_from_stacked, reference_forward, unpack_int4

torch.manual_seed(0)


# The seed's transform (svd, 16x16 blocks, zigzag, row rotation), one candidate.
SEED = {
    "method": "svd",
    "block_size": 16,
    "permute": True,
    "row_rot": "restore",
    "equalize": (),
    "rtn_candidate": False,
}


def seed_transform(**transform) -> TransformConfig:
    return TransformConfig(**{**SEED, **transform})


def seed_plan(permute: bool, row_rot: bool, block: int = 16) -> dict:
    """DuQuantLinear constructor arguments for the seed's stage layout."""
    stages = ([StageSpec("perm", "perm")] if permute else []) + [StageSpec("rotate", "r_in")]
    out_stages = [StageSpec("rotate", "r_out")] if row_rot else []
    return {"stages": stages, "out_stages": out_stages, "blocks": {"r_in": block, "r_out": 16}}


def make_pack(out=40, inp=37, bits=4, bias=True, seed=0, **transform):
    rng = np.random.default_rng(seed)
    w = outlier_weight(rng, out, inp)
    b = rng.standard_normal(out) if bias else None
    cfg = DuQuantConfig(name="l", transform=seed_transform(**transform))
    layer = SelectedLayer("l", "l.weight", "l.bias" if bias else None, out, inp, "F32", bits)
    return pack_layer(w, b, layer, "F32", cfg), w, b


def reference(pack, x: torch.Tensor, act_bits: int = 0, act_scale=None) -> np.ndarray:
    codes = unpack_int4(pack.qweight, pack.in_features) if pack.qweight.dtype == np.uint8 else pack.qweight
    w_t = codes.astype(np.float64) * pack.w_scale.astype(np.float64)[:, None]
    return reference_forward(
        x.double().numpy(),
        perm=pack.array("perm"),
        r_in=blocks_from_stacked(pack.array("r_in"), pack.in_features),
        r_out=None if pack.array("r_out") is None else blocks_from_stacked(pack.array("r_out"), pack.out_features),
        w_t=w_t,
        bias=pack.bias,
        act_bits=act_bits,
        act_scale=act_scale,
    )


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def activations(n: int, width: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    x[:, : max(1, width // 10)] *= 15.0  # outlier channels
    return x


# Documented tolerances: fp32 tight; bf16 / fp16 limited by the rounding of x, R and W
# (~2^-8 and ~2^-11 relative each).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


@pytest.mark.parametrize("storage", ["codes", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", [{}, {"permute": False, "row_rot": "0"}])
def test_forward_matches_reference_without_act_quant(storage, dtype, transform):
    pack, _, _ = make_pack(**transform)
    layer = DuQuantLinear.from_pack(pack, act_bits=0, act_mode="per_token_dynamic", weight_storage=storage, dtype=dtype)
    x = activations(3 * 7, 37).reshape(3, 7, 37)
    y = layer(x.to(dtype)).float()
    assert y.shape == (3, 7, 40) and y.dtype == torch.float32
    assert rel(y.reshape(-1, 40), reference(pack, x)) <= TOL[dtype]


@pytest.mark.parametrize("storage", ["codes", "dequant"])
@pytest.mark.parametrize("bits", [4, 8])
def test_forward_matches_reference_per_token_dynamic(storage, bits):
    pack, _, _ = make_pack(bits=bits)
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_token_dynamic", weight_storage=storage)
    x = activations(64, 37)
    y = layer(x).detach().numpy()
    ref = reference(pack, x, act_bits=8)
    # fp32 vs float64 can round a value sitting on a .5 boundary differently: allow rare flips
    assert rel(y, ref) <= 2e-4


@pytest.mark.parametrize("storage", ["codes", "dequant"])
def test_forward_matches_reference_static(storage):
    pack, _, _ = make_pack()
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_channel_static", weight_storage=storage)
    x = activations(64, 37)
    scale = np.abs(x.numpy()).max(0) / 127 * 0.8 + 1e-3  # any positive per-channel scale
    layer.set_act_scale(torch.from_numpy(scale))
    y = layer(x).detach().numpy()
    assert rel(y, reference(pack, x, act_bits=8, act_scale=scale.astype(np.float32).astype(np.float64))) <= 2e-4
    layer_bf16 = DuQuantLinear.from_pack(
        pack, act_bits=8, act_mode="per_channel_static", weight_storage=storage, dtype=torch.bfloat16
    )
    layer_bf16.set_act_scale(torch.from_numpy(scale))
    y16 = layer_bf16(x.bfloat16()).float().detach().numpy()
    assert rel(y16, reference(pack, x, act_bits=8, act_scale=scale)) <= 5e-2


def exact_layer(w: np.ndarray, b: np.ndarray | None, act_bits: int = 0, **transform) -> DuQuantLinear:
    """A DuQuantLinear holding the unquantized transformed weight: quantization fully off."""
    t = compute_transform(w, seed_transform(**transform))
    out, inp = w.shape
    layer = DuQuantLinear(
        inp,
        out,
        weight_bits=8,
        act_bits=act_bits,
        act_mode="per_token_dynamic",
        bias=b is not None,
        weight_storage="dequant",
        **seed_plan(t.value("perm") is not None, t.value("r_out") is not None),
    )
    with torch.no_grad():
        for key in ("perm", "r_in", "r_out"):
            if t.value(key) is not None:
                getattr(layer, key).copy_(torch.from_numpy(t.value(key)))
        layer.w_t.copy_(torch.from_numpy(t.w_t))
        if b is not None:
            layer.bias.copy_(torch.from_numpy(b))
    return layer


@pytest.mark.parametrize("shape", [(40, 37), (64, 48), (9, 70)])
def test_quantization_off_equals_nn_linear(shape):
    rng = np.random.default_rng(2)
    w, b = outlier_weight(rng, *shape), rng.standard_normal(shape[0])
    lin = torch.nn.Linear(shape[1], shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(w))
        lin.bias.copy_(torch.from_numpy(b))
    layer = exact_layer(w, b)
    x = activations(33, shape[1])
    assert rel(layer(x).detach(), lin(x).detach()) <= 1e-5
    # .weight maps back to the original basis
    assert rel(layer.weight, lin.weight.detach()) <= 1e-5


def test_gradients_flow_to_inputs_straight_through():
    pack, _, _ = make_pack()
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_token_dynamic")
    x = activations(5, 37).requires_grad_(True)
    x_in = x.clone()
    layer(x).sum().backward()
    assert torch.equal(x, x_in)  # the input was not edited in place
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # straight-through: d(sum y)/dx = 1ᵀ W_eff, with W_eff the effective weight
    expected = layer.weight.sum(0).expand_as(x)
    assert rel(x.grad, expected) <= 1e-5


def test_torch_compile_fullgraph_matches_eager():
    packs = [make_pack(out=48, inp=37, seed=1)[0], make_pack(out=37, inp=48, seed=2)[0]]
    model = torch.nn.Sequential(
        DuQuantLinear.from_pack(packs[0], act_bits=8, act_mode="per_token_dynamic"),
        torch.nn.GELU(),
        DuQuantLinear.from_pack(packs[1], act_bits=8, act_mode="per_channel_static"),
    )
    model[2].set_act_scale(torch.full((48,), 0.05))
    x = activations(16, 37)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert rel(out.detach(), eager.detach()) <= 1e-5
    assert rel(compiled(x * 2).detach(), model(x * 2).detach()) <= 1e-5


def test_state_dict_round_trip_and_to_dtype():
    pack, _, _ = make_pack()
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_channel_static")
    layer.set_act_scale(torch.full((37,), 0.1))
    x = activations(8, 37)
    state = layer.state_dict()
    fresh = DuQuantLinear(
        37,
        40,
        weight_bits=4,
        act_bits=8,
        act_mode="per_channel_static",
        bias=True,
        **seed_plan(permute=True, row_rot=True),
    )
    with pytest.raises(NotCalibratedError):
        fresh(x)
    fresh.load_state_dict(state)
    assert fresh.act_calibrated
    assert torch.equal(fresh(x), layer(x))
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.stage("r_in").dtype == torch.bfloat16 and half.qweight.dtype == torch.uint8
    assert rel(half(x.bfloat16()).float().detach(), layer(x).detach()) <= 5e-2
    assert layer.weight.shape == (40, 37) and layer.in_features == 37 and layer.out_features == 40
    assert "w4a8" in repr(layer)


@pytest.mark.parametrize(
    "saved", [{"act_calibrated": True, "uniform_r_in": False}, torch.tensor([1, 0], dtype=torch.uint8)]
)
def test_layer_states_of_0_1_and_0_2_are_refused_naming_the_fix(saved):
    pack, _, _ = make_pack()
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_channel_static")
    state = layer.state_dict()
    state["_extra_state"] = saved  # 0.1: a dict; 0.2: the flags [act_calibrated, uniform_r_in]
    with pytest.raises(DuQuantError, match=r"saved by duquant-packs 0\.1 or 0\.2.*load the bundle .* with load_bundle"):
        layer.load_state_dict(state)


def test_provenance_is_built_in_and_survives_the_state_dict():
    pack, _, _ = make_pack()
    made = {"bundle_name": "l", "bundle_fingerprint": "f" * 64, "calib_defaults": (4, 99.0)}
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_channel_static", **made)
    assert (layer.bundle_name, layer.bundle_fingerprint, layer.calib_defaults) == ("l", "f" * 64, (4, 99.0))
    fresh = DuQuantLinear(
        37,
        40,
        weight_bits=4,
        act_bits=8,
        act_mode="per_channel_static",
        bias=True,
        **seed_plan(permute=True, row_rot=True),
    )
    assert (fresh.bundle_name, fresh.bundle_fingerprint, fresh.calib_defaults) == (None, None, (32, 99.9))
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.bundle_name, fresh.bundle_fingerprint, fresh.calib_defaults) == ("l", "f" * 64, (4, 99.0))


def test_static_layer_before_calibration_raises():
    pack, _, _ = make_pack()
    layer = DuQuantLinear.from_pack(pack, act_bits=8, act_mode="per_channel_static")
    with pytest.raises(NotCalibratedError, match="calibrate"):
        layer(activations(4, 37))


# ---------------------------------------------------------------- loading onto the demo model


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    from duquant_pipeline.demo_model import load_demo_model

    return load_demo_model(demo_ckpt)


def own_int4_bytes(layer: DuQuantLinear) -> int:
    """Independent accounting of what a layer holds alone: nibble codes (a byte each above 4 bits)
    + fp32 scales + int32 perm + fp32 equalization + output rotation + bias (input rotations: ``input_rotation_bytes``)."""
    o, i, b = layer.out_features, layer.in_features, layer.dtype_ref.element_size()
    perm = 4 * i if layer.stage("perm") is not None else 0
    equalization = 4 * i if layer.stage("in_scale") is not None else 0
    r_out = -(-o // 16) * 256 * b if layer.stage("r_out") is not None else 0
    codes = o * i if layer.weight_bits > 4 else o * ((i + 1) // 2)
    return codes + 4 * o + perm + equalization + r_out + (b * o if layer.bias is not None else 0)


def input_rotation_bytes(layer: DuQuantLinear) -> int:
    if layer.stage("r_in") is None:
        return 0
    r_in = layer.stage("r_in")
    blk = r_in.shape[-1]
    blocks = 1 if r_in.dim() == 2 else -(-layer.in_features // blk)  # a tiled rotation holds one block
    return blocks * blk * blk * r_in.element_size()


def expected_int4_bytes(layer: DuQuantLinear) -> int:
    return own_int4_bytes(layer) + input_rotation_bytes(layer)


@pytest.mark.parametrize("block,seed_style", [(16, True), (64, False)])
def test_int4_memory_at_full_pi05_shapes(block, seed_style):
    """At real pi0.5 widths, int4 layers hold <= 0.30x their bf16 bytes (meta tensors: no allocation):
    the seed's svd layout (16x16 blocks, perm, row rotation), and the hadamard default, whose
    identical rotations are shared by every layer of one input width."""
    from duquant_pipeline.demo import FULL, tensor_specs

    inc = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
    held = bf16 = 0
    widths: set[int] = set()
    for name, shape in tensor_specs(FULL):
        if len(shape) == 2 and name.endswith(".weight") and any(f".{p}." in name for p in inc):
            out, inp = shape
            layer = DuQuantLinear(
                inp,
                out,
                weight_bits=4,
                act_bits=8,
                act_mode="per_token_dynamic",
                **seed_plan(permute=seed_style, row_rot=seed_style, block=block),
                bias=name.replace(".weight", ".bias") in dict(tensor_specs(FULL)),
                dtype=torch.bfloat16,
                device="meta",
            )
            assert layer.buffer_bytes() == expected_int4_bytes(layer)
            held += own_int4_bytes(layer) if not seed_style else layer.buffer_bytes()
            widths.add(inp)
            bf16 += 2 * out * inp
    if not seed_style:
        held += sum(-(-i // block) * block * block * 2 for i in widths)
    assert held <= 0.30 * bf16, f"{held / bf16:.3f}x"


def test_load_full_bundle_int4_memory_and_numbers(demo_model, demo_bundles):
    model = copy.deepcopy(demo_model).to(torch.bfloat16)
    report = load_bundle(model, demo_bundles["full_w4a8"], expect_config="full_w4a8")
    assert len(report.replaced) == 452  # 414 Linears, 37 adaptive norms, the token embedding
    layers = [m for n, m in model.named_modules() if n in report.replaced and isinstance(m, DuQuantLinear)]
    table = model.get_submodule("paligemma_with_expert.paligemma.model.language_model.embed_tokens")
    assert isinstance(table, QuantEmbedding) and table.bits == 8
    bf16 = sum(2 * m.in_features * m.out_features for m in layers)
    unique = {}
    for m in layers:
        for buf in m.buffers():
            unique[(buf.untyped_storage().data_ptr(), buf.numel())] = buf.numel() * buf.element_size()
    held = sum(unique.values())
    # Nothing beyond the accounted buffers is resident (no fp copy, no transformed fp weight),
    # and the hadamard rotation is held once per shape (a tiled block serves every width).
    widths = {tuple(m.stage("r_in").shape): m for m in layers if m.stage("r_in") is not None}
    expected = sum(own_int4_bytes(m) for m in layers) + sum(input_rotation_bytes(m) for m in widths.values())
    assert held == expected == report.bytes_after - table.buffer_bytes()
    assert held <= 0.30 * bf16, f"int4 layers hold {held / bf16:.3f}x their bf16 bytes"
    model = copy.deepcopy(demo_model)
    load_bundle(model, demo_bundles["full_w4a8"])
    name = report.replaced[0]
    layer, original = model.get_submodule(name), demo_model.get_submodule(name)
    assert isinstance(layer, DuQuantLinear) and layer.weight_storage == "codes"
    x = activations(6, layer.in_features)
    with torch.no_grad():
        y, y_fp = layer(x), original(x)
    assert rel(y, y_fp) < 0.5  # quantized, but the same layer


def test_wrong_config_refused_and_model_untouched(demo_model, demo_bundles):
    model = copy.deepcopy(demo_model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigMismatchError, match=r"select\.scope"):
        load_bundle(model, demo_bundles["llm_w4a8"], expect_config="dit_w4a8")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_calibrate_save_and_reload_act_scales(demo_model, demo_ckpt, tmp_path):
    from duquant_pipeline.build import build_bundle
    from duquant_pipeline.demo_model import component_inputs
    from duquant_runtime.config import resolve

    cfg = resolve("dit_w4a8").replace("quant", act_mode="per_channel_static", calib_steps=2)
    bundle = build_bundle(cfg, demo_ckpt, tmp_path, jobs=2).path
    model = copy.deepcopy(demo_model)
    load_bundle(model, bundle, cfg)
    inputs = component_inputs(model.dims, tokens=(8, 8, 16))
    with pytest.raises(NotCalibratedError):
        model.expert(*inputs["expert"])
    # each static layer's inputs, seen by a hook of this test's own, batch by batch
    seen: dict[str, list[torch.Tensor]] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, DuQuantLinear)}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(args[0].detach().clone()))
        for n, m in quantized.items()
    ]
    with torch.no_grad(), calibrate(model):
        for seed in range(3):  # a third batch is ignored: calib_steps = 2
            model.expert(*component_inputs(model.dims, seed=seed, tokens=(8, 8, 16))["expert"])
    for h in hooks:
        h.remove()
    # the static rule written out: per channel, torch.quantile of |x_t| over each of the first
    # calib_steps batches' rows, the largest batch's, over qmax
    pct = cfg.quant.act_percentile / 100.0
    with torch.no_grad():
        want = {
            n: torch.stack(
                [torch.quantile(quantized[n].rotate_input(x).float().abs().reshape(-1, x.shape[-1]), pct, dim=0)
                 for x in batches[:2]]
            ).amax(dim=0) / 127.0
            for n, batches in seen.items()
        }  # fmt: skip
    assert set(want) == set(quantized) and all(len(b) == 3 for b in seen.values())
    for n, layer in quantized.items():
        torch.testing.assert_close(layer.act_scale.float(), want[n], rtol=1e-4, atol=1e-8)
    scales_path = save_act_scales(model, tmp_path / "scales.h5")
    fresh = copy.deepcopy(demo_model)
    load_bundle(fresh, bundle, cfg, act_scales=scales_path)
    for n, layer in fresh.named_modules():
        if isinstance(layer, DuQuantLinear):  # the file restores the scales computed above
            torch.testing.assert_close(layer.act_scale.float(), want[n], rtol=1e-4, atol=1e-8)
            assert layer.act_calibrated
    with torch.no_grad():
        assert torch.isfinite(fresh.expert(*inputs["expert"])).all()
    # the scales file is refused with any other bundle
    other = build_bundle(cfg.replace("transform", block_size=32, block_out_size=32), demo_ckpt, tmp_path, jobs=2)
    with pytest.raises(ActScalesError, match="calibrated for bundle"):
        load_bundle(copy.deepcopy(demo_model), other.path, act_scales=scales_path)


def test_enable_from_env_bundle_and_packdir(demo_model, demo_bundles):
    model = copy.deepcopy(demo_model)
    with pytest.warns(NothingLoadedWarning, match="no OPENPI_DUQUANT_"):
        assert enable_from_env(model, environ={}) is None
    report = enable_from_env(model, environ={"OPENPI_DUQUANT_BUNDLE": str(demo_bundles["dit_w4a8"])})
    assert len(report.replaced) == 126
    packdir = demo_bundles["llm_w4a8"].parent.parent  # holds llm_w4a8/, dit_w4a8/, full_w4a8/
    model = copy.deepcopy(demo_model)
    env = {
        "OPENPI_DUQUANT_PACKDIR": str(packdir),
        "OPENPI_DUQUANT_SCOPE": "paligemma_with_expert.paligemma.model.language_model.",
    }
    report = enable_from_env(model, environ=env)
    assert report.bundle == demo_bundles["llm_w4a8"] and len(report.replaced) == 126
    # the seed's "error 2": a config no bundle in the directory was built for
    model = copy.deepcopy(demo_model)
    with pytest.raises(ConfigMismatchError, match="holds no bundle for the effective config") as info:
        enable_from_env(model, environ={**env, "OPENPI_DUQUANT_BLOCK": "32"})
    assert "llm_w4a8" in str(info.value) and "dit_w4a8" in str(info.value)
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())
