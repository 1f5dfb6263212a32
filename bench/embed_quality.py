"""Quantized token embeddings: each component's error against float, with and without the
embedding quantized, on three testbeds, and the table's own weight SQNR.

* ``pi05``: transformers' PaliGemma + Gemma expert with coupled outliers (bench/testbeds.py),
  the LLM fed token ids, so its output goes through ``embed_tokens`` (and its tied ``lm_head``
  is shared with the codes);
* ``minilm``: real pretrained all-MiniLM-L6-v2 (its ``word_embeddings``), when installed;
* ``demo``: the demo checkpoint, the LLM fed ``embed_tokens(ids)``.

Every case is the full preset over the testbed's selection; only ``[embed]`` differs.

    python bench/embed_quality.py [--checkpoint artifacts/demo]

Prints a table and writes artifacts/bench/embed_quality.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from duquant_pipeline.build import build_bundle
from duquant_pipeline.demo_model import component_inputs, load_demo_model
from duquant_pipeline.report import read_report
from duquant_runtime import load_bundle
from duquant_runtime.config import DuQuantConfig, SelectConfig, from_dict, resolve
from testbeds import build_pi05, minilm, pi05_inputs

# label -> (adaptive norms selected, the table's (bits, group size) or None)
CASES = {
    "0.6 preset": (False, None),
    "+ norms": (True, None),
    "+ norms, int8": (True, (8, 0)),
    "+ norms, int4 g64": (True, (4, 64)),
    "+ norms, int4 g32": (True, (4, 32)),
}
Run = Callable[[nn.Module], dict[str, torch.Tensor]]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def case_config(config: DuQuantConfig, include: str, norms: bool, table: tuple[int, int] | None) -> DuQuantConfig:
    """``config`` (a full preset, norms and table included) with the case's norms and table."""
    if not norms and "layernorm" in config.select.include:  # a full preset: 0.6's selection, the schema's
        config = config.replace("select", include=SelectConfig.include, exclude=SelectConfig.exclude)
    if table is None:
        return config.replace("embed", include="")
    return config.replace("embed", include=include, bits=table[0], group_size=table[1])


def pi05() -> tuple[nn.Module, DuQuantConfig, str, Run]:
    model = build_pi05(seed=0, coupled=True).eval()
    ids = torch.randint(0, 511, (4, 48), generator=torch.Generator().manual_seed(7))

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        inputs = pi05_inputs(batch=4, seed=0)
        with torch.no_grad():
            out = m.components({"vision": inputs["vision"], "expert": inputs["expert"]})
            out["llm"] = m.pg.language_model(input_ids=ids).last_hidden_state
            out["lm_head"] = m.paligemma_with_expert.paligemma.lm_head(out["llm"])
        return out

    # save_model keeps one name of the tied pair, lm_head's, as openpi's checkpoints do
    return model, resolve("full_w4a8"), r"(?:language_model\.embed_tokens|paligemma\.lm_head)$", run


def minilm_bed() -> tuple[nn.Module, DuQuantConfig, str, Run] | None:
    loaded = minilm()
    if loaded is None:
        return None
    model, _, batch = loaded
    config = from_dict(
        {"name": "minilm_w4a8", "select": {"scope": "encoder.", "include": r".*(query|key|value|dense).*"}}
    )

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"encoder": m(**batch).last_hidden_state}

    return model, config, r"word_embeddings$", run


def demo(checkpoint: str) -> tuple[nn.Module, DuQuantConfig, str, Run]:
    model = load_demo_model(checkpoint)
    d = model.dims
    ids = torch.randint(0, d.vocab, (2, 200), generator=torch.Generator().manual_seed(7))

    def run(m: nn.Module) -> dict[str, torch.Tensor]:
        inputs = component_inputs(d, batch=2, seed=0)
        lm = m.paligemma_with_expert.paligemma.model.language_model
        with torch.no_grad():
            hidden = lm.embed_tokens(ids) * math.sqrt(d.llm_width)
            return {"vision": m.vision(*inputs["vision"]), "llm": m.llm(hidden), "expert": m.expert(*inputs["expert"])}

    return model, resolve("full_w4a8"), r"language_model\.embed_tokens$", run


def evaluate(name: str, bed: tuple[nn.Module, DuQuantConfig, str, Run], work: Path) -> dict:
    from safetensors.torch import save_model

    model, config, include, run = bed
    ckpt = work / name / "model.safetensors"
    ckpt.parent.mkdir(parents=True)
    save_model(model, str(ckpt))
    reference = run(model)
    rows = {}
    for i, (label, (norms, table)) in enumerate(CASES.items()):
        cfg = case_config(config.replace(name=f"{name}_{i}"), include, norms, table)
        result = build_bundle(cfg, ckpt, work / "bundles", jobs=1)
        loaded = copy.deepcopy(model)
        load_bundle(loaded, result.path, cfg)
        out = run(loaded)
        tables = read_report(result.path)["embeddings"]
        rows[label] = {
            "components": {c: rel_error(out[c], reference[c]) for c in reference},
            "embedding_sqnr_db": tables[0]["weight_sqnr_db"] if tables else None,
        }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="artifacts/demo")
    ap.add_argument("--out", default="artifacts/bench/embed_quality.json")
    args = ap.parse_args()
    beds = {"pi05": pi05(), "minilm": minilm_bed(), "demo": demo(args.checkpoint)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bed in beds.items():
            if bed is None:
                print(f"{name}: not installed, skipped")
                continue
            results[name] = evaluate(name, bed, Path(tmp))
    for name, rows in results.items():
        comps = list(next(iter(rows.values()))["components"])
        print(f"\n{name}: relative error against float   " + "  ".join(f"{c:>9}" for c in comps) + "   table SQNR")
        base = rows["0.6 preset"]["components"]
        for label, row in rows.items():
            cells = "  ".join(f"{row['components'][c]:9.4f}" for c in comps)
            rise = max((row["components"][c] / base[c] - 1) * 100 for c in comps)
            sqnr = f"{row['embedding_sqnr_db']:6.2f} dB" if row["embedding_sqnr_db"] is not None else "     -"
            print(f"  {label:<18} {cells}   {sqnr}   worst rise {rise:+.2f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
