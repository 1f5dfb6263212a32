"""Where a bundle goes: its path, the space it needs, output faults as one sentence, and
the stale temp files of builds that died (``duquant_runtime.atomic`` names them)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from duquant_runtime.atomic import temp_owner
from duquant_runtime.bundle_records import EMBEDDING
from duquant_runtime.config import DuQuantConfig
from duquant_runtime.errors import DuQuantError
from duquant_runtime.fingerprint import SHORT_LEN

from .select import SelectedLayer


class OutputError(DuQuantError):
    """The bundle cannot be written where it was asked for (full disk, read-only, no permission)."""


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_parent(path)).free


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Any failure to write the output becomes one sentence naming the path and the fix.

    h5py reports a full disk as OSError or, from its flush, as RuntimeError; wrap only our own
    writes (a packing error is not an output error)."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise output_error(path, exc) from None


def output_error(path: Path, exc: BaseException) -> OutputError:
    """The sentence for a failure to write in ``path``."""
    code = getattr(exc, "errno", None)
    free = free_bytes(path)
    if code == errno.EROFS:
        reason, fix = "the file system is read-only", "pass --out to a writable folder"
    elif code in (errno.EACCES, errno.EPERM):
        reason, fix = "permission denied", "pass --out to a folder you can write, or fix its permissions"
    elif code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or (code is None and free < (64 << 20)):
        reason = f"the disk or quota is full ({free / 2**20:.0f} MB free there)"
        fix = "free some space, or pass --out on another disk"
    else:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = "check the folder and the disk"
    return OutputError(f"cannot write the bundle in {path}: {reason}; {fix}. No bundle was written.")


def estimated_bundle_bytes(layers: list[SelectedLayer], config: DuQuantConfig) -> int:
    """An upper estimate of the bundle's size: codes, scales, bias, equalization, permutations
    and float32 rotation blocks per layer, plus HDF5 overhead."""
    block = config.transform.block_size
    total = 1 << 20
    for la in layers:
        codes = la.out_features * (la.in_features if la.bits > 4 else (la.in_features + 1) // 2)
        if la.kind == EMBEDDING:  # codes and group scales only
            groups = la.in_features // config.embed.group_size if config.embed.group_size else 1
            total += codes + 4 * la.out_features * groups + 4096
            continue
        total += codes + 8 * la.out_features + 12 * la.in_features + 4 * la.in_features * block + 4096
    return total


def bundle_path(out_dir: Path, config: DuQuantConfig, fingerprint: str) -> Path:
    return out_dir / config.name / f"{config.name}-{fingerprint[:SHORT_LEN]}.h5"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory: Path) -> None:
    """Temp files of builds that died (SIGKILL) are removed; a live build's are kept."""
    for tmp in directory.glob(".*.tmp"):
        owner = temp_owner(tmp)
        if owner is not None and not _pid_alive(owner):
            with contextlib.suppress(OSError):
                tmp.unlink()


def check_space(layers: list[SelectedLayer], config: DuQuantConfig, out_cfg: Path) -> None:
    """Refuse, before any work, when the disk cannot hold the bundle."""
    need, free = estimated_bundle_bytes(layers, config), free_bytes(out_cfg)
    if free < need:
        raise OutputError(
            f"not enough space for the bundle in {out_cfg}: about {need / 2**20:.0f} MB needed, "
            f"{free / 2**20:.0f} MB free; free some space, or pass --out on another disk"
        )
