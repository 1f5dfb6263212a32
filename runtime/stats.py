"""Calibration statistics: captured on the float model, consumed by ``duquant-packs build --calib``.

For every selected Linear's input, over all batches run inside ``capture_stats``:

* ``absmax``     per-channel max |x| (SmoothQuant's statistic);
* ``gram``       the mean second-moment matrix XᵀX / tokens, kept as diagonal blocks of
  ``gram_block`` channels (full when in_features <= gram_block): memory is bounded by
  in_features x gram_block per layer, not in_features²;
* ``sample``     a uniform reservoir of at most ``sample_rows`` token rows (seeded), from
  which build derives static activation scales in the transformed basis and estimates
  each layer's output SQNR.

The file (HDF5, sealed and written atomically by ``h5file``) records each layer's weight
signature (float64 sum and sum of squares), so a build refuses statistics captured on
another checkpoint, and a content digest, which enters the bundle's fingerprint. Static
activation scales are not captured here: build derives them from the sample in each
candidate's basis, with the runtime's one rule (``actquant``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import DuQuantConfig, matches, resolve
from .crc import crc32
from .errors import StatsError
from .h5file import STATS_MAGIC, FileKind, SealedReader, SealedWriter
from .prefix import selection_prefix
from .read_errors import translated
from .signature import weight_signature

# 2 (0.3): sealed, no percentile dataset. 1 (0.2) is refused: capture the statistics again.
KIND = FileKind(STATS_MAGIC, "duquant-packs-stats", 2)
STATS_FORMAT, STATS_VERSION, SEAL_MAGIC = KIND.format, KIND.version, KIND.magic
DATASETS = ("absmax", "gram", "sample")
FIX = "capture the statistics again"


@dataclass
class LayerStats:
    absmax: np.ndarray  # float32 [in]
    gram: np.ndarray  # float32 [n_gram_blocks, G, G], mean xᵀx per diagonal block
    sample: np.ndarray  # float32 [rows, in]
    tokens: int

    @property
    def in_features(self) -> int:
        return int(self.absmax.shape[0])

    def hessian(self) -> np.ndarray:
        """The mean XᵀX as a dense float64 [in, in] (zero outside the captured blocks)."""
        n = self.in_features
        nblk, g, _ = self.gram.shape
        h = np.zeros((n, n))
        for b in range(nblk):
            lo, hi = b * g, min((b + 1) * g, n)
            h[lo:hi, lo:hi] = self.gram[b, : hi - lo, : hi - lo]
        return h

    def scaled(self, factor: np.ndarray) -> LayerStats:
        """The statistics of x · diag(factor) (for smoothing)."""
        f = factor.astype(np.float64)
        nblk, g, _ = self.gram.shape
        fp = np.ones(nblk * g)
        fp[: f.shape[0]] = f
        fb = fp.reshape(nblk, g)
        return LayerStats(
            absmax=(self.absmax * f).astype(np.float32),
            gram=(self.gram * fb[:, :, None] * fb[:, None, :]).astype(np.float32),
            sample=(self.sample * f).astype(np.float32),
            tokens=self.tokens,
        )


class _LayerObserver:
    """Accumulates one layer's statistics from its forward inputs."""

    def __init__(self, module: nn.Linear, gram_block: int, sample_rows: int, seed: int) -> None:
        n = module.in_features
        self.n, self.g = n, min(gram_block, n)
        self.sample_rows = sample_rows
        self.tokens = 0
        nblk = -(-n // self.g)
        dev = module.weight.device
        self.absmax = torch.zeros(n, dtype=torch.float32, device=dev)
        self.gram = torch.zeros(nblk, self.g, self.g, dtype=torch.float64, device=dev)
        self.sample = torch.zeros(0, n, dtype=torch.float32)
        self.sample_keys = torch.zeros(0, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)
        self.weight_sum, self.weight_sumsq = weight_signature(module.weight)
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            x = args[0].detach().reshape(-1, self.n)
            xf = x.float()
            self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))
            xd = torch.nn.functional.pad(x.double(), (0, self.gram.shape[0] * self.g - self.n))
            blocks = xd.reshape(-1, self.gram.shape[0], self.g).transpose(0, 1)  # [nblk, tokens, G]
            self.gram += torch.bmm(blocks.transpose(1, 2), blocks)
            self._reservoir(xf.cpu())
            self.tokens += x.shape[0]

    def _reservoir(self, rows: torch.Tensor) -> None:
        """Keep the sample_rows rows with the smallest random keys: a uniform sample of all rows."""
        keys = torch.rand(rows.shape[0], generator=self.gen, dtype=torch.float64)
        keys_all = torch.cat((self.sample_keys, keys))
        rows_all = torch.cat((self.sample, rows))
        keep = keys_all.argsort()[: self.sample_rows]
        self.sample_keys, self.sample = keys_all[keep], rows_all[keep]

    def result(self) -> LayerStats:
        if not self.tokens:
            raise StatsError("no batch reached this layer inside capture_stats")
        return LayerStats(
            absmax=self.absmax.cpu().numpy(),
            gram=(self.gram / self.tokens).float().cpu().numpy(),
            sample=self.sample.numpy(),
            tokens=self.tokens,
        )


