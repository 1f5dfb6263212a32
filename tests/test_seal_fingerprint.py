"""The seal, the attribute readers, the temp-file names, the fingerprint's JSON and diffs,
and the activation quantizer's edge cases, each against values written out or computed here
with zlib, hashlib and torch.quantile (the survivors of `make mutants`, killed)."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from duquant_runtime import actquant, atomic, crc, h5file
from duquant_runtime.fingerprint import canonical_json, diff_fields, diff_sources, digest

MAGIC = h5file.BUNDLE_MAGIC


def sealed_file(path: Path, payload: int = 3000) -> Path:
    with h5file.create(path) as f:
        f.create_dataset("x", data=np.arange(payload, dtype=np.uint8))
    h5file.seal(path, MAGIC)
    return path


# ---------------------------------------------------------------- the seal


def test_files_without_a_seal_are_told_apart(tmp_path):
    plain = tmp_path / "plain.bin"
    plain.write_bytes(os.urandom(4096))
    assert h5file.check_seal(plain, MAGIC) is False
    assert h5file.read_sealed(plain, MAGIC) is None
    unsealed = tmp_path / "unsealed.h5"  # our container, never sealed: its seal is lost
    with h5file.create(unsealed) as f:
        f.attrs["a"] = 1
    with pytest.raises(h5file.SealError) as err:
        h5file.check_seal(unsealed, MAGIC)
    assert str(err.value) == "the file's seal is damaged, so its contents cannot be trusted"
    assert not isinstance(err.value, h5file.WrongKindError)


def test_a_sealed_file_reads_back_its_own_bytes(tmp_path):
    path = sealed_file(tmp_path / "s.h5")
    assert h5file.check_seal(path, MAGIC) is True
    np.testing.assert_array_equal(h5file.read_sealed(path, MAGIC), np.frombuffer(path.read_bytes(), np.uint8))


def test_a_file_that_is_only_a_seal_is_truncated_not_another_kind(tmp_path):
    path = sealed_file(tmp_path / "s.h5")
    head = tmp_path / "head.bin"
    head.write_bytes(path.read_bytes()[: h5file.SEAL.size])
    with pytest.raises(h5file.SealError) as err:
        h5file.check_seal(head, MAGIC)
    assert not isinstance(err.value, h5file.WrongKindError)
    assert str(err.value).endswith(": it is truncated")


@pytest.mark.parametrize("change", ["append", "truncate"])
def test_a_length_change_names_both_sizes_and_what_happened(tmp_path, change):
    path = sealed_file(tmp_path / "s.h5")
    sealed_size = path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 7 if change == "append" else data[:-7])
    size = sealed_size + 7 if change == "append" else sealed_size - 7
    how = "bytes were appended to it" if change == "append" else "it is truncated"
    with pytest.raises(h5file.SealError) as err:
        h5file.check_seal(path, MAGIC)
    assert str(err.value) == f"the file holds {size} bytes, its seal says {sealed_size}: {how}"


def test_a_file_shrinking_while_read_is_named(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 100)
    with pytest.raises(h5file.SealError) as err:
        h5file._piece_crc(path, 0, 150, None)
    assert str(err.value) == "the file shrank while it was read; it is being written or replaced"


@pytest.mark.parametrize(
    ("cores", "max_threads", "size_in_pieces", "expected"),
    [(4, 8, 3, 3), (2, 8, 3, 2), (4, 2, 3, 2), (None, 8, 3, 1), (4, 8, 1, 1), (8, 8, 2, 2)],
)
def test_large_files_are_checked_in_min_of_cores_cap_and_size_pieces(
    tmp_path, monkeypatch, cores, max_threads, size_in_pieces, expected
):
    """Pieces = min(cores, SEAL_MAX_THREADS, size // SEAL_PIECE_MIN), at least 1; one piece
    takes no thread pool; the crc is zlib's whatever the split."""
    piece = 4096
    monkeypatch.setattr(h5file, "SEAL_PIECE_MIN", piece)
    monkeypatch.setattr(h5file, "SEAL_MAX_THREADS", max_threads)
    monkeypatch.setattr(h5file.os, "cpu_count", lambda: cores)
    pools: list[int] = []
    real_pool = h5file.ThreadPoolExecutor

    def recording_pool(workers):
        pools.append(workers)
        return real_pool(workers)

    monkeypatch.setattr(h5file, "ThreadPoolExecutor", recording_pool)
    path = tmp_path / "f.bin"
    lo = 100
    data = os.urandom(lo + size_in_pieces * piece + 123)
    path.write_bytes(data)
    assert h5file._file_crc(path, lo, len(data)) == zlib.crc32(data[lo:])
    assert pools == ([] if expected == 1 else [expected])


def test_crc32_of_any_array_is_zlibs_crc_of_its_bytes():
    strided = np.arange(60, dtype=np.float32).reshape(6, 10)[:, ::3]
    assert crc.crc32(strided) == zlib.crc32(np.ascontiguousarray(strided).tobytes())


def test_the_container_is_written_with_the_pinned_hdf5_versions(tmp_path):
    with h5file.create(tmp_path / "c.h5") as f:
        assert f.libver[0] == h5file.LIBVER[0]  # the oldest HDF5 that can read the file
        assert f.userblock_size == h5file.USERBLOCK


def test_an_unopenable_directory_is_not_an_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("no")

    monkeypatch.setattr(h5file.os, "open", refuse)
    atomic.fsync_dir(tmp_path)  # suppressed: not every file system can open a directory


# ---------------------------------------------------------------- attributes


def test_attributes_are_bounded_at_exactly_the_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(h5file, "MAX_ATTR_BYTES", 16)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.attrs["at_limit"] = np.zeros(16, dtype=np.uint8)
        f.attrs["over"] = np.zeros(17, dtype=np.uint8)
        f.attrs["wide"] = np.zeros(3, dtype=np.float64)  # 3 values, 24 bytes
        f.attrs["text"] = np.bytes_(b"abc")
        f.attrs["list"] = "[1, 2]"
        assert h5file.read_attr(f, "at_limit").shape == (16,)
        for key, size in (("over", 17), ("wide", 24)):
            with pytest.raises(ValueError) as err:
                h5file.read_attr(f, key)
            assert str(err.value) == f"attribute {key!r} claims {size} bytes"
        assert h5file.read_attr(f, "text") == "abc"
        assert h5file.json_attr(f, "list", list) == [1, 2]
        with pytest.raises(ValueError) as err:
            h5file.json_attr(f, "list")
        assert str(err.value) == "attribute 'list' is not a JSON dict"


# ---------------------------------------------------------------- temp-file names


def test_temp_names_carry_the_pid_and_eight_hex_digits(tmp_path):
    tmp = atomic.temp_name(tmp_path / "b.h5")
    name, pid, hex8, suffix = tmp.name.rsplit(".", 3)
    assert (name, pid, suffix, tmp.parent) == (".b.h5", str(os.getpid()), "tmp", tmp_path)
    assert len(hex8) == 8 and int(hex8, 16) >= 0
    assert atomic.temp_owner(tmp) == os.getpid()


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        (".b.123.ab.tmp", 123),  # five parts: the shortest temp name
        (".my.file.h5.123.ab.tmp", 123),
        ("b.123.ab.tmp", None),  # four parts
        (".b.h5.123.ab.TMP", None),
        (".b.h5.123.ab.tmp.x", None),
        (".b.h5.12x.ab.tmp", None),
        (".b.h5.ab.123.tmp", None),
        ("b.h5", None),
    ],
)
def test_temp_owner_reads_only_names_temp_name_makes(name, owner):
    assert atomic.temp_owner(Path(name)) == owner


