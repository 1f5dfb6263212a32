"""Action-chunk quality on openpi's real ``PI0Pytorch`` code: checkpoint -> build -> load_bundle -> sample_actions.

openpi is never vendored here: its source and a transformers copy patched with its
``transformers_replace`` files live in scratch folders outside the repository. Set up once
(the venv has torch 2.7.1, transformers 4.53.2 and duquant-packs installed editable)::

    MIRROR=/work/.mirror/Physical-Intelligence+openpi/repo   # a clone of openpi works too
    VENV=/work/main/.venv-compat/openpi
    mkdir -p /work/openpi-src /work/openpi-tf
    git -C $MIRROR archive HEAD src | tar -x -C /work/openpi-src
    cp -r $VENV/lib/python3.11/site-packages/transformers /work/openpi-tf/transformers
    cp -r /work/openpi-src/src/openpi/models_pytorch/transformers_replace/* /work/openpi-tf/transformers/

then, from the repository root::

    PYTHONPATH=/work/openpi-tf:/work/openpi-src/src:$PWD/bench $VENV/bin/python bench/openpi_model.py \\
        [--variants pi05_plain,pi05_coupled,pi0_coupled] [--recipes unweighted,default,simple] [--out PATH]

The model is openpi's ``PI0Pytorch`` (``pi0_pytorch.py``, ``gemma_pytorch.py``,
``preprocessing_pytorch.py`` and the patched Gemma / PaliGemma / SigLIP) at reduced size, with
openpi's own initialization. Stubbed or shrunk, because the rest is JAX or too large for CPUs:

* ``openpi.models.gemma`` (JAX / flax): a stub whose ``get_config`` returns small widths for
  ``gemma_2b`` (the LLM) and ``gemma_300m`` (the action expert); heads 8, 1 KV head as in openpi;
* ``openpi.shared.image_tools`` (JAX): a stub; images are fed at 224 x 224 so nothing is resized;
* ``gemma_pytorch`` builds SigLIP from PaliGemma's default config (So400m, 27 layers, 1152 wide)
  and a 257,152-token vocabulary: its ``PaliGemmaForConditionalGeneration`` and
  ``GemmaForCausalLM`` are wrapped to shrink SigLIP (224 px input as in openpi, patch 28: 64
  tokens per image where openpi has 256), the projector to the LLM width, and the vocabularies;
* ``Observation`` (JAX): a namespace with the fields ``preprocess_observation_pytorch`` reads.

Variants (default: the first three): ``pi05_plain`` (openpi's init), ``pi05_coupled`` and
``pi0_coupled`` (pi05=False), ``pi0_plain``. "coupled" is the same init plus coupled outliers
(bench/testbeds.py: ~1 % of each norm's output channels x8..64 undone on the consumers' columns,
v -> o and up -> down rows; the expert's adaRMS norms scale the rows of their time-conditioned
``dense``; v -> o shares one factor per layer across the LLM and the expert, whose attention reads
the LLM's cached values). Coupling is function preserving (checked on the actions).

For each preset (llm_w4a8, dit_w4a8, full_w4a8) and recipe (bench/cases.py), a data-free bundle is
built from the model's ``safetensors.torch.save_model`` checkpoint (as openpi's converter writes
it) and loaded into a copy of the float model; RTN W4A8 (bench/baselines.py) is swapped into the
Linears the bundle replaced, at the config's bits per layer (full_w4a8's adaptive-norm denses at 8;
not its int8 embedding table, which only the bundles quantize). Metric: relative L2
error of ``sample_actions(noise=fixed, num_steps=10)`` against the float model on the same
observations (random images in [-1, 1], a 48-token padded prompt, random state). Prints one table
per variant and writes JSON to --out. As a yardstick each table also gives the error of the float
model with its LLM's v_proj zeroed (the actions then see no image or prompt): at openpi's init
pi0.5's adaRMS gates are ~0.02 (the dense's weight is drawn at std 0.02, its bias zeroed), so the
expert's layers barely move its residual stream and every error is small there; pi0 has no gates.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from baselines import RTNLinear
from cases import W4A4_CASES, recipes
from duquant_pipeline.build import build_bundle
from duquant_runtime import capture_stats, instrument, load_bundle
from duquant_runtime.config import QuantConfig, resolve
from testbeds import (
    _channel_factors,
    _couple_norm,
    _couple_rows,
    _couple_siglip_layer,
    _gemma_norm,
    _scale_columns,
    _scale_rows,
)


@dataclass
class GemmaSize:
    """The fields of ``openpi.models.gemma.Config`` that the PyTorch model reads."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


