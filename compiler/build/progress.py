"""Progress of a TensorRT build on a terminal, and Ctrl-C as a clean cancel."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable


# --- Step 3: the serialized engine, under a progress monitor ---------------------------------------
class ProgressDisplay:
    """rich progress bars, one per TensorRT build phase."""

    def __init__(self, enabled: bool):
        self._progress = None
        self._tasks: dict[str, Any] = {}
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                      TimeElapsedColumn(), transient=True)

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()

    def phase_start(self, parent: str | None, name: str, steps: int) -> None:
        if self._progress is not None:
            depth = 0
            while parent is not None and parent in self._tasks:
                depth += 1
                parent = self._tasks[parent][1]
            self._tasks[name] = (self._progress.add_task("  " * depth + name, total=steps), parent)

    def step(self, name: str, step: int) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.update(self._tasks[name][0], completed=step + 1)

    def phase_finish(self, name: str) -> None:
        if self._progress is not None and name in self._tasks:
            self._progress.remove_task(self._tasks.pop(name)[0])


def make_progress_monitor(trt, display: ProgressDisplay, cancel: threading.Event):
    """An IProgressMonitor that drives ``display`` and cancels the build when ``cancel`` is set or a
    display callback raises (Ctrl-C lands there). TensorRT swallows exceptions from the callbacks,
    so the first one is kept and re-raised once the build has returned."""

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.error: BaseException | None = None

        def _guard(self, fn: Callable[[], None]) -> bool:
            if self.error is not None or cancel.is_set():
                return False
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised after the build returns
                self.error = e
                return False
            return True

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._guard(lambda: display.phase_start(parent_phase, phase_name, num_steps))

        def step_complete(self, phase_name, step):
            return self._guard(lambda: display.step(phase_name, step))

        def phase_finish(self, phase_name):
            self._guard(lambda: display.phase_finish(phase_name))

    return _Monitor()


@contextlib.contextmanager
def _sigint_cancels(cancel: threading.Event):
    """While building, Ctrl-C sets ``cancel`` (the monitor stops TensorRT at its next step)
    instead of raising inside TensorRT's C++ code."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
