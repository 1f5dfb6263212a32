"""The checks users rely on without seeing them, each against a value computed here: the seal
of files large enough to be checked in pieces, the config comparison field by field, the
static-scale rule and its step count, the environment mapping, the fingerprint against its
own document, and the dot boundary of a detected name prefix."""

from __future__ import annotations

import copy
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import outlier_weight
from duquant_runtime import (
    BundleReadError,
    ConfigMismatchError,
    DuQuantLinear,
    ModelMismatchError,
    calibrate,
    crc,
    h5file,
    load_bundle,
)
from duquant_runtime.bundle import BundleReader
from duquant_runtime.bundle_checks import config_problems
from duquant_runtime.config import resolve
from duquant_runtime.env import _FIELDS, PREFIX, config_from_env
from safetensors.torch import save_file
from torch import nn


@pytest.fixture(scope="module")
def demo_model(demo_ckpt):
    from duquant_pipeline.demo_model import load_demo_model

    return load_demo_model(demo_ckpt)


# ---------------------------------------------------------------- the seal on large files


@pytest.fixture(scope="module")
def large_sealed(tmp_path_factory) -> tuple[Path, int]:
    """A sealed file of 2 x SEAL_PIECE_MIN + 1 MiB: checked in pieces on several threads."""
    path = tmp_path_factory.mktemp("seal") / "large.bin"
    size = h5file.USERBLOCK + 2 * h5file.SEAL_PIECE_MIN + (1 << 20)
    rng = np.random.default_rng(0)
    with path.open("wb") as fh:
        fh.write(b"\0" * h5file.USERBLOCK)
        left = size - h5file.USERBLOCK
        while left:
            n = min(left, 16 << 20)
            fh.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
            left -= n
    h5file.seal(path, h5file.BUNDLE_MAGIC)
    return path, size


@pytest.fixture
def several_cores(monkeypatch):
    monkeypatch.setattr(h5file.os, "cpu_count", lambda: 4)  # pieces on threads even on a 1-core runner


def test_the_seal_of_a_large_file_is_the_crc32_of_its_bytes(large_sealed, several_cores):
    path, size = large_sealed
    data = path.read_bytes()
    _, length, crc = h5file.SEAL.unpack(data[: h5file.SEAL.size])
    assert length == size - h5file.USERBLOCK
    assert crc == zlib.crc32(data[h5file.USERBLOCK :])  # one pass of zlib over the whole file
    assert h5file.check_seal(path, h5file.BUNDLE_MAGIC) is True
    kept = h5file.read_sealed(path, h5file.BUNDLE_MAGIC)
    assert kept is not None and kept[h5file.USERBLOCK :].tobytes() == data[h5file.USERBLOCK :]


@pytest.mark.parametrize("where", [0.1, 0.5, 0.999])  # in the first, a middle and the last piece
def test_one_flipped_bit_in_a_large_file_breaks_its_seal(large_sealed, several_cores, tmp_path, where):
    path, size = large_sealed
    damaged = tmp_path / "damaged.bin"
    shutil.copy(path, damaged)
    at = h5file.USERBLOCK + int((size - h5file.USERBLOCK) * where)
    with damaged.open("r+b") as fh:
        fh.seek(at)
        byte = fh.read(1)[0]
        fh.seek(at)
        fh.write(bytes([byte ^ 0x10]))
    with pytest.raises(h5file.SealError, match="fails its checksum"):
        h5file.check_seal(damaged, h5file.BUNDLE_MAGIC)
    with pytest.raises(h5file.SealError, match="fails its checksum"):
        h5file.read_sealed(damaged, h5file.BUNDLE_MAGIC)


def test_crc32_combine_matches_zlib_on_random_splits():
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    for cut in (0, 1, 7, 4096, 9_999):
        a, b = data[:cut], data[cut:]
        assert crc.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(data)


# ---------------------------------------------------------------- the config, field by field

