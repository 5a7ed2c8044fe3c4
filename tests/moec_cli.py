"""Run the real ``moec`` entry point in-process, as a user's shell would (shared by the CLI tests)."""

from __future__ import annotations

from moec.compiler.cli import main


def run_cli(args, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``moec ARGS``; ``capsys`` is pytest's fixture."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
