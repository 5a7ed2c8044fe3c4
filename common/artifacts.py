"""Write artifacts so that a reader never sees a partial file.

Every artifact is written to a temporary name in the destination folder and renamed into place
(``os.replace`` is atomic on one filesystem). If the writer raises, or the user presses Ctrl-C,
the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from moec.common.errors import MoecError


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _no_room_to_write(dest: Path, e: OSError) -> MoecError:
    return MoecError(f"cannot write {dest}: {e.strerror or e}; choose a writable location")


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it to ``dest``.

    The temporary name keeps ``dest``'s suffix (some writers pick a format from it). A destination
    that is a folder, or a location that cannot be written, is a MoecError before any work.
    """
    dest = Path(dest)
    if dest.is_dir():
        raise MoecError(f"{dest} is a folder; give a file name")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix + ".tmp", dir=dest.parent)
    except OSError as e:
        raise _no_room_to_write(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file owner-only (0600); an artifact gets the permissions of a plain open(),
    # so a serving process running as another user can read it.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def check_output_dir(dest: str | os.PathLike, *, replaces: str | None = None,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder whose replacement would destroy something of the user's.

    ``dest`` may be absent, an empty folder, or a folder holding ``replaces`` (a file only an
    earlier output of the same kind has, such as an engine folder's manifest.json). Any other
    folder, a file, or a folder that holds or is one of ``inputs`` is a MoecError.
    """
    dest = Path(dest)
    resolved = dest.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if inp == resolved or resolved in inp.parents:
            raise MoecError(f"output folder {dest} holds the input {inp}; choose another output folder")
    if not dest.exists():
        return dest
    if not dest.is_dir():
        raise MoecError(f"{dest} is a file; give a folder for the output")
    if replaces is not None and (dest / replaces).is_file():
        return dest
    if any(dest.iterdir()):
        kind = f"an earlier output (it has no {replaces})" if replaces else "empty"
        raise MoecError(f"output folder {dest} exists and is not {kind}; moec replaces an output folder as a whole, "
                        f"so choose a new or empty folder")
    return dest


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, replaces: str | None = None,
               inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``.

    ``dest`` is checked first (``check_output_dir``): only an empty folder or an earlier output
    holding ``replaces`` is ever replaced, and only after the new folder is complete.
    """
    dest = check_output_dir(dest, replaces=replaces, inputs=inputs)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        raise _no_room_to_write(dest, e) from e
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is owner-only (0700); see atomic_path
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(dest: str | os.PathLike, obj) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks so a multi-GB weight file is never held in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
