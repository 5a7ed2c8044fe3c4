"""The ``moec`` command line: a thin layer over functions a user can also call from Python.

Each command lives in ``moec.compiler.commands.<module>`` and only parses options, fills the
stage's config dataclass, calls the stage function and prints. Errors a user can cause arrive as
``MoecError`` and become one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import click

from moec.common.errors import MoecError
from moec.common.resources import as_resource_error

# (module, command attribute names). Commands are imported when the CLI starts; each module
# imports its heavy dependencies (torch, onnxruntime, tensorrt) inside the command body so
# `moec --help` stays fast and works without optional backends.
COMMAND_MODULES: list[tuple[str, tuple[str, ...]]] = [
    ("moec.compiler.commands.checkpoint", ("demo_checkpoint",)),
    ("moec.compiler.commands.run", ("run",)),
    ("moec.compiler.commands.export", ("export",)),
    ("moec.compiler.commands.verify", ("verify",)),
    ("moec.compiler.commands.optimize", ("optimize",)),
    ("moec.compiler.commands.build", ("build",)),
    ("moec.compiler.commands.inspect", ("inspect",)),
    ("moec.compiler.commands.bench", ("bench",)),
    ("moec.compiler.commands.gate", ("gate",)),
    ("moec.compiler.commands.compile", ("compile_",)),
    ("moec.compiler.commands.plan", ("plan",)),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moec")
def cli() -> None:
    """moec: compile Mixture-of-Experts transformers (Llama 4) into TensorRT engines."""


def _register() -> None:
    for module_name, attrs in COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for attr in attrs:
            cli.add_command(getattr(module, attr))


_register()


class _NoteHandler(logging.Handler):
    """Warnings of the ``moec`` loggers as one ``note:`` line each on stderr, each text once per
    command (verify and compile load the same checkpoint more than once). ``click.echo`` looks up
    stderr at each call, so a redirected stderr is honoured."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text not in self.seen:
            self.seen.add(text)
            click.echo(f"note: {text}", err=True)


def _show_notes() -> None:
    logger = logging.getLogger("moec")
    for h in logger.handlers:
        if isinstance(h, _NoteHandler):
            h.seen.clear()  # a new command (main() runs more than once in tests)
            return
    logger.addHandler(_NoteHandler())
    logger.propagate = False  # the CLI owns the process's stderr; no second copy via root


def main(argv: list[str] | None = None) -> None:
    _show_notes()
    try:
        cli.main(args=argv, standalone_mode=False)
    except MoecError as e:
        click.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        # Out of memory or disk is the machine's limit, not a bug: one line naming the command.
        err = as_resource_error(e, f"moec {_command_name(argv)}")
        if err is None:
            raise
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)


def _command_name(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return next((a for a in args if not a.startswith("-")), "").strip() or "(no command)"


if __name__ == "__main__":
    main()
