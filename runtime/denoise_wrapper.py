"""``instrument(model)``: make the model's denoising method set the step clock (``flowsteps.py``).

The wrapper is written to be traced: openpi compiles ``sample_actions`` at construction, and
dynamo inlines this wrapper into that graph. It reads the flow time from the call's arguments
by position or name (no ``inspect`` at call time), keeps it a tensor on the clock for the layers,
and checks it once per step:

* eagerly, by reading its value back (one scalar per step; openpi's own ``while time >= ...``
  reads one too): a ``StepError`` for a batch of different times, and each layer's own table
  check (``StepTable.row_of``) names the layer for a time off its schedule;
* inside a compiled graph, by ``torch._assert_async`` on the registered schedules: no graph
  break, no host sync; an off-schedule time stops the run with this module's message.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import DuQuantError, StepError
from .flowsteps import STEP_CLOCK, TOLERANCE, StepClock, clock_of, eager_time, schedule_check

DENOISE_METHOD = "denoise_step"  # openpi's PI0Pytorch and LeRobot's PI0/PI05 models
TIMESTEP_ARG = "timestep"
WRAPPED_CLOCK = "duquant_step_clock"  # on the wrapper: the clock it sets (instrument is idempotent)


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


def _off_schedule_message(method: str, steps: int) -> str:
    return (
        f"duquant_runtime: {method}() was called with a flow time that is none of the {steps} steps its "
        f"per-step activation scales were calibrated at (tolerance {TOLERANCE:g}), or with different flow "
        "times across the batch: run the loop with quant.flow_steps steps (run it eagerly to see the time)"
    )


def _assert_on_schedules(time: torch.Tensor, clock: StepClock, method: str) -> None:
    """The compiled form of the step check: an assertion in the graph, checked on the device."""
    for steps in clock.schedules:
        torch._assert_async(schedule_check(time, steps), _off_schedule_message(method, steps))


def _timestep_reader(original: Callable[..., Any], method: str, arg: str) -> Callable[..., Any]:
    """A function of (args, kwargs) returning the call's flow time, found by position or name."""
    names = list(inspect.signature(original).parameters)
    if arg not in names:
        raise DuQuantError(
            f"instrument(): {method} has no argument {arg!r} (it takes {', '.join(names)}); "
            "pass timestep_arg= the one holding the flow time"
        )
    position = names.index(arg)

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if position < len(args):
            return args[position]
        if arg in kwargs:
            return kwargs[arg]
        raise StepError(f"{method}() was called without its flow time argument {arg!r}")

    return read


def instrument(model: nn.Module, method: str = DENOISE_METHOD, timestep_arg: str = TIMESTEP_ARG) -> StepClock:
    """Make ``model``'s denoising method set the step clock from its ``timestep`` argument; returns
    the clock. Idempotent. Call it before ``capture_stats``, ``load_bundle`` and ``calibrate`` of a
    per-step config; on LeRobot's policy pass the policy or its ``.model`` (the method is found on
    the first submodule that has it). Works on a model whose ``sample_actions`` is already wrapped
    in ``torch.compile`` (openpi's default): the compiled loop calls the wrapped method."""
    owner = _owner(model, method)
    original: Callable[..., Any] = getattr(owner, method)
    if isinstance(getattr(original, WRAPPED_CLOCK, None), StepClock):
        return getattr(original, WRAPPED_CLOCK)
    read_time = _timestep_reader(original, f"{type(owner).__name__}.{method}", timestep_arg)
    clock = clock_of(model) or StepClock()  # attach_clock's, when it came first: one clock per model

    @functools.wraps(original)
    def stepped(*args: Any, **kwargs: Any) -> Any:
        time = read_time(args, kwargs)
        if not isinstance(time, torch.Tensor):
            time = torch.tensor([float(time)])
        if torch.compiler.is_compiling():
            _assert_on_schedules(time, clock, method)
            value = None
        else:
            value = eager_time(time, f"{method}()")
        before = clock.state()
        clock.set(time=time, value=value)
        try:
            return original(*args, **kwargs)
        finally:
            clock.set(*before)

    setattr(stepped, WRAPPED_CLOCK, clock)
    object.__setattr__(owner, method, stepped)  # an instance attribute shadows the class's method
    object.__setattr__(owner, STEP_CLOCK, clock)
    return clock
