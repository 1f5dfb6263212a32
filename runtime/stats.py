"""Calibration statistics: captured on the float model, consumed by ``duquant-packs build --calib``.

For every selected Linear's input, over all batches run inside ``capture_stats``:

* ``absmax``     per-channel max |x| (SmoothQuant's statistic);
* ``gram``       the mean second-moment matrix XᵀX / tokens, kept as diagonal blocks of
  ``gram_block`` channels (full when in_features <= gram_block): memory is bounded by
  in_features x gram_block per layer, not in_features²;
* ``sample``     a uniform reservoir of at most ``sample_rows`` token rows (seeded), from
  which build derives static activation scales in the transformed basis and estimates
  each layer's output SQNR;
* ``step_sample`` (a ``per_step_static`` config only) a reservoir of ``step_rows`` rows per
  denoising step, ``[steps, rows, in]``, the step read from the model's clock
  (``flowsteps.instrument``), from which build derives one scale row per step.

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
from pathlib import Path

import numpy as np
from torch import nn

from .config import DuQuantConfig, matches, resolve
from .crc import crc32
from .errors import StatsError
from .flowsteps import StepTable, step_table, steps_mismatch
from .h5file import STATS_MAGIC, FileKind, SealedReader, SealedWriter
from .layer import DuQuantLinear
from .prefix import selection_prefix
from .read_errors import translated
from .stats_observer import LayerObserver, LayerStats, observing_eagerly

# 2 (0.3): sealed, no percentile dataset. 1 (0.2) is refused: capture the statistics again.
KIND = FileKind(STATS_MAGIC, "duquant-packs-stats", 2)
STATS_FORMAT, STATS_VERSION, SEAL_MAGIC = KIND.format, KIND.version, KIND.magic
DATASETS = ("absmax", "gram", "sample")
FIX = "capture the statistics again"


class StatsCapture:
    """What ``capture_stats`` yields: run batches, then ``save(path)``."""

    def __init__(self, observers: dict[str, LayerObserver], config: DuQuantConfig) -> None:
        self._observers = observers
        self.config = config

    @staticmethod
    def _write_layer(out: SealedWriter, name: str, obs: LayerObserver) -> dict[str, object]:
        """One layer's group: its datasets and their metadata; returns the metadata."""
        stats = obs.result()
        at = f"layers/{name}"
        out.group(at)
        arrays = {k: getattr(stats, k) for k in DATASETS}
        extra: dict[str, object] = {}
        if stats.step_sample is not None:
            arrays["step_sample"] = stats.step_sample
            extra = {"flow_times": list(obs.steps.times), "step_tokens": [r.seen for r in obs.by_step]}  # type: ignore[union-attr]
        meta = {
            **extra,
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
        quiet = {n: o.silent_step() for n, o in self._observers.items() if o.silent_step() is not None}
        if quiet:
            name, step = next(iter(quiet.items()))
            obs = self._observers[name]
            time = obs.steps.times[step]  # type: ignore[union-attr]
            seen = [k for k, r in enumerate(obs.by_step) if r.seen]
            why = steps_mismatch(seen, len(obs.by_step), "this config", "capture with") or (
                "run the whole denoising loop, every step, before saving"
            )
            raise StatsError(
                f"{len(quiet)} selected layer(s) recorded no rows at denoising step {step} (flow time {time:g}) "
                f"inside capture_stats (e.g. {name}): {why}"
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
    step_rows: int = 256,
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

    A ``per_step_static`` config also records ``step_rows`` rows per denoising step: the step
    is read from the model's clock, so call ``instrument(model)`` first (refused otherwise);
    a selected layer run outside a step raises ``NoStepError``.
    """
    cfg = resolve(config)
    linears = _selected_linears(model, cfg, name_prefix)
    names = list(linears)
    stepped = {n for n in names if cfg.quant.runs_per_step(n)}
    table = None
    if stepped:  # only per-step layers read the clock (llm_w4a4 selects none of full_w4a4's)
        table = step_table(model, cfg.quant.flow_steps, f"capture_stats for config {cfg.name!r}")

    def steps_of(name: str) -> StepTable | None:
        return table if name in stepped else None

    observers = {n: LayerObserver(linears[n], gram_block, sample_rows, seed, steps_of(n), step_rows, n) for n in names}
    try:
        with observing_eagerly():
            yield StatsCapture(observers, cfg)
    finally:
        for obs in observers.values():
            obs.handle.remove()


def _selected_linears(model: nn.Module, cfg: DuQuantConfig, name_prefix: str) -> dict[str, nn.Module]:
    """The float Linears ``cfg`` selects in ``model``, by the names the build gives them; refused
    when it selects none, or selects layers a bundle has quantized already (their float inputs
    are what the statistics are of)."""
    found = {name_prefix + n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | DuQuantLinear)}
    detected = selection_prefix(cfg.select, found)
    found = {n[len(detected) :]: m for n, m in found.items() if n.startswith(detected)}
    names = matches(cfg.select, found)
    quantized = [n for n in names if isinstance(found[n], DuQuantLinear)]
    if quantized:
        raise StatsError(
            f"this model holds a bundle already ({len(quantized)} of the {len(names)} layers config {cfg.name!r} "
            f"selects are DuQuantLinear, e.g. {quantized[0]}): capture statistics on the float model, before "
            "load_bundle"
        )
    if not names:
        linears = [n for n, m in found.items() if isinstance(m, nn.Linear)]
        raise StatsError(
            f"config {cfg.name!r} selects none of this model's {len(linears)} nn.Linear modules "
            f"(e.g. {next(iter(linears), 'none')}); check name_prefix and the config's scope"
        )
    return {n: found[n] for n in names}


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
            meta = self.meta[name]
            keys = (*DATASETS, "step_sample") if "step_tokens" in meta else DATASETS
            with SealedReader(self.path, KIND, check=False) as f:
                arrays = {k: f.read(f"layers/{name}/{k}") for k in keys}
            if not self.sealed:  # a sealed file's bytes are vouched for by its seal
                for key, array in arrays.items():
                    if crc32(array) != int(meta["crc32"][key]):
                        raise StatsError(f"{self.path}: {name}/{key} fails its checksum; the file is corrupted")
            return LayerStats(tokens=int(meta["tokens"]), **arrays)
