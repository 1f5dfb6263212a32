"""Which denoising step is running: per-step activation scales without editing the model's code.

A flow-matching policy runs its action expert once per denoising step, at the flow times
1, 1 - 1/n, ..., 1/n (openpi's ``sample_actions`` and LeRobot's PI05 both call
``denoise_step(..., x_t, timestep)`` once per step). ``instrument(model)`` wraps that method
on the model (or the first submodule that has it), so each call sets the model's
:class:`StepClock` to the flow time it was given; ``flow_step(model, time=t)`` does the same
for any other loop. The step is keyed by the flow-time value, matched with a tolerance
(openpi accumulates ``time += dt`` in float32, so its times drift from 0.9, 0.8, ...), never by
counting calls: a repeated call or another number of steps cannot shift it.

The clock is the one piece of state: it lives on the instrumented module (``STEP_CLOCK``) and
is set only around a call of the denoising method, outside every layer's forward. The layers
that read it (``DuQuantLinear`` with ``act_mode = "per_step_static"``, ``capture_stats``,
``calibrate``) hold a :class:`StepTable`: their flow times and the clock. Nothing falls back:
no step set, an unknown flow time and a step beyond the table each raise a ``StepError``
naming the layer and the step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import DuQuantError, NoStepError, StepError, StepOutOfTableError, UnknownFlowTimeError

DENOISE_METHOD = "denoise_step"  # openpi's PI0Pytorch and LeRobot's PI05Pytorch
TIMESTEP_ARG = "timestep"
STEP_CLOCK = "_duquant_step_clock"  # the attribute holding an instrumented module's clock
TOLERANCE = 1e-3  # float32 drift over 10 steps is ~1e-7; a 20-step schedule's 0.95 is 0.05 away


def flow_times(steps: int) -> tuple[float, ...]:
    """The flow times of an ``steps``-step Euler schedule from t = 1 (openpi, LeRobot)."""
    return tuple(1.0 - k / steps for k in range(steps))


class StepClock:
    """The denoising step now running: a flow time, a step index, or neither (outside a step)."""

    def __init__(self) -> None:
        self.time: float | None = None
        self.index: int | None = None

    @contextlib.contextmanager
    def at(self, *, time: float | None = None, index: int | None = None) -> Iterator[None]:
        if (time is None) == (index is None):
            raise ValueError("give the step as exactly one of time= or index=")
        before = self.time, self.index
        self.time, self.index = (None if time is None else float(time)), index
        try:
            yield
        finally:
            self.time, self.index = before


@dataclass(frozen=True)
class StepTable:
    """A per-step layer's view of the clock: its flow times, one table row each."""

    times: tuple[float, ...]
    clock: StepClock

    def row(self, layer: str) -> int:
        """The table row of the step now running; a ``StepError`` naming ``layer`` otherwise."""
        index, time = self.clock.index, self.clock.time
        if index is not None:
            if not 0 <= index < len(self.times):
                raise StepOutOfTableError(
                    f"layer {layer}: step {index} is outside its per-step scale table of {len(self.times)} steps "
                    f"(0..{len(self.times) - 1}); calibrate for this number of steps",
                    layer=layer,
                    step=index,
                )
            return index
        if time is None:
            raise NoStepError(
                f"layer {layer} uses per-step activation scales, but no denoising step is set: call "
                f"duquant_runtime.instrument(model) before running the model, or run it inside "
                f"`with duquant_runtime.flow_step(model, time=t):`",
                layer=layer,
            )
        return self.index_of(time, layer)

    def index_of(self, time: float, layer: str) -> int:
        gaps = [abs(time - t) for t in self.times]
        best = min(range(len(gaps)), key=gaps.__getitem__)
        if gaps[best] > TOLERANCE:
            shown = ", ".join(f"{t:g}" for t in self.times)
            raise UnknownFlowTimeError(
                f"layer {layer}: flow time {time:.6g} is none of the {len(self.times)} steps its scales were "
                f"calibrated at ({shown}; tolerance {TOLERANCE:g}): calibrate for this schedule "
                "(quant.flow_steps)",
                layer=layer,
                step=time,
            )
        return best


