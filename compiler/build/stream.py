"""Build without second copies of the weights in host memory.

- Parsing: ``OnnxParser.parse_from_file`` reads every external weight into the parser's own
  buffers. Instead the graph (no weights) goes in through ``load_model_proto``, and each external
  initializer through ``load_initializer`` as a pointer into ONE read-only memory map of the
  ``.data`` file: the weights' bytes are the file's pages, which the kernel can drop and re-read.
  The map must outlive the parser and the build, so the caller keeps the returned ``MappedWeights``.
- Paging: TensorRT-RTX copies the weights it reads into its own (anonymous) memory during the
  build, and every page of the map it read stays mapped, so counted in the process's RSS, until
  the map is closed: 1x the weights on top of the builder's copies. ``MappedWeights`` drops its
  pages from the process every ``PAGE_RELEASE_S`` (``madvise(MADV_DONTNEED)``; the data stays in
  the page cache, a read faults it back unchanged: a read-only shared file map has no private
  pages to lose), so a page is resident only while TensorRT-RTX is reading it.
- Serialising: ``build_serialized_network`` returns the whole plan as one host buffer (and moec
  made ``bytes`` of it: two copies). ``build_serialized_network_to_stream`` hands the plan to an
  ``IStreamWriter`` piece by piece; ``PlanFile`` writes the pieces to the file and hashes them as
  they pass.
"""

from __future__ import annotations

import hashlib
import mmap
import threading
import weakref
from pathlib import Path

from moec.common.errors import MoecError

PAGE_RELEASE_S = 0.1


class MappedWeights:
    """A read-only map of one external-data file, and the initializers loaded from it."""

    def __init__(self, data_path: Path):
        self.path = data_path
        self._file = open(data_path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self.loaded = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The thread holds the map only weakly: dropping the last MappedWeights (the build is
        # done) stops it, as close() does.
        self._pager = threading.Thread(target=_release_pages_until_stopped, args=(weakref.ref(self), self._stop),
                                       name="moec-weight-pager", daemon=True)
        weakref.finalize(self, self._stop.set)
        self._pager.start()

    def release_pages(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache)."""
        with self._lock:
            if not self._map.closed:
                self._map.madvise(mmap.MADV_DONTNEED)

    def address(self, offset: int) -> int:
        """The address of byte ``offset`` of the map (numpy wraps a read-only buffer without copying
        and reports its pointer; ctypes would need a writable one)."""
        import numpy as np

        return np.frombuffer(self._map, dtype=np.uint8, count=1, offset=offset).ctypes.data

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._map.close()
        self._file.close()


def _release_pages_until_stopped(ref, stop: threading.Event) -> None:
    while not stop.wait(PAGE_RELEASE_S):
        weights = ref()
        if weights is None:
            return
        weights.release_pages()
        del weights


def load_external_initializers(parser, model, onnx_path: Path) -> MappedWeights | None:
    """``load_initializer`` for every initializer of ``model`` (a ModelProto read without its
    external data) that lives in the one external-data file beside ``onnx_path``."""
    import onnx

    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return None
    files = {next(e.value for e in t.external_data if e.key == "location") for t in external}
    if len(files) != 1:
        raise MoecError(f"{onnx_path}: weights in {len(files)} external files; moec writes one (re-run moec optimize)")
    weights = MappedWeights(onnx_path.parent / files.pop())
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if not parser.load_initializer(t.name, weights.address(offset), length):
            weights.close()
            raise MoecError(f"{onnx_path}: TensorRT refused initializer {t.name!r} ({length} bytes at {offset}) "
                            f"from {weights.path.name}: re-run moec optimize")
        weights.loaded += 1
    return weights


def make_plan_writer(trt, path: Path):
    """An IStreamWriter that writes the plan to ``path`` and hashes it on the way."""

    class PlanFile(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)
            self.file = open(path, "wb")
            self.sha256 = hashlib.sha256()
            self.bytes = 0

        def write(self, data) -> int:
            self.file.write(data)
            self.sha256.update(data)
            self.bytes += len(data)
            return len(data)

        def close(self) -> None:
            self.file.close()

    return PlanFile()
