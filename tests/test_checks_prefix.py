"""Fast, direct tests of the bundle checks (`bundle_checks.py`) and name-prefix logic (`prefix.py`):
fake headers, readers and module maps, exact messages and boundaries."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from duquant_runtime.bundle import BundleHeader
from duquant_runtime.bundle_checks import (
    ConfigProblem,
    config_problems,
    expected_layers,
    integrity_problems,
    require_config,
)
from duquant_runtime.config import CONFIG_SCHEMA, SelectConfig, resolve
from duquant_runtime.errors import BundleReadError, ConfigMismatchError, ModelMismatchError, SelectionError
from duquant_runtime.prefix import detect_prefix, selection_prefix
from duquant_runtime.schema import SCHEMA_1_REFUSED


def _header(doc: dict, layer_names: tuple[str, ...] = ()) -> BundleHeader:
    return BundleHeader(
        path=Path("fake.duq"),
        format_version=1,
        fingerprint="0" * 64,
        fingerprint_doc=doc,
        config={},
        provenance={},
        tool_version="0",
        created_at="",
        layer_names=layer_names,
    )


def _row(name: str) -> list:
    # a fingerprint source row: name, dtype, shape, sha256
    return [name, "float32", [4, 4], "ab" * 32]


@pytest.fixture(scope="module")
def cfg():
    return resolve("llm_w4a8")


# ---------------------------------------------------------------- config_problems


def test_config_problems_schema_2_match_and_one_field_off(cfg):
    assert CONFIG_SCHEMA == 2
    doc = {"schema": 2, "config": copy.deepcopy(cfg.fingerprint_fields(2))}
    assert config_problems(_header(doc), cfg) == []
    other = cfg.replace("transform", block_size=16)
    assert config_problems(_header(doc), other) == [
        ConfigProblem("transform.block_size", "config transform.block_size: bundle 64, expected 16")
    ]
    assert str(config_problems(_header(doc), other)[0]) == "config transform.block_size: bundle 64, expected 16"


@pytest.mark.parametrize("doc", [{"schema": 1}, {}])  # 0.1 and 0.2 wrote no "schema" key: schema 1
def test_config_problems_refuse_schema_1_naming_the_rebuild(cfg, doc):
    got = config_problems(_header({**doc, "config": cfg.fingerprint_fields(2)}), cfg)
    assert got == [ConfigProblem("schema", SCHEMA_1_REFUSED)]
    assert "no longer compared" in got[0].text and "`duquant-packs build`" in got[0].text


def test_require_config_refuses_schema_1_with_the_rebuild_and_other_configs_field_by_field(cfg):
    with pytest.raises(ConfigMismatchError) as err:
        require_config(_header({"config": cfg.fingerprint_fields(2)}), cfg)
    assert str(err.value) == f"fake.duq: {SCHEMA_1_REFUSED}" and err.value.field == "schema"
    doc = {"schema": 2, "config": cfg.fingerprint_fields(2)}
    require_config(_header(doc), cfg)
    with pytest.raises(ConfigMismatchError) as err:
        require_config(_header(doc), cfg.replace("transform", block_size=16).replace(name="other"))
    assert str(err.value) == (
        "fake.duq was built for another config than 'other': config transform.block_size: bundle 64, expected 16"
    )
    assert err.value.field == "transform.block_size"


@pytest.mark.parametrize("schema", [3, 0, "2", None])
def test_config_problems_unknown_schema(cfg, schema):
    doc = {"schema": schema, "config": cfg.fingerprint_fields(2)}
    got = config_problems(_header(doc), cfg)
    assert got == [ConfigProblem("schema", f"config schema {schema!r} is not one this tool knows (1, 2)")]
    assert got[0].field == "schema"
    assert got[0].text.startswith("config schema ")


def test_config_problems_without_a_config_lists_every_section_missing(cfg):
    want = cfg.fingerprint_fields(2)
    got = config_problems(_header({"schema": 2}), cfg)
    assert [p.field for p in got] == ["quant", "select", "transform"]
    assert [p.text for p in got] == [f"config {k}: missing in bundle, expected {want[k]!r}" for k in sorted(want)]


# ---------------------------------------------------------------- expected_layers


def test_expected_layers_without_prefix_keeps_weights_only():
    doc = {"source": [_row("a.q_proj.weight"), _row("a.q_proj.bias"), _row("model.b.fc1.weight")]}
    assert expected_layers(_header(doc)) == {"a.q_proj", "model.b.fc1"}


def test_expected_layers_strips_the_recorded_prefix_and_drops_other_names():
    doc = {
        "name_prefix": "model.",
        "source": [_row("model.a.q_proj.weight"), _row("model.a.q_proj.bias"), _row("other.b.fc1.weight")],
    }
    assert expected_layers(_header(doc)) == {"a.q_proj"}


def test_expected_layers_empty_fingerprint():
    assert expected_layers(_header({})) == set()
    assert expected_layers(_header({"name_prefix": "model."})) == set()


# ---------------------------------------------------------------- integrity_problems


class FakeReader:
    """The part of BundleReader integrity_problems uses; `bad` layers fail their checksum
    only when checked, as the real reader's crc32 check does."""

    def __init__(self, header, bad=(), index=(), index_error=None):
        self.header, self.bad, self.index, self.index_error = header, set(bad), list(index), index_error
        self.calls: list[tuple[str, object]] = []

    def read_layer(self, name, *, check=True):
        self.calls.append((name, check))
        if name not in self.header.layer_names:
            raise BundleReadError(f"layer {name!r}: no such layer")
        if check and name in self.bad:
            raise BundleReadError(f"layer {name!r}: checksum mismatch", layer=name)
        return object()

    def index_problems(self):
        if self.index_error is not None:
            raise BundleReadError(self.index_error)
        return list(self.index)


