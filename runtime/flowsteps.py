"""Which denoising step is running: per-step activation scales without editing the model's code.

A flow-matching policy runs its action expert once per denoising step, at the flow times
1, 1 - 1/n, ..., 1/n (openpi's ``sample_actions`` and LeRobot's PI0/PI05 both call
``denoise_step(..., x_t, timestep)`` once per step). ``instrument(model)`` (``denoise_wrapper.py``)
wraps that method so each call sets the model's :class:`StepClock` to the flow time it was
given; ``flow_step(model, time=t)`` does the same for any other loop.

The clock is the one piece of state: it lives on the instrumented module (``STEP_CLOCK``) and
is set only around a denoising step, outside every layer's forward. It holds the flow time
**as the loop's tensor**, so a compiled ``sample_actions`` computes each layer's table row in
the graph, ``round((1 - t) * steps)``: no ``.item()``, no host sync, no guard on the time's
value, one graph for every step. The step is keyed by the flow-time value, never by counting
calls: a repeated call or another number of steps cannot shift it.

Nothing falls back silently. Eagerly, the time's Python value (read once per step, where the
clock is set) is checked by each layer against its own table: no step set, an unknown flow time
and a step beyond the table each raise a ``StepError`` naming the layer and the step. Inside a
compiled graph the same check runs once per step as ``torch._assert_async`` where the clock is
set (``denoise_wrapper.py``), which neither breaks the graph nor syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NoStepError, StepError, StepOutOfTableError, UnknownFlowTimeError

STEP_CLOCK = "_duquant_step_clock"  # the attribute holding an instrumented module's clock
TOLERANCE = 1e-3  # float32 drift over 10 steps is ~1e-7; a 20-step schedule's 0.95 is 0.05 away


def flow_times(steps: int) -> tuple[float, ...]:
    """The flow times of an ``steps``-step Euler schedule from t = 1 (openpi, LeRobot)."""
    return tuple(1.0 - k / steps for k in range(steps))


def nearest_row(time: torch.Tensor, steps: int) -> torch.Tensor:
    """[1] int64: the row of the schedule's time nearest the first flow time of ``time``,
    computed on its device (the graph's own arithmetic: nothing is read back to the host)."""
    t = time.detach().reshape(-1)[:1].float()
    return torch.round((1 - t) * steps).long().clamp(0, steps - 1)


def schedule_check(time: torch.Tensor, steps: int) -> torch.Tensor:
    """A bool tensor: every flow time of ``time`` is one time of the ``steps``-step schedule
    (within ``TOLERANCE``), and the batch holds one time."""
    t = time.detach().reshape(-1).float()
    k = torch.round((1 - t) * steps)
    on_schedule = ((t - (1 - k / steps)).abs() <= TOLERANCE) & (k >= 0) & (k < steps)
    return (on_schedule & (t == t[:1])).all()


def eager_time(time: torch.Tensor, caller: str) -> float:
    """The one flow time of a step's tensor, read back eagerly (one small copy to the host per
    step); a ``StepError`` for an empty tensor or a batch of different times."""
    flat = time.detach().reshape(-1).float().cpu()
    if flat.numel() == 0:
        raise StepError(f"{caller} was called with an empty timestep tensor")
    if bool((flat != flat[0]).any()):
        raise StepError(
            f"{caller} was called with different flow times across the batch; per-step activation scales "
            "need one step per call"
        )
    return float(flat[0])


class StepClock:
    """The denoising step now running, or none (outside a step).

    ``time``: the flow time, the loop's own tensor; ``index``: or the row itself, a [1] int64
    tensor (``flow_step(index=k)``). ``value``: the same as a Python number when the clock was set
    eagerly (None when it was set inside a compiled graph): eager checks read it, never the tensor.
    ``schedules``: the step counts of the per-step tables reading this clock (``step_table``),
    which a compiled step is checked against.
    """

    def __init__(self) -> None:
        self.time: torch.Tensor | None = None
        self.index: torch.Tensor | None = None
        self.value: float | int | None = None
        self.schedules: tuple[int, ...] = ()

    def state(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float | int | None]:
        return self.time, self.index, self.value

    def set(
        self,
        time: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
        value: float | int | None = None,
    ) -> None:
        self.time, self.index, self.value = time, index, value

    @contextlib.contextmanager
    def at(self, *, time: float | torch.Tensor | None = None, index: int | None = None) -> Iterator[None]:
        """Hold one step for the block: a flow time (a number or the loop's tensor) or a row index."""
        if (time is None) == (index is None):
            raise ValueError("give the step as exactly one of time= or index=")
        before = self.state()
        if index is not None:
            self.set(index=torch.tensor([int(index)]), value=int(index))
        elif isinstance(time, torch.Tensor):
            self.set(time=time, value=eager_time(time, "flow_step()"))
        else:
            self.set(time=torch.tensor([float(time)]), value=float(time))
        try:
            yield
        finally:
            self.set(*before)

    def add_schedule(self, steps: int) -> None:
        if steps not in self.schedules:
            self.schedules = (*self.schedules, steps)


@dataclass(frozen=True)
class StepTable:
    """A per-step layer's view of the clock: the number of steps of its table, and the clock."""

    steps: int
    clock: StepClock

    @property
    def times(self) -> tuple[float, ...]:
        return flow_times(self.steps)

    def row_of(self, table: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """``table``'s row ([steps, in] -> [in]) for the step now running, gathered on the table's
        device. Eagerly, a ``StepError`` naming ``layer`` when the step is unset or off the table."""
        clock = self.clock
        unset = clock.index is None and clock.time is None
        # Eagerly the step is checked from its Python value (no sync); a step set inside a compiled
        # graph has none, and was checked there. Unset raises NoStepError (re-raised eagerly by dynamo).
        if unset or (not torch.compiler.is_compiling() and clock.value is not None):
            self.row(_name_of(layer))
        index = clock.index if clock.index is not None else nearest_row(clock.time, self.steps)
        return table.index_select(0, index.clamp(0, self.steps - 1).to(table.device)).reshape(table.shape[1:])

    def row(self, layer: str) -> int:
        """The table row of the step now running (eager callers: observers, checks); a
        ``StepError`` naming ``layer`` when no step is set, or it is none of this table's."""
        clock = self.clock
        if clock.index is None and clock.time is None:
            raise NoStepError(
                f"layer {layer} uses per-step activation scales, but no denoising step is set: call "
                f"duquant_runtime.instrument(model) before running the model, or run it inside "
                f"`with duquant_runtime.flow_step(model, time=t):`",
                layer=layer,
            )
        if clock.value is None:
            raise NoStepError(
                f"layer {layer}: the step was set inside a compiled graph; statistics and calibration run eagerly",
                layer=layer,
            )
        if clock.index is not None:
            return self._checked_index(int(clock.value), layer)
        return self.index_of(float(clock.value), layer)

    def _checked_index(self, index: int, layer: str) -> int:
        if not 0 <= index < self.steps:
            raise StepOutOfTableError(
                f"layer {layer}: step {index} is outside its per-step scale table of {self.steps} steps "
                f"(0..{self.steps - 1}); calibrate for this number of steps",
                layer=layer,
                step=index,
            )
        return index

    def index_of(self, time: float, layer: str) -> int:
        """The row of flow time ``time``; ``UnknownFlowTimeError`` when it is none of the table's."""
        best = min(max(round((1 - time) * self.steps), 0), self.steps - 1)
        if abs(time - self.times[best]) > TOLERANCE:
            shown = ", ".join(f"{t:g}" for t in self.times)
            # Worded for every caller: a capture or a calibration in progress meets it as well as inference.
            raise UnknownFlowTimeError(
                f"layer {layer}: flow time {time:.6g} is none of the {self.steps} flow times of its per-step scale "
                f"table ({shown}; tolerance {TOLERANCE:g}): the denoising loop runs another number of steps than "
                f"quant.flow_steps = {self.steps}; run it with {self.steps} steps, or use a config (and bundle) "
                "whose quant.flow_steps is the loop's",
                layer=layer,
                step=time,
            )
        return best


def loop_steps(seen: list[int], steps: int) -> int | None:
    """The number of steps of a shorter loop that reached exactly the rows ``seen`` of a
    ``steps``-row table (a 10-step loop on a 20-step table: rows 0, 2, ..., 18), or None when
    ``seen`` is not such a loop's (a loop stopped early, a layer some steps skip)."""
    n = len(seen)
    if 0 < n < steps and steps % n == 0 and sorted(seen) == list(range(0, steps, steps // n)):
        return n
    return None


def steps_mismatch(seen: list[int], steps: int, whose: str, fix: str) -> str | None:
    """'the loop ran 10 steps; this config has flow_steps = 20: ...' when ``seen`` is a shorter
    loop's rows (``loop_steps``); ``fix`` says how to change ``whose`` flow_steps."""
    n = loop_steps(seen, steps)
    if n is None:
        return None
    return (
        f"the loop ran {n} step{'s' if n != 1 else ''}; {whose} has flow_steps = {steps}: run the loop with "
        f"{steps} steps, or {fix} quant.flow_steps = {n}"
    )


def _name_of(layer: nn.Module) -> str:
    return getattr(layer, "bundle_name", None) or type(layer).__name__


def clock_of(model: nn.Module) -> StepClock | None:
    """The clock ``instrument`` (or ``attach_clock``) gave this model or one of its submodules, or None."""
    for module in model.modules():
        clock = module.__dict__.get(STEP_CLOCK)
        if isinstance(clock, StepClock):
            return clock
    return None


def attach_clock(model: nn.Module) -> StepClock:
    """The model's step clock, given it now if it has none (without wrapping any method): for a
    loop of your own that sets each step with ``flow_step``, call it before ``load_bundle``."""
    clock = clock_of(model)
    if clock is None:
        clock = StepClock()
        object.__setattr__(model, STEP_CLOCK, clock)
    return clock


@contextlib.contextmanager
def flow_step(
    model: nn.Module, *, time: float | torch.Tensor | None = None, index: int | None = None
) -> Iterator[None]:
    """Run one denoising step of your own loop: ``with flow_step(model, time=t): expert(...)``.
    ``index`` names the row directly (0 for t = 1). Gives the model a clock if it has none."""
    with attach_clock(model).at(time=time, index=index):
        yield


def step_table(model: nn.Module, steps: int, what: str) -> StepTable:
    """The table of ``steps`` rows for per-step ``what`` on ``model``, its schedule registered on
    the clock (what a compiled step is checked against); refused when the model has no clock."""
    clock = clock_of(model)
    if clock is None:
        raise NoStepError(
            f"{what} uses per-step activation scales, and this model is not instrumented: call "
            "duquant_runtime.instrument(model) first (it wraps denoise_step), or use "
            "`with duquant_runtime.flow_step(model, time=t):` around each denoising step"
        )
    clock.add_schedule(steps)
    return StepTable(steps, clock)
