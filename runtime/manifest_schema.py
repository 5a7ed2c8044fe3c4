"""The shape of an engine folder's manifest.json, checked once when it is read.

``moec inspect``, ``moec run`` and ``moec bench`` index into the manifest in many places; a
hand-edited or damaged file (not an object, a missing key, a string where a list belongs) would
otherwise end in a KeyError or TypeError deep inside one of them. Every path the manifest names
(engine files, sidecar, tokenizer) must be a plain file name inside the engine folder
(``moec.common.confine``), so a manifest cannot make moec read or hash a file elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moec.common.confine import plain_file_name
from moec.common.errors import MoecError

_FIX = "rebuild the engine directory with `moec build`"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ints(v) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _strs(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, want: str, got) -> None:
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise MoecError(f"{self.path}: {where} must be {want}, got {shown}; {_FIX}")

    def obj(self, d, key: str, where: str = "") -> dict:
        here = f"{where}{key}"
        if key not in d:
            raise MoecError(f"{self.path} lacks {here}; {_FIX}")
        if not isinstance(d[key], dict):
            self.fail(here, "an object", d[key])
        return d[key]

    def field(self, d, key: str, ok, want: str, where: str = ""):
        here = f"{where}{key}"
        if key not in d:
            raise MoecError(f"{self.path} lacks {here}; {_FIX}")
        if not ok(d[key]):
            self.fail(here, want, d[key])
        return d[key]


def validate_manifest(manifest: Any, path: Path) -> dict[str, Any]:
    """``manifest`` (parsed from ``path``) if every field the readers use has its type, and every
    file it names lies in the engine folder; MoecError naming the field otherwise."""
    c = _Checker(path)
    folder = path.parent
    if not isinstance(manifest, dict):
        raise MoecError(f"{path} is not a JSON object; {_FIX}")
    trt = c.obj(manifest, "trt")
    for key in ("flavour", "version"):
        c.field(trt, key, lambda v: isinstance(v, str), "a string", "trt.")
    c.field(manifest, "archs", _strs, "a list of arch names")
    engines = c.field(manifest, "engines", lambda v: isinstance(v, list), "a list")
    if not engines:
        raise MoecError(f"{path} lists no engine: not a usable engine directory; {_FIX}")
    for i, e in enumerate(engines):
        where = f"engines[{i}]."
        if not isinstance(e, dict):
            c.fail(f"engines[{i}]", "an object", e)
        name = c.field(e, "file", lambda v: isinstance(v, str), "a file name", where)
        plain_file_name(folder, name, f"{path} engines[{i}].file", _FIX)
        c.field(e, "archs", lambda v: _strs(v) and bool(v), "a non-empty list of arch names", where)
        c.field(e, "sha256", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest", where)
        c.field(e, "bytes", lambda v: _is_int(v) and v > 0, "a positive byte count", where)
    profiles = c.field(manifest, "profiles", lambda v: isinstance(v, list) and bool(v), "a non-empty list")
    for i, p in enumerate(profiles):
        where = f"profiles[{i}]."
        if not isinstance(p, dict):
            c.fail(f"profiles[{i}]", "an object", p)
        c.field(p, "name", lambda v: isinstance(v, str), "a string", where)
        c.field(p, "index", lambda v: _is_int(v) and v >= 0, "a profile index", where)
        shapes = c.obj(p, "shapes", where)
        for tensor, r in shapes.items():
            if not isinstance(r, dict):
                c.fail(f"{where}shapes.{tensor}", "an object with min, opt and max", r)
            for k in ("min", "opt", "max"):
                c.field(r, k, _ints, "a list of integers", f"{where}shapes.{tensor}.")
        if "input_ids" not in shapes or len(shapes["input_ids"]["max"]) != 2:
            raise MoecError(f"{path}: {where}shapes has no [batch, new_tokens] range for input_ids; {_FIX}")
    limits = c.obj(manifest, "limits")
    for key in ("max_batch", "max_new_tokens", "max_past", "max_positions"):
        c.field(limits, key, lambda v: _is_int(v) and v >= 1, "a positive integer", "limits.")
    io = c.obj(manifest, "io")
    for side in ("inputs", "outputs"):
        tensors = c.field(io, side, lambda v: isinstance(v, list), "a list", "io.")
        for i, t in enumerate(tensors):
            if not isinstance(t, dict):
                c.fail(f"io.{side}[{i}]", "an object", t)
            c.field(t, "name", lambda v: isinstance(v, str), "a string", f"io.{side}[{i}].")
            c.field(t, "shape", _ints, "a list of integers", f"io.{side}[{i}].")
    for key in ("plugins",):
        plugins = manifest.get(key, [])
        if not isinstance(plugins, list) or not all(
                isinstance(p, dict) and all(isinstance(p.get(k), str) for k in ("name", "version", "namespace"))
                for p in plugins):
            c.fail(key, "a list of {name, version, namespace} objects", plugins)
    if not isinstance(manifest.get("build_options", {}), dict):
        c.fail("build_options", "an object", manifest["build_options"])
    # What `moec inspect` prints.
    for key in ("precision", "moec_version", "built_at"):
        c.field(manifest, key, lambda v: isinstance(v, str), "a string")
    c.field(manifest, "build_seconds", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
    layers = c.obj(manifest, "network_layers")
    c.field(layers, "count", _is_int, "an integer", "network_layers.")
    c.field(layers, "by_type", lambda v: isinstance(v, dict), "an object", "network_layers.")
    source = c.obj(manifest, "source_onnx")
    for key in ("file", "sha256"):
        c.field(source, key, lambda v: isinstance(v, str), "a string", "source_onnx.")
    sidecar = manifest.get("sidecar")
    if sidecar:
        plain_file_name(folder, sidecar, f"{path} sidecar", _FIX)
    tokenizer = manifest.get("tokenizer")
    if tokenizer is not None:
        plain_file_name(folder, tokenizer, f"{path} tokenizer", _FIX)
    return manifest
