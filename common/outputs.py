"""Files that a command's options write (``--report``, ``--json``, ``--junit``, ``--timing-cache``,
``--dump-dir``): never one of the command's inputs, never a file of another kind.

A typo such as ``--report model.moec.json`` or ``--junit baseline.json`` must not destroy what the
user gave moec to read, and ``--json notes.txt`` must not replace a file moec did not write. An
existing file is overwritten only when it is what the option writes (an earlier report, result,
JUnit file); checked before any work, so a refused command costs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

from moec.common.artifacts import OUTPUT_MARKER, is_output_of, write_marker
from moec.common.errors import MoecError


def same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` name one file: the same resolved path, or hard links to one inode."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_option_output(path: str | os.PathLike, option: str, *, kind: str, is_kind: Callable[[Path], bool],
                        inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``path`` may be written by ``option``: not a symbolic link, not one of ``inputs``, and either
    absent, empty, or already a file of ``kind`` (``is_kind`` says). MoecError otherwise."""
    path = Path(path)
    if path.is_symlink():
        raise MoecError(f"{option} {path} is a symbolic link; give the real path ({path.resolve()}) or a new name")
    for inp in inputs:
        inp = Path(inp)
        if same_file(path, inp):
            raise MoecError(f"{option} {path} is {inp}, an input of this command; write the {kind} to another file")
    if path.is_dir():
        raise MoecError(f"{option} {path} is a folder; give a file name")
    if path.is_file() and path.stat().st_size > 0 and not is_kind(path):
        raise MoecError(f"{option} {path} exists and is not a {kind}; moec overwrites only its own {kind}s: "
                        f"choose another name or move the file away")
    return path


def _head(path: Path, n: int = 1 << 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def json_object_with(*keys: str, format_prefix: str | None = None) -> Callable[[Path], bool]:
    """A kind test: a JSON object holding ``keys`` (and a "format" starting with ``format_prefix``)."""

    def test(path: Path) -> bool:
        try:
            d = json.loads(path.read_bytes())
        except (OSError, ValueError, RecursionError):
            return False
        if not isinstance(d, dict) or not all(k in d for k in keys):
            return False
        return format_prefix is None or str(d.get("format", "")).startswith(format_prefix)

    return test


def is_moec_junit(path: Path) -> bool:
    """What ``moec gate --junit`` writes: <testsuites name="moec"> holding a moec.gate suite."""
    head = _head(path)
    return b'<testsuites name="moec"' in head and b'name="moec.gate"' in head


def check_output_folder_option(path: str | os.PathLike, option: str, command: str,
                               inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """A folder an option fills file by file (``--dump-dir``): absent, empty, or an earlier one of
    the same option (its moec marker). Never one that holds an input."""
    path = Path(path)
    if path.is_symlink():
        raise MoecError(f"{option} {path} is a symbolic link; give the real folder ({path.resolve()}) or a new one")
    resolved = path.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if inp == resolved or resolved in inp.parents:
            raise MoecError(f"{option} {path} holds the input {inp}; choose another folder")
    if path.exists():
        if not path.is_dir():
            raise MoecError(f"{option} {path} is a file; give a folder")
        if any(path.iterdir()) and not is_output_of(path, command):
            raise MoecError(f"{option} {path} is not empty and not an earlier {option} folder (it has no "
                            f"{OUTPUT_MARKER}); moec writes its files only into a new, empty or earlier such folder")
    return path


def mark_output_folder(path: str | os.PathLike, command: str) -> None:
    """Create ``path`` (checked by ``check_output_folder_option``) and mark it as ``command``'s."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_marker(path, command)
