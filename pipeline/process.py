"""Every process-wide setting the pipeline makes, in one place.

Nothing else in the pipeline touches process state (signals, the allocator, torch's
threads, loky's worker settings, per-process caches of opened inputs):

* ``StopSignals``: Ctrl-C (SIGINT) and a scheduler's stop (SIGTERM, from Slurm, Kubernetes,
  ``timeout``, systemd) both become :class:`Stopped` in the main thread, so the build stops
  its workers and removes its temp file either way; the CLI exits 130 or 143.
* ``init_worker``: what a pool process of our own runs once when it starts (a loky
  initializer, a dask worker plugin): one torch thread, large temporaries kept, no loky
  leak restarts. Pack jobs themselves change nothing.
* ``keep_large_temporaries`` / ``return_freed_memory``: the glibc allocator, for in-process
  builds.
* ``cached_open``: one opened checkpoint or statistics file per process, not one per layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
TRIM_ABOVE_BYTES = 2 << 30  # in-process builds return freed memory above this resident size
T = TypeVar("T")


class Stopped(KeyboardInterrupt):
    """The build was asked to stop: Ctrl-C (SIGINT) or a scheduler's SIGTERM.

    A KeyboardInterrupt, so everything that already cleans up on Ctrl-C (joblib aborting its
    workers, the temp file's removal) does the same on SIGTERM."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """SIGINT and SIGTERM raise :class:`Stopped` in the main thread for the block's duration,
    and are remembered. Python may raise it inside a garbage-collection callback, which
    swallows it ("Exception ignored"); ``check()`` (the build's per-layer progress call)
    raises it again, so no stop is lost. Only the first signal raises: a second one while the
    build cleans up (closing a dask cluster takes seconds) does not cut the cleanup short.
    A signal the process was started with ignored (SIGINT in a background job) stays ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._raised = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = self.received or signum
        if not self._raised:
            self._raised = True
            raise Stopped(signum)

    def check(self) -> None:
        if self.received is not None:
            raise Stopped(self.received)

    def _unraisable(self, unraisable: Any) -> None:
        if not issubclass(unraisable.exc_type, KeyboardInterrupt):  # ours is raised again by check()
            self._hook(unraisable)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._hook = sys.unraisablehook
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
                self._previous[signum] = signal.signal(signum, self._handler)
        if self._previous:
            sys.unraisablehook = self._unraisable
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._previous:
            sys.unraisablehook = self._hook
        self._previous = {}


def block_stop_signals() -> None:
    """Keep SIGINT and SIGTERM away from the calling thread (a helper thread's initializer): the
    kernel then delivers them to the main thread, whose blocking waits they interrupt."""
    signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))


@contextlib.contextmanager
def deaf_to_ctrl_c() -> Iterator[None]:
    """Start worker processes inside this block with SIGINT ignored.

    A terminal's Ctrl-C signals the whole foreground process group; workers that got it would
    each die with a traceback. An ignored disposition survives exec, and Python keeps it at
    startup, so Ctrl-C reaches only the build, which stops the workers itself. SIGTERM keeps
    its default in the workers: a scheduler that signals the whole group stops them at once.

    While the block runs, this thread also blocks both signals: on Linux a blocked signal stays
    pending even when ignored, so one sent in that window is delivered as soon as the block
    ends, never lost. (A blocked mask alone would not do: loky clears it when it spawns.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# ---------------------------------------------------------------- allocator and threads


@functools.cache
def keep_large_temporaries() -> None:
    """Ask glibc to keep freed large blocks in the heap (once per process).

    By default every temporary over ~32 MB is mmap'ed and unmapped on free, so each layer
    page-faults its float32 copies back in: on 2 cores that was 19 s of system time in a
    73 s full-model build (8 s and 63 s with this). Peak memory is unchanged: the same
    temporaries are reused instead of re-faulted. A no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 31)
    libc.mallopt(m_top_pad, 256 << 20)


def return_freed_memory() -> None:
    """Give memory freed by finished layers back to the system once this process holds more
    than ``TRIM_ABOVE_BYTES``: glibc keeps it in per-thread arenas, and an in-process full-size
    build grew to 4.5 GB of anonymous memory, 1.1 GB when trimmed after every layer. Below
    the bound nothing is trimmed, since re-faulting freed temporaries costs time (58.6 s ->
    74.3 s for that build with a trim per layer)."""
    try:
        with open("/proc/self/statm") as fh:
            resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        if resident > TRIM_ABOVE_BYTES:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, ValueError, AttributeError, IndexError):
        return  # not Linux/glibc: nothing to do


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Cap this process's torch threads for the block, then put the caller's setting back
    (the threading backend runs its jobs in the caller's process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _no_loky_leak_restarts() -> None:
    """Stop loky from replacing this worker as "leaking".

    With psutil installed, loky restarts a worker whose RSS grew 300 MB past its size after
    its first task; the heap that ``keep_large_temporaries`` keeps on purpose always does,
    so every large layer cost a worker restart (imports, compiled kernels): 47 s -> 73 s for
    the full-size build. loky has no supported setting for this limit (its executor takes
    none, and no environment variable reads it), so the module global it reads after each
    task is raised here, in the worker, by its initializer.
    """
    try:
        from joblib.externals.loky import process_executor
    except ImportError:
        return
    process_executor._MAX_MEMORY_LEAK_SIZE = 1 << 62


@functools.cache
def init_worker() -> None:
    """A pool process of our own, once at its start: one torch thread (2 workers x 2 threads
    would oversubscribe 2 cores; loky also caps BLAS through ``inner_max_num_threads``),
    large temporaries kept, no loky leak restarts."""
    torch.set_num_threads(1)
    keep_large_temporaries()
    _no_loky_leak_restarts()


# ---------------------------------------------------------------- per-process caches


@functools.lru_cache(maxsize=8)
def _opened(opener: Callable[[str], Any], path: str, mtime_ns: int, size: int) -> Any:
    return opener(path)


def cached_open(opener: Callable[[str], T], path: str) -> T:
    """``opener(path)``, once per process for an unchanged file (keyed on its mtime and size,
    so a rewritten file is opened again): a worker parses a checkpoint's header or a
    statistics file's index once, not once per layer (~2 ms each for pi0.5's 800 tensors)."""
    try:
        st = os.stat(path)
    except OSError:
        return opener(path)  # the opener says what is wrong with the path
    return _opened(opener, path, st.st_mtime_ns, st.st_size)
