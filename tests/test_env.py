"""The OPENPI_DUQUANT_* mapping, word by word: what each spelling sets, what the override
messages print, and whom a refusal blames. Expected values are written out here."""

from __future__ import annotations

import os

import pytest
from duquant_runtime.config import resolve
from duquant_runtime.env import blame, config_from_env, env_overrides, request_from_env
from duquant_runtime.errors import ConfigError


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "Yes", "yes", "on", "ON", " on "])
def test_every_true_spelling_turns_permute_on(raw):
    assert config_from_env("llm_w4a8", {"OPENPI_DUQUANT_PERMUTE": raw}).transform.permute is True


@pytest.mark.parametrize("raw", ["0", "false", "FALSE", "no", "NO", "off", "Off", ""])
def test_every_false_spelling_turns_permute_off(raw):
    base = resolve("llm_w4a8").replace("transform", permute=True)
    assert config_from_env(base, {"OPENPI_DUQUANT_PERMUTE": raw}).transform.permute is False


@pytest.mark.parametrize(("var", "raw", "expected"), [
    ("OPENPI_DUQUANT_PERMUTE", "maybe", "0 or 1"),
    ("OPENPI_DUQUANT_ABITS", "8.5", "an integer"),
    ("OPENPI_DUQUANT_WBITS", ":4", "'layer.name:bits,other.name:bits'"),
])  # fmt: skip
def test_an_unreadable_value_is_one_sentence_naming_the_variable(var, raw, expected):
    with pytest.raises(ConfigError) as err:
        config_from_env("llm_w4a8", {var: raw})
    assert str(err.value) == f"{var}={raw!r} cannot be read as {expected}"


def test_per_layer_bits_are_after_the_last_colon_and_sorted():
    cfg = config_from_env("llm_w4a8", {"OPENPI_DUQUANT_WBITS": " z.fc1:8 , a:b.fc2:2 ,"})
    assert cfg.quant.per_layer_weight_bits == (("a:b.fc2", 2), ("z.fc1", 8))


def test_describe_prints_old_and_new_values_in_the_variables_own_terms():
    cfg = resolve("llm_w4a8")
    env = {
        "OPENPI_DUQUANT_LAYERS": "a.q_proj, b.k_proj",
        "OPENPI_DUQUANT_WBITS": "a.q_proj:8",
        "OPENPI_DUQUANT_ACT_MODE": "static",
        "OPENPI_DUQUANT_BLOCK": "32",
    }
    described = {o.var: o.describe(cfg) for o in env_overrides(env)}
    assert described == {
        "OPENPI_DUQUANT_LAYERS": "OPENPI_DUQUANT_LAYERS=a.q_proj, b.k_proj overrides llm_w4a8's "
        "select.layers (none → a.q_proj,b.k_proj)",
        "OPENPI_DUQUANT_WBITS": "OPENPI_DUQUANT_WBITS=a.q_proj:8 overrides llm_w4a8's "
        "quant.per_layer_weight_bits (none → a.q_proj:8)",
        "OPENPI_DUQUANT_ACT_MODE": "OPENPI_DUQUANT_ACT_MODE=static overrides llm_w4a8's "
        "quant.act_mode ('per_token_dynamic' → 'static')",
        "OPENPI_DUQUANT_BLOCK": "OPENPI_DUQUANT_BLOCK=32 overrides llm_w4a8's "
        "transform.block_size (64 → 32) and transform.block_out_size (16 → 32)",
    }


def test_block_sets_both_sizes_only_when_block_out_is_not_set():
    alone = env_overrides({"OPENPI_DUQUANT_BLOCK": "32"})
    both = env_overrides({"OPENPI_DUQUANT_BLOCK": "32", "OPENPI_DUQUANT_BLOCK_OUT": "8"})
    assert [o.changes for o in alone] == [{"block_size": 32, "block_out_size": 32}]
    assert [o.changes for o in both] == [{"block_size": 32}, {"block_out_size": 8}]


def test_blame_names_the_lone_culprit_else_every_variable_else_none():
    cfg = resolve("llm_w4a8")
    env = {"OPENPI_DUQUANT_ABITS": "4", "OPENPI_DUQUANT_BLOCK": "32"}
    overrides = env_overrides(env)

    def refuses(bits: int | None = None, block: int | None = None):
        def check(c):
            if (bits is None or c.quant.act_bits == bits) and (block is None or c.transform.block_size == block):
                raise ConfigError("refused")

        return check

    assert blame(cfg, overrides, refuses(block=32)) == "OPENPI_DUQUANT_BLOCK=32"
    assert blame(cfg, overrides, refuses(bits=4, block=32)) == "OPENPI_DUQUANT_ABITS=4, OPENPI_DUQUANT_BLOCK=32"
    assert blame(cfg, [], refuses(bits=4)) == "no OPENPI_DUQUANT_* variable"


def test_the_process_environment_is_read_when_no_mapping_is_given(monkeypatch):
    for var in [v for v in os.environ if v.startswith("OPENPI_DUQUANT_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("OPENPI_DUQUANT_ABITS", "6")
    monkeypatch.setenv("OPENPI_DUQUANT_ACT_SCALES", "scales.h5")
    assert [o.var for o in env_overrides()] == ["OPENPI_DUQUANT_ABITS"]
    assert config_from_env("llm_w4a8").quant.act_bits == 6
    monkeypatch.setenv("OPENPI_DUQUANT_CONFIG", "llm_w4a8")
    assert config_from_env().name == "llm_w4a8"  # the base too comes from the process environment
    request = request_from_env()
    assert (request.act_scales, request.bundle, request.config_given) == ("scales.h5", None, True)


def test_an_empty_path_variable_asks_for_nothing():
    request = request_from_env({"OPENPI_DUQUANT_ACT_SCALES": "", "OPENPI_DUQUANT_BUNDLE": "b.h5"})
    assert (request.act_scales, request.bundle, request.packdir, request.config_given) == (None, "b.h5", None, False)
