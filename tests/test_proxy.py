"""The data-free activation estimate (pipeline/proxy.py) and the choice ranked on it.

* the producers are found by the Gemma/Llama, SigLIP and BERT names, adaptive norms included,
  and a layer without any gets none;
* the estimate equals the formulas written out here (a norm's gain, Gemma's 1 + w, LayerNorm's
  bias, a producer's rows, gelu by Monte Carlo);
* the variances through a transform equal diag(Tᵀ·diag(v)·T) with T built as a matrix;
* ranked on the estimate, the choice is at least as good on inputs with those channel sizes
  as the unweighted choice, and strictly better on a coupled layer;
* the producers are fingerprinted apart from the layers, so a changed norm gain changes the
  bundle's fingerprint and `verify` names the tensor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_checkpoint
from duquant_pipeline import proxy
from duquant_pipeline.build import build_bundle
from duquant_pipeline.cli import main
from duquant_pipeline.pack import pack_layer
from duquant_pipeline.quality import runtime_layer, variance_in_basis
from duquant_pipeline.recipe import compute_transform
from duquant_pipeline.select import SelectedLayer
from duquant_runtime.bundle import BundleReader
from duquant_runtime.config import DuQuantConfig, TransformConfig, resolve

G = "model.layers.0."


def gemma_shapes(width: int = 32, mlp: int = 64, kv_rows: int = 16, adaptive: bool = False) -> dict:
    norm = (lambda n: {f"{n}.dense.weight": (3 * width, width)}) if adaptive else (lambda n: {f"{n}.weight": (width,)})
    return {
        **norm(f"{G}input_layernorm"),
        **norm(f"{G}post_attention_layernorm"),
        f"{G}self_attn.q_proj.weight": (width, width),
        f"{G}self_attn.v_proj.weight": (kv_rows, width),
        f"{G}self_attn.o_proj.weight": (width, width),
        f"{G}mlp.gate_proj.weight": (mlp, width),
        f"{G}mlp.up_proj.weight": (mlp, width),
        f"{G}mlp.down_proj.weight": (width, mlp),
    }


def test_producers_by_family():
    shapes = gemma_shapes()
    q = proxy.find_source(f"{G}self_attn.q_proj", shapes, 32)
    assert q == proxy.Norm(f"{G}input_layernorm.weight")
    o = proxy.find_source(f"{G}self_attn.o_proj", shapes, 32)  # 16 v rows read by 2 query heads
    assert isinstance(o, proxy.Rows) and o.weight == f"{G}self_attn.v_proj.weight" and o.source == q
    down = proxy.find_source(f"{G}mlp.down_proj", shapes, 64)
    assert isinstance(down, proxy.Gated) and down.up.weight.endswith("up_proj.weight")
    assert proxy.kind(q) == "norm" and proxy.kind(o) == proxy.kind(down) == "producer rows"
    assert set(proxy.tensor_names(down)) == {
        f"{G}mlp.gate_proj.weight",
        f"{G}mlp.up_proj.weight",
        f"{G}post_attention_layernorm.weight",
    }
    ada = proxy.find_source(f"{G}mlp.up_proj", gemma_shapes(adaptive=True), 32)
    assert ada == proxy.Norm(None, dense=f"{G}post_attention_layernorm.dense.weight")
    # wider v rows under grouped-query attention: which row a column reads is unknown -> none
    wide = gemma_shapes(width=1024, kv_rows=512)
    assert proxy.find_source(f"{G}self_attn.o_proj", wide, 1024) is None
    assert proxy.find_source("lm_head", shapes, 32) is None and proxy.kind(None) == "none"

    siglip = {"enc.layers.1.layer_norm2.weight": (8,), "enc.layers.1.layer_norm2.bias": (8,)}
    siglip |= {"enc.layers.1.mlp.fc1.weight": (16, 8), "enc.layers.1.mlp.fc1.bias": (16,)}
    fc2 = proxy.find_source("enc.layers.1.mlp.fc2", siglip, 16)
    assert isinstance(fc2, proxy.Rows) and fc2.activated and fc2.source.bias == "enc.layers.1.layer_norm2.bias"

    bert = {"embeddings.LayerNorm.weight": (8,), "encoder.layer.0.output.LayerNorm.weight": (8,)}
    assert proxy.find_source("encoder.layer.0.attention.self.query", bert, 8).weight == "embeddings.LayerNorm.weight"
    assert proxy.find_source("encoder.layer.1.attention.self.key", bert, 8).weight.startswith("encoder.layer.0.output")


def _gelu_rms_monte_carlo(sigma: np.ndarray, mean: np.ndarray, n: int = 400_000) -> np.ndarray:
    z = np.random.default_rng(0).standard_normal(n)
    out = []
    for s, m in zip(sigma, mean, strict=True):
        v = torch.nn.functional.gelu(torch.from_numpy(m + s * z), approximate="tanh").numpy()
        out.append(np.sqrt(np.mean(v * v)))
    return np.array(out)


def test_estimates_follow_the_formulas():
    rng = np.random.default_rng(1)
    gain = rng.normal(0.0, 0.1, 32)  # Gemma stores w for a gain of 1 + w
    gain[3] = 29.0
    gate, up = rng.standard_normal((64, 32)), rng.standard_normal((64, 32))
    tensors = {
        f"{G}post_attention_layernorm.weight": gain,
        f"{G}mlp.gate_proj.weight": gate,
        f"{G}mlp.up_proj.weight": up,
    }
    shapes = {**gemma_shapes(), **{k: v.shape for k, v in tensors.items()}}

    def read(name: str) -> np.ndarray:
        return tensors[name].astype(np.float32)

    gemma_norm = proxy.find_source(f"{G}mlp.up_proj", shapes, 32)
    tensors_named = {k.replace("model.", "gemma."): v for k, v in tensors.items()}
    named = proxy.Norm(f"gemma.{G[6:]}post_attention_layernorm.weight")
    a = proxy.activation_rms(named, lambda n: tensors_named[n].astype(np.float32), 32)
    np.testing.assert_allclose(a, np.abs(1.0 + gain), rtol=1e-5)  # "gemma" in the name, weights around 0
    np.testing.assert_allclose(proxy.activation_rms(gemma_norm, read, 32), np.abs(gain), rtol=1e-5)

    a_in = np.abs(gain)
    down = proxy.activation_rms(proxy.find_source(f"{G}mlp.down_proj", shapes, 64), read, 64)
    sd_gate = np.sqrt((gate**2) @ a_in**2)
    sd_up = np.sqrt((up**2) @ a_in**2)
    want = _gelu_rms_monte_carlo(sd_gate, np.zeros(64)) * sd_up
    np.testing.assert_allclose(down, want, rtol=0.02)

    ln = proxy.Norm("n.weight", "n.bias")
    w, b = rng.standard_normal(8), rng.standard_normal(8)
    got = proxy.activation_rms(ln, {"n.weight": w, "n.bias": b}.__getitem__, 8)
    np.testing.assert_allclose(got, np.sqrt(w * w + b * b), rtol=1e-6)

    dense = rng.standard_normal((24, 8)) * 0.3
    dense_b = rng.standard_normal(24)
    ada = proxy.activation_rms(proxy.Norm(None, dense="d.w", dense_bias="d.b"), {"d.w": dense, "d.b": dense_b}.get, 8)
    scale = (1 + dense_b[:8]) ** 2 + (dense[:8] ** 2).sum(1)
    shift = dense_b[8:16] ** 2 + (dense[8:16] ** 2).sum(1)
    np.testing.assert_allclose(ada, np.sqrt(scale + shift), rtol=1e-6)

    v = rng.standard_normal((16, 32))  # one KV head of 16 rows read by two query heads
    tensors[f"{G}self_attn.v_proj.weight"] = v
    tensors[f"{G}input_layernorm.weight"] = np.ones(32)
    o = proxy.activation_rms(proxy.find_source(f"{G}self_attn.o_proj", shapes, 32), read, 32)
    np.testing.assert_allclose(o, np.tile(np.linalg.norm(v, axis=1), 2), rtol=1e-5)


@pytest.mark.parametrize("pre", ["none", "eq"])
def test_variances_through_a_transform(pre):
    """diag(Tᵀ diag(v) T) with T the transform's matrix (its stages applied to the identity)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((24, 40))
    from duquant_pipeline.pretransforms import Equalize
    from duquant_pipeline.rotations.base import NO_ROTATION

    t = TransformConfig(block_size=16, permute=True)
    tr = compute_transform(w, t, pre=Equalize(0.5) if pre == "eq" else None)
    var = rng.uniform(0.1, 30.0, 40)
    T = tr.apply_input(torch.eye(40, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(variance_in_basis(tr, var), np.diag(T.T @ np.diag(var) @ T), rtol=1e-9)
    plain = compute_transform(w, t, rotation=NO_ROTATION)
    np.testing.assert_allclose(variance_in_basis(plain, var), var)


def _layer(rng: np.random.Generator, coupling: float, out: int = 96, inp: int = 256):
    """Four activation channels 20-60x the others (sizes ``act``), their weight columns divided by
    act^coupling: 1 is trained networks' full compensation, 0.5 half of it."""
    w = rng.standard_normal((out, inp)) / np.sqrt(inp)
    act = np.ones(inp)
    big = rng.choice(inp, 4, replace=False)
    act[big] = rng.uniform(20, 60, 4)
    w[:, big] /= act[big] ** coupling
    return w.astype(np.float32), act


def _output_sqnr(pack, x: np.ndarray, w: np.ndarray) -> float:
    layer = runtime_layer(pack, 8, "per_token_dynamic", torch.float32)
    with torch.no_grad():
        y = layer(torch.from_numpy(x).float()).double().numpy()
    ref = x @ w.T.astype(np.float64)
    return 10 * np.log10((ref**2).sum() / ((y - ref) ** 2).sum())


def test_ranking_on_the_estimate_beats_the_unweighted_choice():
    """On inputs whose channel sizes are the estimate's, the proxy-ranked pack is never worse than
    the unweighted one, and better by over 1 dB where the weights hide only half of the outliers
    (the unweighted measure cannot see the activations: it keeps plain rounding after equalizing)."""
    cfg = resolve("full_w4a8")
    gains: dict[float, list[float]] = {0.5: [], 1.0: []}
    for coupling, seed in [(c, s) for c in gains for s in range(2)]:
        rng = np.random.default_rng(10 + seed)
        w, act = _layer(rng, coupling)
        x = rng.standard_normal((2048, w.shape[1])) * act
        layer = SelectedLayer("l", "l.weight", None, *w.shape, "F32", 4)
        ranked = pack_layer(w, None, layer, "F32", cfg, act_rms=act)
        plain = pack_layer(w, None, layer, "F32", cfg)
        assert ranked.act_source == "given" and plain.act_source == "none"
        gains[coupling].append(_output_sqnr(ranked, x, w) - _output_sqnr(plain, x, w))
    assert min(gains[1.0] + gains[0.5]) > -0.1 and min(gains[0.5]) > 1.0, gains


def test_producers_are_fingerprinted_and_verified(tmp_path):
    """A changed norm gain (no layer's weight) gives another fingerprint, and verify names it."""
    rng = np.random.default_rng(3)
    tensors = {
        f"{G}input_layernorm.weight": 1.0 + rng.normal(0, 0.1, 32),
        f"{G}self_attn.q_proj.weight": rng.standard_normal((32, 32)) / 6,
        f"{G}self_attn.v_proj.weight": rng.standard_normal((32, 32)) / 6,
        f"{G}mlp.down_proj.weight": rng.standard_normal((32, 48)) / 7,  # no gate/up here: no estimate
    }
    config = DuQuantConfig(name="fp").replace("select", scope="model.layers.")
    a = write_checkpoint(tmp_path / "a" / "model.safetensors", tensors)
    tensors[f"{G}input_layernorm.weight"] = tensors[f"{G}input_layernorm.weight"] * 1.5
    b = write_checkpoint(tmp_path / "b" / "model.safetensors", tensors)
    built_a = build_bundle(config, a, tmp_path / "out_a", jobs=1)
    built_b = build_bundle(config, b, tmp_path / "out_b", jobs=1)
    assert built_a.fingerprint != built_b.fingerprint
    with BundleReader(built_a.path) as reader:
        doc = reader.header.fingerprint_doc
        assert [row[0] for row in doc["producers"]] == [f"{G}input_layernorm.weight"]
        assert {row[0] for row in doc["source"]} == {
            f"{G}{n}.weight" for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
        }
        assert reader.read_layer(f"{G}self_attn.q_proj").act_source == "norm"
        assert reader.read_layer(f"{G}mlp.down_proj").act_source == "none"
    result = CliRunner().invoke(main, ["verify", str(built_a.path), "--ckpt", str(b)])
    assert result.exit_code == 1 and "input_layernorm.weight" in result.output + result.stderr


def test_activation_error_follows_its_formula():
    """Per token: 2 ln(n)·max_k σ_k²/qmax²/12·‖W_t‖²; per channel: Σ_k 2 ln(n)·σ_k²/qmax²/12·‖W_t[:, k]‖²
    (σ² through the transform); ‖W‖² given for a rotation gives the same figure without a pass."""
    from duquant_pipeline.quality import activation_error

    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 64))
    var = rng.uniform(0.5, 40.0, 64)
    tr = compute_transform(w, TransformConfig(block_size=16))
    var_t = variance_in_basis(tr, var)
    energy = (np.asarray(tr.w_t) ** 2).sum(0)
    c = 2 * np.log(64) / 127**2 / 12
    np.testing.assert_allclose(activation_error(tr, var, 8, True), c * var_t.max() * energy.sum(), rtol=1e-6)
    np.testing.assert_allclose(activation_error(tr, var, 8, False), c * var_t @ energy, rtol=1e-6)
    given = activation_error(tr, var, 8, True, float((w**2).sum()))
    np.testing.assert_allclose(given, activation_error(tr, var, 8, True), rtol=1e-5)
    assert activation_error(tr, var, 0, True) == 0.0