# One valid other value for every config field (the test fails when a field has none here).
OTHER_VALUES = {
    "select": {
        "scope": "paligemma_with_expert.paligemma.",
        "include": r".*q_proj.*",
        "exclude": r"(?:^|\.)norm(?:\.|$)",
        "layers": ("paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj",),
    },
    "quant": {
        "weight_bits": 8,
        "act_bits": 6,
        "act_mode": "per_channel_static",
        "flow_steps": 20,
        "act_percentile": 99.0,
        "calib_steps": 8,
        "weight_search": "alpha",
        "gptq": True,
        "gptq_damp": 0.05,
        "min_sqnr_db": 15.0,
        "per_layer_weight_bits": (("paligemma_with_expert.paligemma.model.language_model.layers.0.mlp.up_proj", 8),),
        "weight_bits_by_pattern": ((r"mlp\.up_proj$", 8),),
        "act_mode_by_pattern": ((r"mlp\.up_proj$", "per_channel_static"),),
        "a4_min_sqnr_db": 20.0,
        "a4_vs_rtn_w4a8": True,
        "a4_rtn_margin_db": 1.0,
    },
    "transform": {
        "block_size": 32,  # alone: block_out_size stays
        "block_out_size": 32,
        "permute": True,
        "row_rot": "restore",
        "lambda_smooth": 0.3,
        "method": "duquant",
        "hadamard_signs": True,
        "max_rotation_step": 8,
        "seed": 1,
        "smooth_alpha": 0.5,
        "equalize": (0.0, 0.25),
        "smooth_search": (0.5,),
        "act_proxy": False,
        "proxy_smooth": (0.25,),
        "block_search": (32,),
        "rtn_candidate": False,
    },
}
ALONE_INVALID = {("transform", "row_rot")}  # needs the per-layer choice off too
NEEDS_PER_STEP = {("quant", "flow_steps")}  # only a per-step table has steps (left out otherwise)
NEEDS_A4_FLOOR = {("quant", "a4_vs_rtn_w4a8"), ("quant", "a4_rtn_margin_db")}  # compare what a4_min_sqnr_db measures


def test_every_config_field_is_compared(demo_bundles):
    import dataclasses

    base = resolve("llm_w4a8")
    for section, values in OTHER_VALUES.items():
        declared = {f.name for f in dataclasses.fields(getattr(base, section))}
        assert set(values) == declared, f"give OTHER_VALUES a value for [{section}] {declared - set(values)}"
    with BundleReader(demo_bundles["llm_w4a8"], in_memory=False) as reader:
        header = reader.header
    assert config_problems(header, base) == []
    for section, values in OTHER_VALUES.items():
        for name, value in values.items():
            assert getattr(getattr(base, section), name) != value, (section, name)
            if (section, name) in ALONE_INVALID:
                other = base.replace("transform", equalize=(), rtn_candidate=False).replace(section, **{name: value})
                fields = {f"{section}.{name}", "transform.equalize", "transform.rtn_candidate"}
            elif (section, name) in NEEDS_A4_FLOOR:
                needed = {"a4_min_sqnr_db": 20.0, "a4_vs_rtn_w4a8": True}
                other = base.replace("quant", **{**needed, name: value})
                fields = {f"{section}.{name}", *(f"quant.{k}" for k in needed)}
            elif (section, name) in NEEDS_PER_STEP:
                other = base.replace("quant", act_mode="per_step_static", **{name: value})
                fields = {f"{section}.{name}", "quant.act_mode"}
            else:
                other = base.replace(section, **{name: value})
                fields = {f"{section}.{name}"}
            got = {p.field for p in config_problems(header, other)}
            hit = {f for f in fields for g in got if g == f or g.startswith(f + ".")}  # maps differ per key
            assert hit == fields and len(got) == len(fields), (section, name, got)


def test_flow_steps_are_compared_only_for_per_step_scales():
    """quant.flow_steps is left out of the fingerprint unless act_mode is per_step_static (so
    older bundles keep theirs); then it is in, and two step counts differ."""
    base = resolve("dit_w4a8")
    assert "flow_steps" not in base.fingerprint_fields()["quant"]
    assert base.fingerprint_fields() == base.replace("quant", flow_steps=20).fingerprint_fields()
    stepped = base.replace("quant", act_mode="per_step_static")
    assert stepped.fingerprint_fields()["quant"]["flow_steps"] == 10
    assert stepped.fingerprint_fields() != stepped.replace("quant", flow_steps=20).fingerprint_fields()


def test_every_embed_field_is_compared_once_a_table_is_selected(demo_bundles):
    """[embed] is left out of the fingerprint while it selects nothing (so older bundles keep
    theirs); once it selects a table, each of its fields is compared."""
    import dataclasses

    with BundleReader(demo_bundles["llm_w4a8"], in_memory=False) as reader:
        header = reader.header
    base = resolve("llm_w4a8")
    assert {f.name for f in dataclasses.fields(base.embed)} == {"include", "bits", "group_size"}
    assert config_problems(header, base.replace("embed", bits=4, group_size=64)) == []
    selected = base.replace("embed", include="embed_tokens$")
    assert {p.field for p in config_problems(header, selected)} == {"embed"}
    for changes in ({"bits": 4, "group_size": 64}, {"group_size": 64}):
        other = selected.replace("embed", **changes)
        a, b = selected.fingerprint_fields()["embed"], other.fingerprint_fields()["embed"]
        assert {k for k in a if a[k] != b[k]} == set(changes)
        assert config_problems(header, other) and {p.field for p in config_problems(header, other)} == {"embed"}


