"""Progress of long steps (export, verify, compile's stages) on a terminal; silence in a pipe.

A command opens ``shown(title)`` around its work; the stage functions call ``step(text)`` at
their phases, which updates one transient line on stderr (spinner, ``title: text``, elapsed
time) while a display is open and does nothing otherwise, so the functions stay quiet when called
from Python, in a test, or with stderr redirected to a file or a CI log. rich draws it (the
build's bars are rich too); it is imported only when a display opens.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any, Iterator

_active: contextvars.ContextVar[tuple[Any, Any, str] | None] = contextvars.ContextVar("moec_progress", default=None)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


@contextlib.contextmanager
def shown(title: str, enabled: bool = True, force: bool = False, live: bool = True) -> Iterator[None]:
    """Show ``title`` and the current step while the block runs: only when ``enabled`` and stderr
    is a terminal (or ``force``), and not inside another display (rich draws one at a time).
    ``live=False`` redraws only at each step, with no refresh thread (a benchmark's timings)."""
    if not enabled or _active.get() is not None or not (force or stderr_is_terminal()):
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True, force_terminal=True if force else None)
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                   transient=True, auto_refresh=live)
    with bar:
        task = bar.add_task(title, total=None)
        token = _active.set((bar, task, title))
        try:
            yield
        finally:
            _active.reset(token)


def step(text: str) -> None:
    """Say what the open display's work is doing now (nothing when none is open)."""
    current = _active.get()
    if current is not None:
        bar, task, title = current
        bar.update(task, description=f"{title}: {text}", refresh=not bar.live.auto_refresh)
