"""One reader for moec's own JSON manifests (manifest.json, chain.json, parallel.json, the sidecar).

Each of them is read the same way: name a missing file, name unreadable or malformed JSON, check
that the top level is an object of the expected ``format``, and turn a missing key or a wrong type
met while reading the fields into one named line. Only the messages differ (what the file is and
what rebuilds it), so the caller passes those; the steps live here once.

The messages keep one wording for each step ("is not valid JSON", "cannot read", "lacks or mistypes
a field") so a user who met one of them recognises the others.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from moec.common.errors import BAD_JSON, MoecError

# What reading a field of a hand-edited manifest raises (a key that is missing, a string where a
# list was expected, a list too short, a structure nested too deep to walk).
FIELD_ERRORS: tuple[type[BaseException], ...] = (KeyError, TypeError, ValueError, AttributeError, IndexError,
                                                 RecursionError)


def read_manifest_json(path: str | os.PathLike, *, fix: str, missing: str | None = None,
                       format: str | None = None, not_this: str | None = None) -> dict:
    """The JSON object in ``path``.

    ``fix``: what to do, appended to every message (e.g. "rebuild with `moec build`").
    ``missing``: the whole message for a missing file (default: "<path> is missing; <fix>").
    ``format``: the value the top-level ``format`` field must have (None: not checked).
    ``not_this``: the whole message for an object of another format (default names both formats).
    """
    path = Path(path)
    if not path.is_file():
        raise MoecError(missing or f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise MoecError(f"cannot read {path}: {e.strerror or e}; {fix}") from None
    except BAD_JSON as e:  # not UTF-8 is a UnicodeDecodeError from read_text: a ValueError too
        raise MoecError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    if not isinstance(data, dict):
        raise MoecError(not_this or f"{path} is not a JSON object; {fix}")
    if format is not None and data.get("format") != format:
        raise MoecError(not_this or f"{path} has format {data.get('format')!r}, expected {format!r}; {fix}")
    return data


@contextlib.contextmanager
def fields_named(path: str | os.PathLike, fix: str, what: str = "") -> Iterator[None]:
    """Inside the block, a missing key or a wrong type is one named line about ``path`` (``what``:
    an extra phrase after the path, e.g. " (or a rank's manifest it lists)")."""
    try:
        yield
    except FIELD_ERRORS as e:
        raise MoecError(f"{path}{what} lacks or mistypes a field ({type(e).__name__}: {str(e)[:200]}); {fix}") from None