class StatsCapture:
    """What ``capture_stats`` yields: run batches, then ``save(path)``."""

    def __init__(self, observers: dict[str, _LayerObserver], config: DuQuantConfig) -> None:
        self._observers = observers
        self.config = config

    @staticmethod
    def _write_layer(out: SealedWriter, name: str, obs: _LayerObserver) -> dict[str, object]:
        """One layer's group: its datasets and their metadata; returns the metadata."""
        stats = obs.result()
        at = f"layers/{name}"
        out.group(at)
        arrays = {k: getattr(stats, k) for k in DATASETS}
        meta = {
            "in_features": stats.in_features,
            "tokens": stats.tokens,
            "weight_sum": obs.weight_sum,
            "weight_sumsq": obs.weight_sumsq,
            "crc32": {k: crc32(a) for k, a in arrays.items()},
        }
        out.attrs({"meta": json.dumps(meta, sort_keys=True)}, at)
        for key, array in arrays.items():
            out.dataset(f"{at}/{key}", np.ascontiguousarray(array))
        return meta

    def save(self, path: str | Path) -> Path:
        """Write the statistics file (temp file + rename); returns its path."""
        silent = [n for n, o in self._observers.items() if not o.tokens]
        if silent:
            raise StatsError(
                f"{len(silent)} selected layer(s) saw no input inside capture_stats (e.g. {silent[0]}): run "
                "batches that go through every selected layer before saving"
            )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with SealedWriter(path, KIND) as out:
            out.attrs(KIND.stamp())
            index = {name: self._write_layer(out, name, obs) for name, obs in sorted(self._observers.items())}
            out.attrs({"digest": hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()})
        return path


@contextlib.contextmanager
def capture_stats(
    model: nn.Module,
    config: str | Path | DuQuantConfig,
    *,
    name_prefix: str = "",
    gram_block: int = 1024,
    sample_rows: int = 512,
    seed: int = 0,
) -> Iterator[StatsCapture]:
    """Record input statistics of the Linear layers ``config`` selects, for ``build --calib``::

        with capture_stats(model, "full_w4a8") as stats:
            for batch in batches:
                model(batch)
        stats.save("artifacts/stats/full_w4a8.h5")

    Run it on the float model (before ``load_bundle``). ``name_prefix`` is prepended to
    module names to get checkpoint names. Layers are recorded under the names the build
    gives them: on a model whose selected modules all sit under one parent the scope does not
    expect (LeRobot's policy holds pi0.5 as ``model``), that prefix is dropped, as ``build``
    drops it from the checkpoint's names.
    """
    cfg = resolve(config)
    linears = {name_prefix + n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    detected = selection_prefix(cfg.select, linears)
    linears = {n[len(detected) :]: m for n, m in linears.items() if n.startswith(detected)}
    names = matches(cfg.select, linears)
    if not names:
        raise StatsError(
            f"config {cfg.name!r} selects none of this model's {len(linears)} nn.Linear modules "
            f"(e.g. {next(iter(linears), 'none')}); check name_prefix and the config's scope"
        )
    observers = {n: _LayerObserver(linears[n], gram_block, sample_rows, seed) for n in names}
    try:
        yield StatsCapture(observers, cfg)
    finally:
        for obs in observers.values():
            obs.handle.remove()


class StatsReader:
    """Read a statistics file; every failure is one :class:`StatsError` sentence.

    ``whole_file``: check the seal (a crc32 of every byte) on open, which then vouches for
    every dataset. Without it (build workers, once the build has checked the seal) each
    layer's datasets are checked against their own crc32 when read."""

    def __init__(self, path: str | Path, *, whole_file: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StatsError(f"statistics file not found: {self.path}")
        with self._translated("the statistics file"), SealedReader(self.path, KIND, check=whole_file) as f:
            self.sealed = f.sealed
            fmt = f.attr("format") if f.has_attr("format") else None
            if fmt != STATS_FORMAT:
                raise StatsError(f"{self.path} is not a duquant statistics file (format {fmt!r})")
            self._check_version(int(f.attr("format_version")), whole_file)
            self.digest = str(f.attr("digest"))
            self.meta = {name: f.json("meta", f"layers/{name}") for name in f.names("layers")}

    def _check_version(self, version: int, whole_file: bool) -> None:
        if version == 1:
            raise StatsError(
                f"{self.path} holds statistics of format 1 (duquant-packs 0.2), which this tool no longer reads: "
                "capture them again with `capture_stats`"
            )
        if version != STATS_VERSION or (whole_file and not self.sealed):
            raise StatsError(
                f"{self.path} has statistics format {version}{'' if self.sealed else ' without its seal'}; "
                f"this tool reads format {STATS_VERSION}: {FIX}"
            )

    def _translated(self, what: str) -> contextlib.AbstractContextManager[None]:
        return translated(self.path, what, StatsError, "the file is damaged", FIX)

    def layer(self, name: str) -> LayerStats:
        with self._translated(f"the statistics of {name}"):
            with SealedReader(self.path, KIND, check=False) as f:
                arrays = {k: f.read(f"layers/{name}/{k}") for k in DATASETS}
            meta = self.meta[name]
            if not self.sealed:  # a sealed file's bytes are vouched for by its seal
                for key, array in arrays.items():
                    if crc32(array) != int(meta["crc32"][key]):
                        raise StatsError(f"{self.path}: {name}/{key} fails its checksum; the file is corrupted")
            return LayerStats(tokens=int(meta["tokens"]), **arrays)