# openpi's gemma_2b is 2048 wide, mlp 16384; gemma_300m 1024, mlp 4096; both 18 deep, 8 heads,
# 1 KV head, head_dim 256. The two must share depth, KV heads and head_dim (the expert attends
# to the LLM's KV cache).
DEPTH = 4
SIZES = {
    "gemma_2b": GemmaSize(width=512, depth=DEPTH, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64),
    "gemma_300m": GemmaSize(width=256, depth=DEPTH, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=64),
}
# openpi's SigLIP: 1152 wide, mlp 4304, 16 heads, 27 layers, 224 px, patch 14 (image_size stays 224).
VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_attention_heads": 4,
    "num_hidden_layers": DEPTH,
    "patch_size": 28,  # 64 tokens per image (openpi: 256), to fit CPUs
}
VOCAB = 1024  # openpi: 257,152
ACTION_DIM, ACTION_HORIZON, PROMPT_LEN, IMAGE = 32, 50, 48, 224
PRESETS = {"llm": "llm_w4a8", "dit": "dit_w4a8", "full": "full_w4a8"}
VARIANTS = {  # name -> (pi05, coupled outliers)
    "pi05_plain": (True, False),
    "pi05_coupled": (True, True),
    "pi0_coupled": (False, True),
    "pi0_plain": (False, False),
}
DEFAULT_VARIANTS = "pi05_plain,pi05_coupled,pi0_coupled"


def _stub(name: str, **attrs: object) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(sys.modules[parent], child, module)


def _no_resize(*_: object, **__: object) -> None:
    raise RuntimeError("image_tools is stubbed (JAX): feed images at 224 x 224")