def _owner(model: nn.Module, method: str) -> nn.Module:
    """The model, or its first submodule, with a callable ``method``."""
    for module in (model, *model.modules()):
        if callable(getattr(module, method, None)):
            return module
    raise DuQuantError(
        f"instrument(): neither the model ({type(model).__name__}) nor any of its submodules has a method "
        f"{method!r}; pass method= the name of the function your loop calls once per denoising step, or use "
        "`with flow_step(model, time=t):` around each step"
    )


def _one_time(value: Any, method: str) -> float:
    """The flow time of a call: a number, or a tensor holding one time (for every batch row)."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() == 0:
            raise StepError(f"{method}() was called with an empty timestep tensor")
        if flat.numel() > 1 and not bool((flat == flat[0]).all()):
            raise StepError(
                f"{method}() was called with different flow times across the batch; per-step activation scales "
                "need one step per call"
            )
        return float(flat[0])
    return float(value)


def instrument(model: nn.Module, method: str = DENOISE_METHOD, timestep_arg: str = TIMESTEP_ARG) -> StepClock:
    """Make ``model``'s denoising method set the step clock from its ``timestep`` argument; returns
    the clock. Idempotent. Call it before ``capture_stats``, ``load_bundle`` and ``calibrate`` of a
    per-step config; on LeRobot's policy pass the policy or its ``.model`` (the method is found on
    the first submodule that has it)."""
    owner = _owner(model, method)
    clock = getattr(owner, STEP_CLOCK, None)
    if isinstance(clock, StepClock):
        return clock
    original: Callable[..., Any] = getattr(owner, method)
    signature = inspect.signature(original)
    if timestep_arg not in signature.parameters:
        raise DuQuantError(
            f"instrument(): {type(owner).__name__}.{method} has no argument {timestep_arg!r} "
            f"(it takes {', '.join(signature.parameters)}); pass timestep_arg= the one holding the flow time"
        )
    clock = StepClock()

    @functools.wraps(original)
    def stepped(*args: Any, **kwargs: Any) -> Any:
        time = _one_time(signature.bind(*args, **kwargs).arguments[timestep_arg], method)
        with clock.at(time=time):
            return original(*args, **kwargs)

    object.__setattr__(owner, method, stepped)  # an instance attribute shadows the class's method
    object.__setattr__(owner, STEP_CLOCK, clock)
    return clock


def clock_of(model: nn.Module) -> StepClock | None:
    """The clock ``instrument`` gave this model or one of its submodules, or None."""
    for module in model.modules():
        clock = module.__dict__.get(STEP_CLOCK)
        if isinstance(clock, StepClock):
            return clock
    return None


@contextlib.contextmanager
def flow_step(model: nn.Module, *, time: float | None = None, index: int | None = None) -> Iterator[None]:
    """Run one denoising step of your own loop: ``with flow_step(model, time=t): expert(...)``.
    ``index`` names the row directly (0 for t = 1). Gives the model a clock if it has none."""
    with attach_clock(model).at(time=time, index=index):
        yield


def attach_clock(model: nn.Module) -> StepClock:
    """The model's step clock, given it now if it has none (without wrapping any method): for a
    loop of your own that sets each step with ``flow_step``, call it before ``load_bundle``."""
    clock = clock_of(model)
    if clock is None:
        clock = StepClock()
        object.__setattr__(model, STEP_CLOCK, clock)
    return clock


def step_table(model: nn.Module, times: Sequence[float], what: str) -> StepTable:
    """The table for per-step ``what`` on ``model``; refused when the model has no clock."""
    clock = clock_of(model)
    if clock is None:
        raise NoStepError(
            f"{what} uses per-step activation scales, and this model is not instrumented: call "
            "duquant_runtime.instrument(model) first (it wraps denoise_step), or use "
            "`with duquant_runtime.flow_step(model, time=t):` around each denoising step"
        )
    return StepTable(tuple(float(t) for t in times), clock)