@pytest.mark.parametrize(
    "section, changes",
    [("quant", {"act_bits": 0}), ("quant", {"act_bits": 4}), ("transform", {"block_size": 32})],
)
def test_load_refuses_a_bundle_of_another_act_width_or_input_block(demo_model, demo_bundles, section, changes):
    model = copy.deepcopy(demo_model)
    expected = resolve("llm_w4a8").replace(section, **changes)
    field = f"{section}.{next(iter(changes))}"
    with pytest.raises(ConfigMismatchError, match=field.replace(".", r"\.")):
        load_bundle(model, demo_bundles["llm_w4a8"], expect_config=expected)
    assert not any(isinstance(m, DuQuantLinear) for m in model.modules())


# ---------------------------------------------------------------- static scales: percentile and steps

CALIB_CONFIG = """name = "static"
[select]
scope = "net."
[quant]
act_mode = "per_channel_static"
act_percentile = 90.0
calib_steps = 2
[transform]
block_size = 16
"""


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(3)
        self.net = nn.Module()
        self.net.fc1 = nn.Linear(32, 48, bias=False)
        self.net.fc2 = nn.Linear(48, 16, bias=False)
        with torch.no_grad():
            self.net.fc1.weight.copy_(torch.from_numpy(outlier_weight(rng, 48, 32)))
            self.net.fc2.weight.copy_(torch.from_numpy(outlier_weight(rng, 16, 48)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc2(torch.relu(self.net.fc1(x)))


@pytest.fixture(scope="module")
def static_bundle(tmp_path_factory) -> tuple[Path, Path]:
    from duquant_pipeline.build import build_bundle

    root = tmp_path_factory.mktemp("static")
    save_file({k: v.contiguous() for k, v in TwoLayers().state_dict().items()}, str(root / "model.safetensors"))
    (root / "static.toml").write_text(CALIB_CONFIG)
    return build_bundle(resolve(root / "static.toml"), root, root / "out", jobs=1).path, root / "static.toml"


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(40, 32, generator=g) for _ in range(2)]
    return [*batches, 100.0 * torch.randn(40, 32, generator=g)]  # a third batch, far larger


def expected_scales(layer: DuQuantLinear, batches: list[torch.Tensor], pct: float) -> torch.Tensor:
    """The static rule written out: per channel, torch.quantile of |x_t| over each batch's
    rows, the largest batch's, over qmax (127 at 8 bits)."""
    per_batch = [torch.quantile(layer.rotate_input(b).abs(), pct / 100.0, dim=0) for b in batches]
    return torch.stack(per_batch).amax(dim=0) / 127.0


def test_calibrate_uses_the_percentile_and_the_first_calib_steps_batches(static_bundle):
    bundle, config = static_bundle
    model = TwoLayers()
    load_bundle(model, bundle, expect_config=str(config))
    fc1 = model.net.fc1
    batches = _batches()
    with torch.no_grad():
        want = expected_scales(fc1, batches[:2], 90.0)  # calib_steps = 2: the third is not seen
        with calibrate(model):
            for b in batches:
                model(b)
    got = fc1.act_scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert not torch.allclose(got, expected_scales(fc1, batches[:2], 100.0), rtol=1e-3)  # not the max
        assert not torch.allclose(got, expected_scales(fc1, batches, 90.0), rtol=1e-3)  # not every batch


def test_calibrate_arguments_override_the_bundle_defaults(static_bundle):
    bundle, config = static_bundle
    model = TwoLayers()
    load_bundle(model, bundle, expect_config=str(config))
    batches = _batches()
    with torch.no_grad():
        want = expected_scales(model.net.fc1, batches, 99.0)
        with calibrate(model, steps=3, percentile=99.0):
            for b in batches:
                model(b)
    torch.testing.assert_close(model.net.fc1.act_scale, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the environment mapping

# Every OPENPI_DUQUANT_* field variable: a raw value and the field value it must set.
ENV_CASES = {
    "SCOPE": ("paligemma_with_expert.", ("select", "scope", "paligemma_with_expert.")),
    "INCLUDE": (".*fc1.*", ("select", "include", ".*fc1.*")),
    "EXCLUDE": ("norm", ("select", "exclude", "norm")),
    "LAYERS": ("a.q_proj, b.k_proj", ("select", "layers", ("a.q_proj", "b.k_proj"))),
    "WBITS_DEFAULT": ("8", ("quant", "weight_bits", 8)),
    "WBITS": ("b.k:8,a.q:6", ("quant", "per_layer_weight_bits", (("a.q", 6), ("b.k", 8)))),
    "ABITS": ("0", ("quant", "act_bits", 0)),
    "ACT_MODE": ("per_channel_static", ("quant", "act_mode", "per_channel_static")),
    "ACT_PCT": ("99.5", ("quant", "act_percentile", 99.5)),
    "CALIB_STEPS": ("7", ("quant", "calib_steps", 7)),
    "BLOCK": ("32", ("transform", "block_size", 32)),
    "BLOCK_OUT": ("8", ("transform", "block_out_size", 8)),
    "PERMUTE": ("1", ("transform", "permute", True)),
    "ROW_ROT": ("0", ("transform", "row_rot", "0")),
    "LS": ("0.3", ("transform", "lambda_smooth", 0.3)),
    "METHOD": ("duquant", ("transform", "method", "duquant")),
}


def test_every_env_variable_sets_its_field():
    assert set(ENV_CASES) == set(_FIELDS), "give ENV_CASES a case for every variable"
    for suffix, (raw, (section, name, value)) in ENV_CASES.items():
        preset = "full_w4a8_seed" if suffix == "ROW_ROT" else "dit_w4a8"  # row_rot "0" is dit_w4a8's own
        base = resolve(preset)
        cfg = config_from_env(preset, environ={PREFIX + suffix: raw})
        assert getattr(getattr(cfg, section), name) == value, suffix
        changed = [
            (s, f) for s in ("select", "quant", "transform") for f in vars(getattr(base, s)) if
            getattr(getattr(cfg, s), f) != getattr(getattr(base, s), f)
        ]  # fmt: skip
        implied = {("transform", "block_out_size")} if suffix == "BLOCK" else set()
        assert set(changed) == {(section, name)} | implied, suffix
    both = config_from_env("dit_w4a8", environ={PREFIX + "BLOCK": "32", PREFIX + "BLOCK_OUT": "8"})
    assert (both.transform.block_size, both.transform.block_out_size) == (32, 8)
    assert config_from_env(environ={}).name == "dit_w4a8"  # the seed's default base
    assert config_from_env(environ={PREFIX + "CONFIG": "llm_w4a8"}).name == "llm_w4a8"


# ---------------------------------------------------------------- the fingerprint against its document


def _edit_header(bundle: Path, dest: Path, key: str, edit) -> Path:
    shutil.copy(bundle, dest)
    with h5py.File(dest, "r+") as f:
        f.attrs[key] = edit(h5file.read_attr(f, key))
    h5file.seal(dest, h5file.BUNDLE_MAGIC)  # re-sealed: only the fingerprint check can tell
    return dest


def test_a_re_sealed_header_whose_fingerprint_was_edited_is_refused(demo_bundles, demo_model, tmp_path):
    bundle = demo_bundles["dit_w4a8"]
    flipped = _edit_header(
        bundle, tmp_path / "fp.h5", "fingerprint", lambda fp: ("0" if fp[0] != "0" else "1") + fp[1:]
    )
    doc = _edit_header(
        bundle, tmp_path / "doc.h5", "fingerprint_json", lambda text: text.replace('"calib":null', '"calib":"x"')
    )
    with h5py.File(doc, "r") as f:
        assert '"calib":"x"' in h5file.read_attr(f, "fingerprint_json")  # the edit took
    for edited in (flipped, doc):
        with pytest.raises(BundleReadError, match="stored fingerprint does not match the document"):
            BundleReader(edited)
        with pytest.raises(BundleReadError, match="stored fingerprint does not match"):
            load_bundle(copy.deepcopy(demo_model), edited)


# ---------------------------------------------------------------- the prefix's dot boundary


class Holder(nn.Module):
    def __init__(self, name: str, weight: torch.Tensor) -> None:
        super().__init__()
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(weight)
        self.add_module(name, layer)


def test_a_detected_prefix_ends_at_a_dot(tmp_path):
    from duquant_pipeline.build import build_bundle

    weight = torch.from_numpy(outlier_weight(np.random.default_rng(4), 32, 32)).float()
    save_file({"q_proj.weight": weight}, str(tmp_path / "model.safetensors"))
    (tmp_path / "top.toml").write_text('name = "top"\n[transform]\nblock_size = 16\n')
    bundle = build_bundle(resolve(tmp_path / "top.toml"), tmp_path, tmp_path / "out", jobs=1).path
    with pytest.raises(ModelMismatchError, match="q_proj"):
        load_bundle(Holder("xq_proj", weight), bundle)  # "x" is not a prefix of "q_proj"
    parent = nn.Module()
    parent.model = Holder("q_proj", weight)
    report = load_bundle(parent, bundle)
    assert report.prefix == "model." and isinstance(parent.model.q_proj, DuQuantLinear)
