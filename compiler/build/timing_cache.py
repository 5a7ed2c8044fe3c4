"""The builder's timing cache: loaded when it fits this builder, kept when it does not, saved atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

from moec.common.artifacts import atomic_path
from moec.common.errors import MoecError
from moec.runtime.trt_backend import (
    TrtFlavour,
)


# --- Timing cache ------------------------------------------------------------------------------------
def load_timing_cache(flavour: TrtFlavour, builder, path: Path | None, logger, notes: list[str]):
    """The timing cache to build with: ``path``'s if it loads, a fresh one if missing (created after
    the build) or corrupt (rebuilt, with a warning)."""
    if path is None:
        return None
    trt = flavour.trt
    cfg = builder.create_builder_config()
    data = b""
    if path.is_file():
        data = path.read_bytes()
    else:
        notes.append(f"timing cache {path} does not exist: it will be created")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mark = logger.mark()
        cache = cfg.create_timing_cache(data)
        # TensorRT answers unreadable bytes with an empty cache and a warning, not an error.
        messages = logger.since(mark, trt.ILogger.Severity.WARNING)
    no_gpu = any("cudaError 35" in m for m in messages)
    trouble = [m for m in messages if "cudaError 35" not in m]
    if data and not _timing_cache_header_ok(data) and (no_gpu or cache is None or trouble):
        # Not a cache from another TensorRT (that one is rebuilt below): some other file, which
        # the build would replace with a cache. Refused, never overwritten.
        raise MoecError(f"--timing-cache {path} is not a TensorRT timing cache (TensorRT cannot load it and it "
                        "lacks a timing cache's header); moec does not overwrite it: give a new file name or "
                        "an existing timing cache")
    if data and no_gpu:
        # Without a GPU, TensorRT-RTX cannot load any timing cache, even its own, so it cannot tell
        # a good file from a bad one; fall back to the header it writes (see _timing_cache_header_ok).
        ok = _timing_cache_header_ok(data)
        trouble = [] if ok else ["its header is not a TensorRT timing cache header"]
        if ok:
            # Keep the user's bytes: TensorRT-RTX ignores the cache, and a later GPU build can use them.
            cache = _KeptTimingCache(data)
    if data and (cache is None or trouble):
        notes.append(f"timing cache {path} is corrupt or from another TensorRT ({'; '.join(trouble) or 'unreadable'}): rebuilding it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cache = cfg.create_timing_cache(b"")
    if flavour.is_rtx:
        notes.append("TensorRT-RTX treats timing caches as no-ops (since 1.2): the file is kept valid for full TensorRT builds")
    return cache


def _timing_cache_header_ok(data: bytes) -> bool:
    """Observed layout of a TensorRT(-RTX 1.7) timing cache: magic b"ptrt", a u32 format number,
    a u64 payload size equal to the file size minus 20. Hand-checked only where TensorRT itself
    cannot load caches (TensorRT-RTX on a host without a GPU)."""
    return len(data) >= 20 and data[:4] == b"ptrt" and int.from_bytes(data[8:16], "little") == len(data) - 20


class _KeptTimingCache:
    """A timing cache TensorRT could not load here, kept byte for byte (see load_timing_cache)."""

    def __init__(self, data: bytes):
        self.data = data

    def serialize(self) -> bytes:
        return self.data


def save_timing_cache(cache, path: Path | None) -> None:
    if cache is None or path is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        data = bytes(cache.serialize())
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
