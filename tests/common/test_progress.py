"""Progress of long steps: drawn on a terminal, silent in a pipe, a no-op outside a display
(moec.common.progress)."""

from __future__ import annotations

from moec.common import progress


def test_a_terminal_sees_the_title_and_the_step(capfd):
    with progress.shown("moec export demo", force=True):
        progress.step("tracing the model")
    err = capfd.readouterr().err
    assert "moec export demo: tracing the model" in err


def test_a_pipe_sees_nothing(capfd):
    # Under pytest stderr is a pipe or a file, as in CI logs and `2> log`.
    assert not progress.stderr_is_terminal()
    with progress.shown("moec verify demo"):
        progress.step("prefill")
    progress.step("outside any display")
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""


def test_displays_do_not_nest(capfd):
    # rich draws one live display at a time; an inner one (a stage inside compile) is a no-op.
    with progress.shown("outer", force=True):
        with progress.shown("inner", force=True):
            progress.step("work")
    err = capfd.readouterr().err
    assert "outer" in err and "inner" not in err


def test_a_benchmark_display_redraws_at_each_step_only(capfd):
    # live=False: no refresh thread competes with the timed steps; each step still shows.
    import threading

    before = set(threading.enumerate())  # another test's thread may end meanwhile: count only new ones
    with progress.shown("moec bench m.onnx", force=True, live=False):
        assert set(threading.enumerate()) - before == set()
        progress.step("round 1")
        progress.step("round 2")
    err = capfd.readouterr().err
    assert "moec bench m.onnx: round 1" in err and "moec bench m.onnx: round 2" in err
