"""LoadReport: what ``load_bundle`` replaced, and the bytes before and after, per component."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .selection import component_of


@dataclass
class LoadReport:
    bundle: Path
    fingerprint: str
    config_name: str
    replaced: list[str] = field(default_factory=list)
    bytes_before: int = 0  # the replaced nn.Linear parameters
    bytes_after: int = 0  # the DuQuantLinear buffers that replace them
    seconds: float = 0.0
    prefix: str = ""  # the name prefix the bundle's layers were found under
    prefix_detected: bool = False  # ... found by load_bundle, not passed by the caller
    components: dict[str, list[int]] = field(default_factory=dict)  # component -> [layers, before, after]
    tied_heads: list[str] = field(default_factory=list)  # heads reading a quantized table's codes (no bytes)

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else float("nan")

    def add(self, target: str, old: nn.Module, layer: nn.Module, counted: set[tuple[int, int]]) -> None:
        """Counts one replacement: ``old``'s own parameters and buffers, and ``layer``'s buffers,
        each tensor not ``counted`` yet (by storage address and size: shared rotation buffers
        count once, and so does a head's weight tied to an embedding counted before)."""
        before = _new_bytes((*old.parameters(recurse=False), *old.buffers(recurse=False)), counted)
        after = _new_bytes(layer.buffers(), counted)
        self.bytes_before += before
        self.bytes_after += after
        row = self.components.setdefault(component_of(target), [0, 0, 0])
        row[0], row[1], row[2] = row[0] + 1, row[1] + before, row[2] + after
        self.replaced.append(target)

    def __str__(self) -> str:
        where = f"; names under {self.prefix!r} (detected)" if self.prefix_detected else ""
        parts = ", ".join(
            f"{c} {n} layers {b / 2**20:.1f} -> {a / 2**20:.1f} MiB" for c, (n, b, a) in sorted(self.components.items())
        )
        return (
            f"duquant: {len(self.replaced)} layers from {self.bundle.name} ({self.config_name}, "
            f"fp {self.fingerprint[:12]}{where}): {self.bytes_before / 2**20:.1f} MiB -> "
            f"{self.bytes_after / 2**20:.1f} MiB ({self.ratio:.3f}x) in {self.seconds:.2f} s"
            + (f" [{parts}]" if len(self.components) > 1 else "")
        )


def _new_bytes(tensors: Iterable[torch.Tensor], counted: set[tuple[int, int]]) -> int:
    """Bytes of the tensors whose storage is not ``counted`` yet; counts them."""
    total = 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in counted:
            counted.add(key)
            total += t.numel() * t.element_size()
    return total
