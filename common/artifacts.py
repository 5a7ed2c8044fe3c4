"""Write artifacts so that a reader never sees a partial file.

Every artifact is written to a temporary name in the destination folder and renamed into place
(``os.replace`` is atomic on one filesystem). If the writer raises, or the user presses Ctrl-C,
the temporary file is removed and the destination is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from moec.common.errors import MoecError

log = logging.getLogger("moec.artifacts")


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Write failures that are the environment's, not moec's: a full disk or quota, a read-only file
# system, a file over the file system's size limit. They become one line naming the file.
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def _no_room_to_write(dest: Path, e: OSError) -> MoecError:
    return MoecError(f"cannot write {dest}: {e.strerror or e}; choose a writable location")


def is_no_room(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_ROOM_ERRNOS


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success rename it to ``dest``.

    The temporary name keeps ``dest``'s suffix (some writers pick a format from it). A destination
    that is a folder or a symbolic link, or a location that cannot be written, is a MoecError before
    any work; a disk that fills up while writing is a MoecError naming ``dest``, and leaves neither
    the temporary file nor folders this call made.
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise MoecError(f"{dest} is a symbolic link; moec would replace the link, not write through it: "
                        f"give the real path ({dest.resolve()}) or a new name")
    if dest.is_dir():
        raise MoecError(f"{dest} is a folder; give a file name")
    made: list[Path] = []
    try:
        made = make_parents(dest)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix + ".tmp", dir=dest.parent)
    except OSError as e:
        remove_made(made)
        raise _no_room_to_write(dest, e) from e
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes the file owner-only (0600); an artifact gets the permissions of a plain open(),
    # so a serving process running as another user can read it.
    os.chmod(tmp_path, 0o666 & ~_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        remove_made(made)
        if is_no_room(e):
            raise _no_room_to_write(dest, e) from None
        raise


# Written by moec into every output folder it makes (build, compile, demo-checkpoint, dump folders):
# the only proof that a folder is an earlier output of the same command and may be replaced. A
# common file name inside (manifest.json, compile_report.json) proves nothing: a user's folder can
# hold one. The temporary folder carries it from the start, with the writer's pid and host, so a
# later run can tell a leftover of a killed run from a folder another run is still writing.
OUTPUT_MARKER = ".moec-output.json"


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker moec wrote into ``folder``, or None (no marker, unreadable, not moec's)."""
    marker = Path(folder) / OUTPUT_MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "moec" and isinstance(data.get("command"), str) else None


def write_marker(folder: str | os.PathLike, command: str) -> None:
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps(
        {"written_by": "moec", "command": command, "pid": os.getpid(), "host": socket.gethostname()}) + "\n")


def is_output_of(folder: str | os.PathLike, command: str) -> bool:
    folder = Path(folder)
    marker = read_marker(folder) if folder.is_dir() and not folder.is_symlink() else None
    return marker is not None and marker["command"] == command


