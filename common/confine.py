"""Files an artifact names must lie inside the artifact's own folder.

An ONNX graph names its external-data files, a manifest names its engines, sidecar and tokenizer,
and a model folder holds its sidecar and tokenizer. A name that is absolute, climbs out with
``..``, or is (or passes through) a symbolic link that resolves outside the folder would make
moec read, hash, copy or embed an arbitrary file of the host (the class of CVE-2022-25882 and
CVE-2024-27318 in onnx's external-data loader). Every reader asks here first, so the rule and its
message are the same everywhere.

A hard link has no target to resolve: its other names may lie anywhere on the same file system,
and no path says where. A regular file with more than one name (``st_nlink > 1``) is therefore
refused as well; a copy of the file is always accepted. moec itself never writes hard links.

Standard library only: the runtime shares it with hosts that have no torch or onnx.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath

from moec.common.errors import MoecError


def _is_plain_relative(name: str) -> bool:
    # Both spellings of absolute (a graph written on Windows may say C:\x or \\host\x) and any ".."
    # component are refused before the file system is asked anything.
    if not name or "\x00" in name:
        return False
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or name.startswith(("/", "\\")):
        return False
    return ".." not in posix.parts and ".." not in windows.parts


def _resolves_inside(folder: Path, path: Path) -> bool:
    root = folder.resolve()
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a symlink loop resolves nowhere
        return False


def confined_path(folder: str | os.PathLike, name: str, what: str, fix: str) -> Path:
    """``folder / name`` after checking that ``name`` is relative, has no ``..`` and resolves
    (symbolic links followed) inside ``folder``; MoecError naming ``what`` and ``fix`` otherwise.
    The file need not exist: its absence is the caller's message."""
    folder = Path(folder)
    if not isinstance(name, str) or not _is_plain_relative(name):
        raise MoecError(f"{what} names {name!r}, which is not a relative path inside {folder}: moec reads only "
                        f"files inside the artifact's folder; {fix}")
    path = folder / name
    if not _resolves_inside(folder, path):
        raise MoecError(f"{what} names {name!r}, which resolves to {path.resolve()} outside {folder} (a symbolic "
                        f"link?): moec reads only files inside the artifact's folder; {fix}")
    _refuse_hard_link(path, what, name, folder)
    return path


def _refuse_hard_link(path: Path, what: str, name: str, folder: Path) -> None:
    try:
        st = path.stat()
    except OSError:
        return  # absent or unreadable: the caller's message
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
        raise MoecError(f"{what} names {name!r}, which is a hard link ({st.st_nlink} names for one file): its other "
                        f"names may lie outside {folder}, and moec reads only files inside the artifact's folder; "
                        f"replace it with a copy (cp {path} {path}.copy && mv {path}.copy {path})")


def plain_file_name(folder: str | os.PathLike, name, what: str, fix: str) -> Path:
    """``folder / name`` where ``name`` must be a bare file name (no folder part at all), as every
    path in an engine manifest is; otherwise as ``confined_path``."""
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise MoecError(f"{what} names {name!r}, which is not a plain file name in {folder}; {fix}")
    return confined_path(folder, name, what, fix)


def side_file(path: str | os.PathLike, what: str, fix: str) -> Path:
    """A file that travels beside an artifact (sidecar, tokenizer.json, timing cache): it must
    resolve inside its own folder, so a symbolic link to an arbitrary file is not read or copied."""
    path = Path(path)
    return confined_path(path.parent, path.name, what, fix)
