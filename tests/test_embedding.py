"""Quantized embedding tables: the layer's numbers against a slow reference, its nn.Embedding
behaviour, the bundle's refusals, and tied heads on transformers' own PaliGemma."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import write_checkpoint
from duquant_pipeline.build import build_bundle
from duquant_pipeline.build_fingerprint import fingerprint_document
from duquant_runtime import (
    BundleReadError,
    CheckpointMismatchError,
    ModelMismatchError,
    QuantEmbedding,
    TiedHead,
    TiedWeightsError,
    load_bundle,
)
from duquant_runtime.bundle import seal
from duquant_runtime.config import from_dict, resolve
from fuzz_reader import linear_tree

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))

TABLE = "net.tok.embed_tokens"


def config(bits: int, group: int, name: str = "emb"):
    return from_dict(
        {
            "name": name,
            "select": {"scope": "net."},
            "embed": {"include": "embed_tokens$", "bits": bits, "group_size": group},
        }
    )


def tensors(rows: int = 300, dim: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((rows, dim)) * rng.uniform(0.1, 3.0, (rows, 1))  # rows of unlike scales
    table[:, 5] *= 8  # one heavy column, as token tables have
    return {TABLE + ".weight": table, "net.a.q_proj.weight": rng.standard_normal((16, dim))}


def model_for(t: dict[str, np.ndarray]) -> torch.nn.Module:
    layers = {k[: -len(".weight")]: [*v.shape, False, "embed_tokens" in k] for k, v in t.items()}
    model = linear_tree(layers)
    model.load_state_dict({k: torch.from_numpy(v).float() for k, v in t.items()})
    return model


def built(tmp_path: Path, bits: int, group: int, t: dict[str, np.ndarray] | None = None) -> Path:
    t = tensors() if t is None else t
    ckpt = write_checkpoint(tmp_path / "ckpt" / "model.safetensors", t)
    return build_bundle(config(bits, group), ckpt, tmp_path / "out", jobs=1).path


def reference_rows(path: Path, ids: torch.Tensor, group: int) -> torch.Tensor:
    """The stored codes and scales, dequantized one element at a time (DESIGN §5's layout:
    low nibble first, codes offset by 8)."""
    with h5py.File(path, "r") as f:
        stored, scales = f[f"layers/{TABLE}/qweight"][()], f[f"layers/{TABLE}/w_scale"][()]
    rows = []
    for i in ids.reshape(-1).tolist():
        row = []
        for col in range(stored.shape[1] * (2 if stored.dtype == np.uint8 else 1)):
            if stored.dtype == np.uint8:
                byte = int(stored[i, col // 2])
                code = ((byte >> 4) if col % 2 else (byte & 15)) - 8
            else:
                code = int(stored[i, col])
            row.append(code * float(scales[i, col // group if group else 0]))
        rows.append(row)
    return torch.tensor(rows).view(*ids.shape, -1)


@pytest.mark.parametrize(("bits", "group"), [(8, 0), (4, 16), (4, 0)])
def test_forward_is_the_stored_codes_times_their_scales(tmp_path, bits, group):
    path = built(tmp_path, bits, group)
    model = model_for(tensors())
    float_rows = model.net.tok.embed_tokens.weight.detach().clone()
    load_bundle(model, path, config(bits, group))
    table = model.net.tok.embed_tokens
    assert isinstance(table, QuantEmbedding) and table.bits == bits
    ids = torch.tensor([[0, 7, 299, 7], [150, 1, 2, 3]])
    out = table(ids)
    assert out.shape == (2, 4, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_rows(path, ids, group), rtol=1e-6, atol=1e-6)
    err = float((out - float_rows[ids]).norm() / float_rows[ids].norm())
    assert err < (0.01 if bits == 8 else 0.2)  # a quantized table, but the same table


def test_weight_metadata_is_free_and_values_come_on_use(tmp_path, monkeypatch):
    path = built(tmp_path, 8, 0)
    model = model_for(tensors())
    load_bundle(model, path)
    table = model.net.tok.embed_tokens
    dense = table.weight.materialize()
    monkeypatch.setattr(QuantEmbedding, "dense_weight", lambda self: pytest.fail("materialized"))
    assert table.weight.shape == (300, 64) and table.weight.dtype == torch.float32 and table.weight.numel() == 19200
    monkeypatch.undo()
    torch.testing.assert_close(table(torch.arange(300)), dense)
    assert table.buffer_bytes() == 300 * 64 + 300 * 4  # int8 codes + one float32 scale per row


def test_a_tied_head_over_several_chunks_keeps_every_row(tmp_path, monkeypatch):
    """300 rows in chunks of 128: two whole chunks and a partial last one, each in its place."""
    from duquant_runtime import embedding

    path = built(tmp_path, 4, 16)
    model = model_for(tensors())
    load_bundle(model, path)
    head = TiedHead(model.net.tok.embed_tokens)
    monkeypatch.setattr(embedding, "HEAD_CHUNK_ROWS", 128)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0))
    table = reference_rows(path, torch.arange(300), 16).float()  # [300, 64], dequantized here from the file
    got = head(x)
    assert got.shape == (2, 3, 300)
    torch.testing.assert_close(got, x @ table.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, x @ head.table.weight.T, rtol=1e-5, atol=1e-5)


def test_bf16_model_gets_bf16_rows_and_padding_idx_is_kept(tmp_path):
    t = tensors()
    path = built(tmp_path, 4, 16, t)
    model = model_for(t).to(torch.bfloat16)
    model.net.tok.embed_tokens.padding_idx = 0
    load_bundle(model, path)
    table = model.net.tok.embed_tokens
    assert table.padding_idx == 0 and table(torch.tensor([3, 0])).dtype == torch.bfloat16
    with pytest.raises(IndexError):
        table(torch.tensor([300]))


def test_max_norm_another_vocabulary_and_another_checkpoint_are_refused(tmp_path):
    path = built(tmp_path, 8, 0)
    model = model_for(tensors())
    model.net.tok.embed_tokens.max_norm = 1.0
    with pytest.raises(ModelMismatchError, match="max_norm"):
        load_bundle(model, path)
    assert type(model.net.tok.embed_tokens) is torch.nn.Embedding  # untouched
    linear = {"net.a.q_proj.weight": tensors()["net.a.q_proj.weight"]}  # only the table differs
    with pytest.raises(ModelMismatchError, match=r"table size differs .* vocabulary"):
        load_bundle(model_for({**tensors(rows=301), **linear}), path)
    with pytest.raises(CheckpointMismatchError, match="embed_tokens: weight differs"):
        load_bundle(model_for({**tensors(seed=1), **linear}), path)


def test_a_damaged_table_is_refused_before_a_number(tmp_path):
    path = built(tmp_path, 4, 16)
    with h5py.File(path, "r+") as f:  # scales of another group size: a shape the meta does not give
        data = f[f"layers/{TABLE}/w_scale"][()]
        del f[f"layers/{TABLE}/w_scale"]
        f[f"layers/{TABLE}/w_scale"] = data.reshape(300, 2, 2)[:, :, 0].copy()
        f.attrs.pop("index_json")
    seal(path)
    with pytest.raises(BundleReadError, match=r"embed_tokens.*w_scale"):
        load_bundle(model_for(tensors()), path)


def test_group_size_must_tile_the_row_and_config_fingerprints(tmp_path):
    ckpt = write_checkpoint(tmp_path / "model.safetensors", tensors())
    with pytest.raises(Exception, match=r"64 columns, which embed\.group_size 48 does not divide"):
        build_bundle(config(4, 48), ckpt, tmp_path / "out", jobs=1)
    plain = from_dict({"name": "x", "select": {"scope": "net."}})
    assert "embed" not in fingerprint_document(plain, [])["config"]  # configs before [embed] keep theirs
    assert fingerprint_document(config(8, 0), [])["config"]["embed"]["bits"] == 8
    assert resolve("full_w4a8").embed.bits == 8 and not resolve("llm_w4a8").embed.include


# ---------------------------------------------------------------- tied heads, transformers


@pytest.fixture(scope="module")
def paligemma(tmp_path_factory):
    """The coupled testbed's PaliGemma + expert, saved as openpi saves: save_model keeps the tied
    table's one name, lm_head.weight, and full_w4a8's bundle of it."""
    from safetensors.torch import save_model
    from testbeds import build_pi05

    d = tmp_path_factory.mktemp("paligemma")
    model = build_pi05(seed=2, coupled=True, layers=1).eval()
    save_model(model, str(d / "model.safetensors"))
    return model, build_bundle(resolve("full_w4a8"), d, d / "out", jobs=1).path


def test_tied_head_reads_the_same_codes_and_survives_tie_weights_and_save_model(paligemma, tmp_path):
    from safetensors.torch import load_model, save_model

    model, path = paligemma
    quantized = copy.deepcopy(model)
    report = load_bundle(quantized, path, "full_w4a8")
    pg = quantized.paligemma_with_expert.paligemma
    table, head = pg.model.language_model.embed_tokens, pg.lm_head
    assert isinstance(table, QuantEmbedding) and isinstance(head, TiedHead) and head.table is table
    assert report.tied_heads == ["paligemma_with_expert.paligemma.lm_head"]
    # one copy: the head holds no tensor, and its weight is the table's
    assert not list(head.buffers()) and not list(head.parameters()) and head.weight.layer is table
    x = torch.randn(2, 3, table.embedding_dim)
    torch.testing.assert_close(head(x), x @ table.weight.materialize().T)
    # GemmaTextScaledWordEmbedding's own forward (rows times embed_scale) runs on the codes;
    # transformers 4.x (openpi's pin) has a plain nn.Embedding and scales in the model's forward
    ids = torch.tensor([[1, 5, 9]])
    scale = getattr(model.paligemma_with_expert.paligemma.model.language_model.embed_tokens, "embed_scale", 1.0)
    torch.testing.assert_close(table(ids), table.rows(ids.reshape(-1), torch.float32).view(1, 3, -1) * scale)
    pg.tie_weights()
    assert pg.lm_head is head and head.table is table
    save_model(quantized, str(tmp_path / "q.safetensors"))
    again = copy.deepcopy(model)
    load_bundle(again, path)
    again.paligemma_with_expert.paligemma.model.language_model.embed_tokens.qweight.zero_()
    load_model(again, str(tmp_path / "q.safetensors"))
    torch.testing.assert_close(again.paligemma_with_expert.paligemma.lm_head(x), head(x))


def test_a_tied_head_is_refused_when_asked_and_the_model_is_untouched(paligemma):
    model, path = paligemma
    quantized = copy.deepcopy(model)
    before = {k: v.clone() for k, v in quantized.state_dict().items()}
    with pytest.raises(TiedWeightsError, match=r"lm_head shares its weight .* pass tied_heads='share'"):
        load_bundle(quantized, path, tied_heads="refuse")
    after = quantized.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    pg = quantized.paligemma_with_expert.paligemma
    assert pg.lm_head.weight is pg.model.language_model.embed_tokens.weight  # still one tied pair


def test_inspect_plot_draws_every_selected_layer(demo_bundles, tmp_path):
    import matplotlib.image
    from click.testing import CliRunner
    from duquant_pipeline.cli import main
    from duquant_pipeline.plot import DPI, PANEL_INCHES, plot_report
    from duquant_pipeline.report import read_report

    path = demo_bundles["full_w4a8"]
    picture = tmp_path / "quality.png"
    done = CliRunner().invoke(main, ["inspect", str(path), "--plot", str(picture)])
    assert done.exit_code == 0, done.output
    height, width, _ = matplotlib.image.imread(str(picture)).shape
    assert (width, height) == (4 * PANEL_INCHES[0] * DPI, PANEL_INCHES[1] * DPI)  # vision, llm, expert, table
    info = read_report(path)
    fig = plot_report(info, tmp_path / "again.png")
    layers = fig.axes[:3]
    chosen = sum(len(c.get_offsets()) for ax in layers for c in ax.collections if c.get_gid() == "chosen")
    rtn = sum(len(c.get_offsets()) for ax in layers for c in ax.collections if c.get_gid() == "baseline")
    assert chosen == rtn == len(info["quality"]) == 451  # every Linear; the table in its own panel
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["expert", "llm", "vision", "embedding"]
    assert sum(len(c.get_offsets()) for c in fig.axes[3].collections if c.get_gid() == "table") == 1


def test_weight_bits_by_pattern_puts_the_adaptive_norms_at_8_bits(demo_bundles):
    from duquant_runtime.bundle import BundleReader
    from duquant_runtime.errors import ConfigError

    q = resolve("full_w4a8").quant
    assert q.bits_for("paligemma_with_expert.gemma_expert.model.layers.3.post_attention_layernorm.dense") == 8
    assert q.bits_for("paligemma_with_expert.gemma_expert.model.layers.3.mlp.up_proj") == 4
    with pytest.raises(ConfigError, match="is not a regular expression"):
        from_dict({"name": "x", "quant": {"weight_bits_by_pattern": {"(": 8}}})
    with BundleReader(demo_bundles["full_w4a8"], in_memory=False) as reader:
        bits = {n: reader.layer_summary(n)["weight_bits"] for n in reader.header.layer_names}
    dense = [n for n in bits if n.endswith(".dense")]
    assert len(dense) == 37 and all(bits[n] == 8 for n in dense)
    assert sum(b == 4 for b in bits.values()) == 414