def _writer_alive(marker: dict) -> bool:
    if marker.get("host") != socket.gethostname() or not isinstance(marker.get("pid"), int):
        return True  # cannot tell from here: assume another run still writes it
    try:
        os.kill(marker["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _old_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def check_output_dir(dest: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder whose replacement would destroy something of the user's.

    ``dest`` may be absent, an empty folder, or an earlier output of ``command`` (it holds the marker
    moec writes, naming the command). Any other folder, a file, a symbolic link, or a folder that
    holds or is one of ``inputs`` is a MoecError. The ``.NAME.old`` sibling the replace step uses
    must be absent or moec's own.
    """
    dest = Path(dest)
    if dest.is_symlink():
        raise MoecError(f"output folder {dest} is a symbolic link; moec replaces an output folder as a whole and "
                        f"would replace the link: give the real folder ({dest.resolve()}) or a new one")
    resolved = dest.resolve()
    for inp in inputs:
        inp = Path(inp).resolve()
        if inp == resolved or resolved in inp.parents:
            raise MoecError(f"output folder {dest} holds the input {inp}; choose another output folder")
    old = _old_name(dest)
    if old.is_symlink() or (old.exists() and not is_output_of(old, command)):
        raise MoecError(f"{old} exists and is not an earlier `moec {command}` output (moec uses that name while it "
                        f"replaces {dest}); move it away or choose another output folder")
    if not dest.exists():
        return dest
    if not dest.is_dir():
        raise MoecError(f"{dest} is a file; give a folder for the output")
    if is_output_of(dest, command):
        return dest
    if any(dest.iterdir()):
        marker = read_marker(dest)
        what = (f"an output of `moec {marker['command']}`, not of `moec {command}`" if marker else
                f"not empty and not an earlier output of `moec {command}` (it has no {OUTPUT_MARKER})")
        raise MoecError(f"output folder {dest} is {what}; moec replaces an output folder as a whole, "
                        f"so choose a new or empty folder")
    return dest


def _recover(dest: Path, command: str) -> None:
    """Finish what a run killed around its renames left behind: a ``.NAME.old`` with no ``NAME``
    (killed between the two renames) is the previous output and is put back; one beside a
    ``NAME`` was already replaced and is removed. Temporary folders of runs that are gone are
    removed; any other leftover is reported."""
    old = _old_name(dest)
    if is_output_of(old, command):
        if not dest.exists() and not dest.is_symlink():
            os.replace(old, dest)
            log.warning("%s: restored the previous output from %s (an earlier run was interrupted while "
                        "replacing it)", dest, old.name)
        else:
            shutil.rmtree(old)
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        if tmp.is_symlink() or not tmp.is_dir():
            continue
        marker = read_marker(tmp)
        if marker is not None and marker["command"] == command and not _writer_alive(marker):
            shutil.rmtree(tmp, ignore_errors=True)
        elif marker is None:
            log.warning("%s: leftover folder %s (not written by this moec); remove it if no moec run is using it",
                        dest.parent, tmp.name)


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return them, outermost first, so a failed
    command can remove exactly what it made (and leaves no empty output folder behind)."""
    missing = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    made: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            made.append(p)
    except OSError:
        remove_made(made)  # a full disk or a race half-way down: leave no empty folder either
        raise
    return made


@contextlib.contextmanager
def parents_made_for(path: str | os.PathLike) -> Iterator[None]:
    """Create the folders missing above ``path``; remove them again (if still empty) when the
    body fails, so a failed command leaves no empty output folder behind."""
    made = make_parents(Path(path))
    try:
        yield
    except BaseException:
        remove_made(made)
        raise


def remove_made(made: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            p.rmdir()  # only if still empty


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, *, command: str, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``.

    ``dest`` is checked first (``check_output_dir``): only an empty folder or an earlier output of
    ``command`` is ever replaced, and only after the new folder is complete. The new folder carries
    the marker naming ``command``. A run killed between the renames is recovered by the next one.
    """
    dest = Path(dest)
    check_output_dir(dest, command=command, inputs=inputs)
    made: list[Path] = []
    tmp = None
    try:
        made = make_parents(dest)
        _recover(dest, command)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is owner-only (0700); see atomic_path
        write_marker(tmp, command)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise _no_room_to_write(dest, e) from None
    try:
        yield tmp
        check_output_dir(dest, command=command, inputs=inputs)  # what may have appeared meanwhile
        if dest.exists():
            old = _old_name(dest)
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # the previous output stays where it was
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        if is_no_room(e):
            raise _no_room_to_write(dest, e) from None
        raise


@contextlib.contextmanager
def atomic_file_set(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest`` for a file and the files that travel with it (a
    graph, its ``.data``, its sidecar, a tokenizer), each written there under its final name. When
    the body succeeds they are renamed beside ``dest``, ``dest`` itself last: until then an earlier
    set stays the readable one. When it fails nothing is renamed, and the temporary folder and any
    folder made above ``dest`` are removed: a failed command leaves no partial set and no empty
    output folder. A full disk is a MoecError naming ``dest``."""
    dest = Path(dest)
    made: list[Path] = []
    try:
        made = make_parents(dest)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as e:
        remove_made(made)
        raise _no_room_to_write(dest, e) from None
    try:
        yield tmp
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == dest.name):
            os.replace(f, dest.parent / f.name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        if is_no_room(e):
            raise _no_room_to_write(dest, e) from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


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