def _reader(**kw):
    doc = {"source": [_row("a.weight"), _row("b.weight"), _row("c.weight"), _row("d.weight")]}
    return FakeReader(_header(doc, layer_names=("b", "d", "c", "x", "w")), **kw)


def test_integrity_problems_clean_bundle():
    doc = {"source": [_row("a.weight"), _row("b.weight")]}
    reader = FakeReader(_header(doc, layer_names=("b", "a")))
    assert integrity_problems(reader) == []
    assert reader.calls == [("a", True), ("b", True)]


def test_integrity_problems_lists_missing_extra_bad_and_index_in_order():
    reader = _reader(bad={"c"}, index=["layer d: the bundle's index disagrees"])
    assert integrity_problems(reader) == [
        "layer a: missing from the bundle (truncated or incomplete build)",
        "layer w: present but not covered by the fingerprint",
        "layer x: present but not covered by the fingerprint",
        "layer 'c': checksum mismatch",
        "layer d: the bundle's index disagrees",
    ]
    # only layers both present and expected are read, each with its checksums checked
    assert reader.calls == [("b", True), ("c", True), ("d", True)]


def test_integrity_problems_an_unreadable_index_is_one_more_problem():
    reader = _reader(index_error="the layer index: damaged")
    assert integrity_problems(reader) == [
        "layer a: missing from the bundle (truncated or incomplete build)",
        "layer w: present but not covered by the fingerprint",
        "layer x: present but not covered by the fingerprint",
        "the layer index: damaged",
    ]


# ---------------------------------------------------------------- detect_prefix


def test_detect_prefix_as_they_are_and_empty():
    assert detect_prefix(["a.fc", "b.fc"], {"a.fc": 1, "b.fc": 2, "x.a.fc": 3}) == ""
    assert detect_prefix([], {"x": 1}) == ""


