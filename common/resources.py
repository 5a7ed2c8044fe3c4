"""Running out of memory or disk is the environment's problem, not a bug: one named line, exit 2.

torch, numpy, onnx and TensorRT each say "out of memory" their own way (MemoryError, numpy's
_ArrayMemoryError, torch's RuntimeError from its CPU allocator, "integer multiplication overflow"
for a size no machine can allocate), and a full disk arrives as an OSError from whichever library
was writing. ``as_resource_error`` recognises them; the CLI and the stage drivers (compile's
stages, optimize's passes) turn them into a MoecError naming the step, instead of a traceback.

Standard library only.
"""

from __future__ import annotations

import errno

from moec.common.errors import MoecError

_NO_ROOM = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EFBIG: "a file would exceed the file system's limit"}
# What torch's and numpy's allocators put in the RuntimeError / ValueError they raise instead of
# MemoryError (torch 2.x CPU allocator, c10 size checks; numpy's "array is too big").
_ALLOC_TEXT = ("can't allocate memory", "not enough memory", "out of memory", "defaultcpuallocator",
               "integer multiplication overflow", "array is too big", "maximum allowed size exceeded",
               "maximum allowed dimension exceeded")


def as_resource_error(e: BaseException, step: str | None) -> MoecError | None:
    """A MoecError naming ``step`` when ``e`` is an allocation failure or a full disk, else None
    (``step`` None: the caller prefixes the step itself)."""
    if isinstance(e, MoecError):
        return None
    lead = f"{step}: " if step else ""
    if isinstance(e, OSError) and e.errno in _NO_ROOM:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return MoecError(f"{lead}cannot write{where}: {_NO_ROOM[e.errno]}; free space or choose another location, "
                         "then run it again")
    text = str(e).lower()
    if isinstance(e, MemoryError) or (isinstance(e, (RuntimeError, ValueError, OverflowError))
                                      and any(t in text for t in _ALLOC_TEXT)):
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return MoecError(f"{lead}out of memory ({detail}); the model or the sizes asked for do not fit this "
                         "machine: use a smaller model, batch or sequence length, or a host with more memory")
    return None