class _Stop(KeyboardInterrupt):
    """A stop signal as the pipeline raises it (``process.Stopped``: a KeyboardInterrupt)."""


@pytest.mark.parametrize("stop", [KeyboardInterrupt, _Stop, SystemExit], ids=["ctrl-c", "stop-signal", "exit"])
@pytest.mark.parametrize("where", ["writing", "renaming"])
def test_an_interrupted_atomic_file_leaves_neither_target_nor_temp(tmp_path, monkeypatch, stop, where):
    """Not only Exceptions: Ctrl-C, a stop signal and sys.exit, while writing or at the rename."""
    (tmp_path / "old.bin").write_bytes(b"old")

    def interrupted_replace(src, dst):
        raise stop()

    if where == "renaming":
        monkeypatch.setattr(atomic.os, "replace", interrupted_replace)
    for target in (tmp_path / "new.bin", tmp_path / "old.bin"):
        with pytest.raises(stop), atomic.atomic_file(target) as pending:
            pending.tmp.write_bytes(b"half a file")
            if where == "writing":
                raise stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin"]  # no temp file, no new target
    assert (tmp_path / "old.bin").read_bytes() == b"old"  # the old one untouched


# ---------------------------------------------------------------- fingerprint document


def test_canonical_json_is_sorted_compact_ascii_and_refuses_nan():
    text = canonical_json({"b": 1, "a": [1.5, "é"], "c": {"z": None, "y": True}})
    assert text == '{"a":[1.5,"\\u00e9"],"b":1,"c":{"y":true,"z":null}}'
    assert digest({"b": 1, "a": 2}) == hashlib.sha256(b'{"a":2,"b":1}').hexdigest()
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_diff_fields_names_each_dotted_path():
    bundle = {"quant": {"bits": 4, "extra": 1}, "name": "a", "scalar": {"k": 1}}
    expected = {"quant": {"bits": 8, "mode": "x"}, "name": "a", "scalar": 5}
    assert diff_fields(bundle, expected) == [
        ("quant.bits", "quant.bits: bundle 4, expected 8"),
        ("quant.extra", "quant.extra: bundle has 1, not expected"),
        ("quant.mode", "quant.mode: missing in bundle, expected 'x'"),
        ("scalar", "scalar: bundle {'k': 1}, expected 5"),
    ]