def test_detect_prefix_finds_the_one_prefix():
    assert detect_prefix(["fc"], {"model.fc": 1}) == "model."
    mods = {"model.net.fc1": 1, "model.net.fc2": 2, "other.net.fc1": 3, "model": 4}
    assert detect_prefix(["net.fc1", "net.fc2"], mods) == "model."
    assert detect_prefix(["net.fc1"], {"a.b.net.fc1": 1}) == "a.b."


def test_detect_prefix_needs_a_dot_boundary():
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["fc1"], {"modelfc1": 1})
    assert e.value.layer == "fc1"
    assert str(e.value) == (
        "layer fc1: not found in the model under any one name prefix; the model has 'modelfc1' — is this the model "
        "the bundle was built for?"
    )


def test_detect_prefix_refuses_several_prefixes():
    mods = {"b.fc": 1, "a.fc": 2, "c.other": 3}
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["fc"], mods)
    assert str(e.value) == (
        "the bundle's layers are found in the model under several name prefixes ('a.', 'b.'): pass "
        "name_prefix= to say which copy to quantize"
    )
    assert e.value.field == "presence"
    assert e.value.layer is None


def test_detect_prefix_names_the_first_layer_missing_under_the_candidates():
    mods = {"x.a": 1, "x.b": 2}  # "c" is nowhere, and nothing ends with it
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["a", "b", "c"], mods)
    assert str(e.value) == (
        "layer c: not found in the model under any one name prefix — is this the model the bundle was built for?"
    )
    assert e.value.layer == "c"
    assert e.value.field == "presence"


def test_detect_prefix_hint_names_the_first_near_module():
    mods = {"x.a": 1, "y.b": 2, "z.b": 3}
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["a", "b"], mods)
    assert str(e.value) == (
        "layer b: not found in the model under any one name prefix; the model has 'y.b' — is this the model the "
        "bundle was built for?"
    )
    assert (e.value.layer, e.value.field) == ("b", "presence")


def test_detect_prefix_each_found_somewhere_but_no_one_prefix_blames_the_first():
    # a under x. and y., b under x., c under y.: every layer has some candidate, none fits all
    mods = {"x.a": 1, "y.a": 2, "x.b": 3, "y.c": 4}
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["a", "b", "c"], mods)
    assert str(e.value) == (
        "layer a: not found in the model under any one name prefix; the model has 'x.a' — is this the model the "
        "bundle was built for?"
    )
    assert (e.value.layer, e.value.field) == ("a", "presence")


def test_detect_prefix_first_layer_nowhere():
    with pytest.raises(ModelMismatchError) as e:
        detect_prefix(["q", "r"], {"x.r": 1})
    assert str(e.value) == (
        "layer q: not found in the model under any one name prefix — is this the model the bundle was built for?"
    )
    assert (e.value.layer, e.value.field) == ("q", "presence")


# ---------------------------------------------------------------- selection_prefix


def test_selection_prefix_refusal_lists_each_prefix():
    select = SelectConfig(scope="net.")
    with pytest.raises(SelectionError) as e:
        selection_prefix(select, ["b.net.q_proj", "a.net.q_proj", "c.head"])
    assert str(e.value) == (
        "the selection picks layers under several name prefixes ('a.', 'b.'); narrow select.scope to one of them"
    )


def test_selection_prefix_boundaries():
    select = SelectConfig(scope="net.")
    assert selection_prefix(select, []) == ""
    assert selection_prefix(select, ["net.q_proj"]) == ""
    assert selection_prefix(select, ["m.x.net.q_proj"]) == "m.x."
    assert selection_prefix(select, ["modelnet.q_proj"]) == ""
    assert selection_prefix(SelectConfig(), ["model.q_proj"]) == ""  # no scope: nothing to strip
    assert selection_prefix(SelectConfig(layers=("net.fc1",)), ["model.net.fc1"]) == "model."
    assert selection_prefix(SelectConfig(layers=("net.fc1",)), ["model.net.fc2"]) == ""
