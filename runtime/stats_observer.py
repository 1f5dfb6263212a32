"""Calibration statistics in memory: one layer's, and the forward pre-hook that accumulates them.

``stats.py`` holds the file format and ``capture_stats``; its docstring says what each
statistic is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import StatsError
from .flowsteps import StepTable
from .signature import weight_signature


def observing_eagerly() -> contextlib.AbstractContextManager[None]:
    """Run the model eagerly while observers record: openpi compiles ``sample_actions`` at
    construction, and hooks that keep Python state (rows per step, batch counts) must see
    each call as it happens, not be traced into a graph. Compiled functions called inside run
    their original code; outside, they compile as before."""
    return torch.compiler.set_stance("force_eager")


@dataclass
class LayerStats:
    absmax: np.ndarray  # float32 [in]
    gram: np.ndarray  # float32 [n_gram_blocks, G, G], mean xᵀx per diagonal block
    sample: np.ndarray  # float32 [rows, in]
    tokens: int
    step_sample: np.ndarray | None = None  # float32 [steps, rows, in], per_step_static captures

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
            step_sample=None if self.step_sample is None else (self.step_sample * f).astype(np.float32),
        )


class _Reservoir:
    """A uniform sample of at most ``size`` of the rows offered: those with the smallest random keys."""

    def __init__(self, size: int, width: int, gen: torch.Generator) -> None:
        self.size, self.gen, self.seen = size, gen, 0
        self.rows = torch.zeros(0, width, dtype=torch.float32)
        self.keys = torch.zeros(0, dtype=torch.float64)

    def offer(self, rows: torch.Tensor) -> None:
        self.seen += rows.shape[0]
        keys = torch.cat((self.keys, torch.rand(rows.shape[0], generator=self.gen, dtype=torch.float64)))
        rows = torch.cat((self.rows, rows))
        keep = keys.argsort()[: self.size]
        self.keys, self.rows = keys[keep], rows[keep]


class LayerObserver:
    """Accumulates one layer's statistics from its forward inputs."""

    def __init__(
        self,
        module: nn.Linear,
        gram_block: int,
        sample_rows: int,
        seed: int,
        steps: StepTable | None = None,
        step_rows: int = 0,
        name: str = "",
    ) -> None:
        n = module.in_features
        self.n, self.g = n, min(gram_block, n)
        self.tokens = 0
        nblk = -(-n // self.g)
        dev = module.weight.device
        self.absmax = torch.zeros(n, dtype=torch.float32, device=dev)
        self.gram = torch.zeros(nblk, self.g, self.g, dtype=torch.float64, device=dev)
        self.gen = torch.Generator().manual_seed(seed)
        self.reservoir = _Reservoir(sample_rows, n, self.gen)
        self.name, self.steps = name, steps
        self.by_step = [] if steps is None else [_Reservoir(step_rows, n, self.gen) for _ in steps.times]
        self.weight_sum, self.weight_sumsq = weight_signature(module.weight)
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        with torch.no_grad():
            x = args[0].detach().reshape(-1, self.n)
            step = None if self.steps is None else self.steps.row(self.name)  # raises outside a step
            xf = x.float()
            self.absmax = torch.maximum(self.absmax, xf.abs().amax(dim=0))
            xd = torch.nn.functional.pad(x.double(), (0, self.gram.shape[0] * self.g - self.n))
            blocks = xd.reshape(-1, self.gram.shape[0], self.g).transpose(0, 1)  # [nblk, tokens, G]
            self.gram += torch.bmm(blocks.transpose(1, 2), blocks)
            self.reservoir.offer(xf.cpu())
            if step is not None:
                self.by_step[step].offer(xf.cpu())
            self.tokens += x.shape[0]

    def silent_step(self) -> int | None:
        """The first denoising step that reached no row of this layer, None when all did."""
        return next((k for k, r in enumerate(self.by_step) if not r.seen), None)

    def step_sample(self) -> np.ndarray | None:
        """[steps, rows, in]: each step's sample cut to the smallest step's rows."""
        if not self.by_step:
            return None
        rows = min(r.rows.shape[0] for r in self.by_step)
        return torch.stack([r.rows[:rows] for r in self.by_step]).numpy()

    def result(self) -> LayerStats:
        if not self.tokens:
            raise StatsError("no batch reached this layer inside capture_stats")
        return LayerStats(
            absmax=self.absmax.cpu().numpy(),
            gram=(self.gram / self.tokens).float().cpu().numpy(),
            sample=self.reservoir.rows.numpy(),
            tokens=self.tokens,
            step_sample=self.step_sample(),
        )