def test_diff_sources_lists_missing_extra_and_differing_tensors():
    sha_a, sha_b = "a" * 64, "b" * 64
    bundle = [["only.bundle", "BF16", [2], sha_a], ["both", "BF16", [2, 3], sha_a], ["same", "F32", [1], sha_a]]
    live = [["only.ckpt", "BF16", [2], sha_a], ["both", "F32", [3, 2], sha_b], ["same", "F32", [1], sha_a]]
    assert diff_sources(bundle, live) == [
        f"both: differs (dtype bundle BF16, checkpoint F32; shape bundle [2, 3], checkpoint [3, 2]; "
        f"sha256 bundle {sha_a[:12]}, checkpoint {sha_b[:12]})",
        "only.bundle: in bundle, not in checkpoint selection",
        "only.ckpt: selected in checkpoint, not in bundle",
    ]


# ---------------------------------------------------------------- activation quantization


def test_fake_quant_keeps_the_input_dtype():
    x = torch.randn(4, 8).to(torch.bfloat16)
    out = actquant.fake_quant(x, actquant.per_token_scale(x, 8), 8)
    assert out.dtype == torch.bfloat16


def test_per_token_scales_and_static_scales_of_3d_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, generator=g)  # batch, tokens, channels: tokens != channels
    torch.testing.assert_close(actquant.per_token_scale(x, 8), x.abs().amax(dim=2, keepdim=True) / 127.0)
    observer = actquant.StaticScaleObserver(90.0, 8)
    observer.observe(x)
    want = torch.quantile(x.abs().reshape(-1, 7), 0.9, dim=0) / 127.0
    torch.testing.assert_close(observer.scales(), want)


@pytest.mark.parametrize("pct", [0.0, 37.5, 100.0])
def test_percentile_per_channel_is_torch_quantile_up_to_the_max(pct):
    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(actquant.percentile_per_channel(x, pct), torch.quantile(x, pct / 100.0, dim=0))