def import_openpi() -> tuple[type, tuple[str, ...]]:
    """openpi's ``PI0Pytorch`` class and image keys, with the JAX-only imports stubbed and the model shrunk."""
    try:
        for name in ("openpi.models", "openpi.shared", "transformers.models.siglip.check"):  # check: the patch's
            importlib.import_module(name)
    except ImportError as e:
        raise SystemExit(f"{e}: set PYTHONPATH to the scratch copies (see the module docstring)") from None
    _stub("openpi.models.gemma", Config=GemmaSize, get_config=lambda variant: SIZES[variant])
    _stub("openpi.shared.image_tools", resize_with_pad_torch=_no_resize)
    from openpi.models_pytorch import gemma_pytorch, preprocessing_pytorch

    paligemma, causal_lm = gemma_pytorch.PaliGemmaForConditionalGeneration, gemma_pytorch.GemmaForCausalLM

    def small_paligemma(config: object) -> nn.Module:
        vision, text = config.vision_config, config.text_config
        for key, value in VISION.items():
            setattr(vision, key, value)
        vision.projection_dim = config.projection_dim = text.hidden_size
        text.vocab_size = config._vocab_size = VOCAB
        config.image_token_index = VOCAB - 1
        text.num_image_tokens = (vision.image_size // vision.patch_size) ** 2
        return paligemma(config=config)

    def small_expert(config: object) -> nn.Module:
        config.vocab_size = 8  # its embedding is dropped and its head unused
        return causal_lm(config=config)

    gemma_pytorch.PaliGemmaForConditionalGeneration = small_paligemma
    gemma_pytorch.GemmaForCausalLM = small_expert
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

    return PI0Pytorch, tuple(preprocessing_pytorch.IMAGE_KEYS)


def build_model(pi0_cls: type, pi05: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = types.SimpleNamespace(
        pi05=pi05,
        action_dim=ACTION_DIM,
        action_horizon=ACTION_HORIZON,
        paligemma_variant="gemma_2b",
        action_expert_variant="gemma_300m",
        dtype="float32",
        pytorch_compile_mode=None,  # no torch.compile wrap of sample_actions
    )
    return pi0_cls(config).eval()


# ---------------------------------------------------------------- coupled outliers


@torch.no_grad()
def _ada_norm(norm: nn.Module, f: torch.Tensor) -> None:
    """openpi's adaRMSNorm computes x̂·(1 + scale) + shift with (scale, shift, gate) = dense(cond): scaling
    output channel c by f is scale -> f(1 + scale) - 1 and shift -> f·shift, on the dense's rows and bias."""
    d, w, b = norm.dim, norm.dense.weight, norm.dense.bias
    f = f.to(w.dtype)
    w[: 2 * d].mul_(torch.cat([f, f])[:, None])
    b[:d].copy_(f * (1.0 + b[:d]) - 1.0)
    b[d : 2 * d].mul_(f)


def _couple_gemma_norms(layer: nn.Module, g: torch.Generator) -> None:
    """A Gemma layer's two norms (plain or adaptive), undone on the q/k/v and gate/up columns."""
    attn, mlp = layer.self_attn, layer.mlp
    for norm, consumers in (
        (layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
        (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
    ):
        if norm.dense is None:
            _couple_norm(g, norm, _gemma_norm, consumers)
        else:
            f = _channel_factors(g, norm.dim)
            _ada_norm(norm, f)
            _scale_columns(consumers, f)


def couple_outliers(model: nn.Module, seed: int) -> nn.Module:
    """Coupled outliers in every SigLIP, LLM and expert layer (function preserving, in place).

    As testbeds.couple_outliers, but v -> o takes one factor per layer for both Gemmas: the expert
    attends to the LLM's cached values through its own o_proj."""
    g = torch.Generator().manual_seed(1000 + seed)
    pwe = model.paligemma_with_expert
    for layer in pwe.paligemma.model.vision_tower.vision_model.encoder.layers:
        _couple_siglip_layer(layer, g, 1.0)
    size = SIZES["gemma_2b"]
    group = size.num_heads // size.num_kv_heads
    for pair in zip(pwe.paligemma.model.language_model.layers, pwe.gemma_expert.model.layers, strict=True):
        f = _channel_factors(g, size.num_kv_heads * size.head_dim, big=0.25)  # as testbeds._couple_rows
        f_o = f.view(-1, 1, size.head_dim).expand(-1, group, size.head_dim).reshape(-1)
        for layer in pair:
            _couple_gemma_norms(layer, g)
            _couple_rows(g, layer.mlp.up_proj, layer.mlp.down_proj)  # gelu(gate) * up is linear in up
            _scale_rows(layer.self_attn.v_proj, f)  # attention is linear in v
            _scale_columns([layer.self_attn.o_proj], f_o)
    return model


# ---------------------------------------------------------------- inputs and metric


@dataclass
class Episode:
    observation: types.SimpleNamespace  # what openpi's Observation carries into preprocess_observation_pytorch
    noise: torch.Tensor


def episode(image_keys: tuple[str, ...], seed: int, batch: int) -> Episode:
    g = torch.Generator().manual_seed(seed)
    images = {k: torch.rand(batch, 3, IMAGE, IMAGE, generator=g) * 2 - 1 for k in image_keys}
    lengths = torch.randint(PROMPT_LEN // 3, PROMPT_LEN + 1, (batch,), generator=g)
    mask = torch.arange(PROMPT_LEN)[None, :] < lengths[:, None]  # padded at the end, as openpi's tokenizer
    tokens = torch.randint(1, VOCAB, (batch, PROMPT_LEN), generator=g) * mask
    observation = types.SimpleNamespace(
        images=images,
        image_masks={k: torch.ones(batch, dtype=torch.bool) for k in image_keys},
        state=torch.randn(batch, ACTION_DIM, generator=g),
        tokenized_prompt=tokens,
        tokenized_prompt_mask=mask,
        token_ar_mask=None,
        token_loss_mask=None,
    )
    return Episode(observation, torch.randn(batch, ACTION_HORIZON, ACTION_DIM, generator=g))


def actions(model: nn.Module, episodes: list[Episode], steps: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model.sample_actions(torch.device("cpu"), e.observation, noise=e.noise, num_steps=steps) for e in episodes]
        )


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def rtn_model(model: nn.Module, names: list[str], quant: QuantConfig) -> nn.Module:
    """RTN in the Linears of ``names`` (not the full preset's quantized embedding table), at the
    config's bits per layer (full_w4a8 packs the expert's adaptive-norm denses at 8)."""
    out = copy.deepcopy(model)
    for name in names:
        module = out.get_submodule(name)
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, RTNLinear(module, quant.bits_for(name), quant.act_bits))
    return out


# ---------------------------------------------------------------- the benchmark


def evaluate(
    variant: str, model: nn.Module, episodes: list[Episode], args: argparse.Namespace, work: Path
) -> dict[str, object]:
    from safetensors.torch import save_model

    ckpt = work / variant / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    save_model(model, str(ckpt))
    reference = actions(model, episodes, args.steps)
    blind = copy.deepcopy(model)  # yardstick: the LLM's values zeroed, the expert sees no image or prompt
    for layer in blind.paligemma_with_expert.paligemma.model.language_model.layers:
        nn.init.zeros_(layer.self_attn.v_proj.weight)
    prefix_off = rel_error(actions(blind, episodes, args.steps), reference)
    del blind
    errors: dict[str, dict[str, float]] = {}
    replaced: dict[str, int] = {}
    build_seconds: dict[str, float] = {}
    for column in args.presets.split(","):
        preset = PRESETS[column]
        names: list[str] = []
        for label, config in recipes(resolve(preset), args.recipes).items():
            config = config.replace(name=f"{preset}_{label}_{variant}")
            start = time.perf_counter()
            result = build_bundle(config, ckpt, work / variant / "bundles", jobs=1)
            build_seconds[config.name] = time.perf_counter() - start
            loaded = copy.deepcopy(model)
            names = load_bundle(loaded, result.path, config).replaced
            errors.setdefault(label, {})[column] = rel_error(actions(loaded, episodes, args.steps), reference)
            del loaded
        rtn = rtn_model(model, names, config.quant)
        errors.setdefault("RTN W4A8", {})[column] = rel_error(actions(rtn, episodes, args.steps), reference)
        replaced[column] = len(names)
        print(f"  {variant} {column}: {len(names)} layers replaced", file=sys.stderr)
    rows = {"RTN W4A8": errors.pop("RTN W4A8"), **errors}
    ratios = {label: {c: e / rows["RTN W4A8"][c] for c, e in row.items()} for label, row in rows.items()}
    noise = torch.cat([e.noise for e in episodes])
    return {
        "errors": rows,
        "ratio_vs_rtn": ratios,
        "replaced": replaced,
        "prefix_off_error": prefix_off,
        "action_norm_over_displacement": float(reference.norm() / (reference - noise).norm()),
        "build_seconds": build_seconds,
    }


def instrumented(model: nn.Module) -> nn.Module:
    """A copy of the float model whose denoise_step sets the step clock (per-step layers read it)."""
    out = copy.deepcopy(model)
    instrument(out)
    return out


def evaluate_w4a4(
    variant: str, model: nn.Module, episodes: list[Episode], args: argparse.Namespace, work: Path
) -> dict[str, object]:
    """The full policy (full_w4a8's selection) at W4A8 data-free, W4A8 --calib and W4A4 --calib,
    statistics captured by ``sample_actions`` on other episodes; RTN W4A8 and W4A4 beside them."""
    from safetensors.torch import save_model

    ckpt = work / variant / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    save_model(model, str(ckpt))
    reference = actions(model, episodes, args.steps)
    image_keys = tuple(episodes[0].observation.images)
    calib = [episode(image_keys, 200 + s, args.batch) for s in range(args.calib_episodes)]
    errors: dict[str, float] = {}
    names: list[str] = []
    fallback: dict[str, int] = {}
    build_seconds: dict[str, float] = {}
    for label, (preset, needs_calib) in W4A4_CASES.items():
        config = resolve(preset).replace(name=f"{preset}_{variant}")
        stats = None
        if needs_calib:
            probe = instrumented(model)
            with torch.no_grad(), capture_stats(probe, config) as capture:
                actions(probe, calib, args.steps)
            stats = capture.save(work / variant / f"stats-{preset}.h5")
            del probe
        start = time.perf_counter()
        result = build_bundle(config, ckpt, work / variant / "bundles", calib=stats, jobs=1)
        build_seconds[label] = time.perf_counter() - start
        fallback[label] = sum("a4_held_out_sqnr_db" in q for q in result.quality.values())
        loaded = instrumented(model)
        names = load_bundle(loaded, result.path, config).replaced
        errors[label] = rel_error(actions(loaded, episodes, args.steps), reference)
        del loaded
    quant = resolve("full_w4a8").quant
    rows = {}
    for act_bits in (8, 4):
        rtn = rtn_model(model, names, replace(quant, act_bits=act_bits))
        rows[f"RTN W4A{act_bits}"] = rel_error(actions(rtn, episodes, args.steps), reference)
    rows.update(errors)
    return {
        "errors": rows,
        "ratio_vs_rtn_w4a8": {k: v / rows["RTN W4A8"] for k, v in rows.items()},
        "replaced": len(names),
        "a8_fallback_layers": fallback,
        "build_seconds": build_seconds,
    }


def print_w4a4(variant: str, result: dict, note: str) -> None:
    layers = result["replaced"]
    print(f"\n{variant}: action-chunk relative L2 error vs fp32 ({note}), {layers} layers; (ratio to RTN W4A8)")
    for label, error in result["errors"].items():
        kept = result["a8_fallback_layers"].get(label)
        extra = f"   {kept} layers kept at A8" if kept else ""
        print(f"{label:<16}{error:>9.4f} ({result['ratio_vs_rtn_w4a8'][label]:.2f}){extra}")


def print_table(variant: str, result: dict, note: str) -> None:
    replaced = result["replaced"]
    print(f"\n{variant}: action-chunk relative L2 error vs fp32 ({note}); (ratio to RTN)")
    print(f"{'case':<14}" + "".join(f"{c + f' ({n} layers)':>20}" for c, n in replaced.items()))
    for label, row in result["errors"].items():
        ratio = result["ratio_vs_rtn"][label]
        print(f"{label:<14}" + "".join(f"{f'{row[c]:.4f} ({ratio[c]:.2f})':>20}" for c in replaced))
    blind = result["prefix_off_error"]
    print(f"(yardstick: the float model with its LLM's v_proj zeroed, blind to images and prompt: {blind:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--recipes", default="unweighted,default,simple", help="bench/cases.py recipes")
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--seeds", type=int, default=2, help="evaluation episodes (observation + noise draws)")
    ap.add_argument("--batch", type=int, default=2, help="observations per episode")
    ap.add_argument("--steps", type=int, default=10, help="flow-matching steps of sample_actions")
    ap.add_argument("--model-seed", type=int, default=0, help="seed of openpi's init and of the outliers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="artifacts/bench/openpi_model.json")
    ap.add_argument(
        "--w4a4",
        action="store_true",
        help="the full policy at W4A8 data-free, W4A8 --calib and W4A4 --calib (full_w4a4) against RTN W4A8 / W4A4",
    )
    ap.add_argument("--calib-episodes", type=int, default=4, help="episodes sample_actions runs for --calib statistics")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    pi0_cls, image_keys = import_openpi()
    episodes = [episode(image_keys, 100 + s, args.batch) for s in range(args.seeds)]
    note = f"{args.seeds} x {args.batch} observations, {args.steps} steps"
    report: dict[str, object] = {
        "openpi": sys.modules[pi0_cls.__module__].__file__,
        "transformers": sys.modules["transformers"].__file__,
        "sizes": {k: asdict(v) for k, v in SIZES.items()},
        "vision": VISION,
        "vocab": VOCAB,
        "episodes": note,
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="duquant-openpi-") as tmp:
        for variant in args.variants.split(","):
            start = time.perf_counter()
            pi05, coupled = VARIANTS[variant]
            model = build_model(pi0_cls, pi05, args.model_seed)
            preserved = None
            if coupled:
                before = actions(model, episodes[:1], args.steps)
                couple_outliers(model, args.model_seed)
                preserved = rel_error(actions(model, episodes[:1], args.steps), before)
                if preserved > 1e-3:
                    raise SystemExit(f"{variant}: coupling changed the actions by {preserved:.2e}")
            run = evaluate_w4a4 if args.w4a4 else evaluate
            result = run(variant, model, episodes, args, Path(tmp))
            result["coupling_change"] = preserved
            result["seconds"] = time.perf_counter() - start
            report["variants"][variant] = result
            (print_w4a4 if args.w4a4 else print_table)(variant, result, note)
            print(f"({variant}: {result['seconds']:.0f} s)", file=sys.stderr)
    report["wall_seconds"] = time.perf_counter() - wall
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