def test_inspect_and_the_plot_say_where_each_choice_read_its_activation_sizes(tmp_path):
    """inspect counts the sources and lists each layer's in --quality; the plot rings the layers
    chosen without an estimate."""
    from duquant_pipeline.plot import plot_report
    from duquant_pipeline.report import read_report

    rng = np.random.default_rng(5)
    tensors = {
        f"{G}input_layernorm.weight": 1.0 + rng.normal(0, 0.1, 32),
        f"{G}self_attn.q_proj.weight": rng.standard_normal((32, 32)) / 6,
        f"{G}mlp.down_proj.weight": rng.standard_normal((32, 48)) / 7,
    }
    config = DuQuantConfig(name="src").replace("select", scope="model.layers.")
    built = build_bundle(config, write_checkpoint(tmp_path / "m" / "model.safetensors", tensors), tmp_path, jobs=1)
    result = CliRunner().invoke(main, ["inspect", str(built.path), "--quality"])
    assert result.exit_code == 0
    assert "act sizes    none 1, norm 1 (" in result.output
    rows = [line for line in result.output.splitlines() if line.rstrip().endswith(("q_proj", "down_proj"))]
    assert any(" norm " in r and r.endswith("q_proj") for r in rows) and any(" none " in r for r in rows)
    fig = plot_report(read_report(built.path), tmp_path / "q.png")
    ringed = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "unweighted"]
    assert len(ringed) == 1 and len(ringed[0].get_offsets()) == 1
