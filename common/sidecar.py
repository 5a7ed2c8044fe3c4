"""Read the sidecar (``<model>.moec.json``) that travels with every moec ONNX graph and engine.

Export writes it (``moec.compiler.export.build_sidecar``); the passes, the build stage and every
runtime backend read it here, so a hand-edited or damaged file is refused the same way
everywhere, with the file and the field named, instead of failing somewhere deeper.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec.common import contract
from moec.common.confine import side_file
from moec.common.errors import MoecError
from moec.common.manifest_json import read_manifest_json
from moec.common.kv_cache import validate_kv_cache

# Fields every reader needs, and fields checked when present (an export always writes them; graphs
# that tests or other tools build may leave them out). bool is not an int here: JSON true is not 1.
_REQUIRED_POSITIVE_INTS = ("num_layers", "max_positions", "vocab_size", "max_batch")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate_sidecar(meta, source: str | os.PathLike) -> dict:
    """Check the fields every reader relies on; return ``meta``. ``source`` names the file."""
    redo = "re-export the model with `moec export`"
    if not isinstance(meta, dict):
        raise MoecError(f"the moec metadata {source} is not a JSON object; {redo}")
    missing = [k for k in (*_REQUIRED_POSITIVE_INTS, "model_config", "generation") if k not in meta]
    if missing:
        raise MoecError(f"the moec metadata {source} lacks {', '.join(missing)}; {redo}")
    for key in (*_REQUIRED_POSITIVE_INTS, *_OPTIONAL_POSITIVE_INTS):
        if key not in meta:
            continue
        if not _is_int(meta[key]) or meta[key] < 1:
            raise MoecError(f"the moec metadata {source}: {key} must be a positive integer, got {meta[key]!r}; {redo}")
    if not isinstance(meta.get("model_config"), dict):
        raise MoecError(f"the moec metadata {source} lacks model_config (the model's configuration); {redo}")
    moe_layers = meta.get("moe_layers", [])
    if not isinstance(moe_layers, list) or not all(_is_int(i) and 0 <= i < meta["num_layers"] for i in moe_layers):
        raise MoecError(f"the moec metadata {source}: moe_layers must list layer indices below num_layers "
                        f"({meta['num_layers']}), got {moe_layers!r}; {redo}")
    gen = meta.get("generation")
    if not isinstance(gen, dict):
        raise MoecError(f"the moec metadata {source} lacks generation settings; {redo}")
    eos = gen.get("eos_token_ids", [])
    if not isinstance(eos, list) or not all(_is_int(t) and 0 <= t < meta["vocab_size"] for t in eos):
        raise MoecError(f"the moec metadata {source}: generation.eos_token_ids must be token ids below vocab_size "
                        f"({meta['vocab_size']}), got {eos!r}; {redo}")
    validate_kv_cache(meta, source)
    return meta


def read_sidecar(onnx_path: str | os.PathLike, *, required: bool = True) -> dict | None:
    """The validated moec metadata beside ``onnx_path``.

    A missing file is a MoecError when ``required`` (the runtime and the build stage need it) and
    None otherwise (the passes also optimize graphs that moec did not export).
    """
    side = contract.sidecar_path(onnx_path)
    side_file(side, f"the moec metadata of {onnx_path}", "keep the sidecar the export wrote as a file beside the .onnx")
    if not side.is_file():
        if not required:
            return None
        raise MoecError(
            f"{onnx_path} is not a moec export: its metadata file {side} is missing "
            "(export the checkpoint with `moec export`, which writes it beside the .onnx, or give "
            "`moec run` the checkpoint with --checkpoint DIR)"
        )
    return read_sidecar_file(side)


def read_sidecar_file(side: str | os.PathLike) -> dict:
    """The validated moec metadata in the file ``side`` itself (an engine folder names it in its
    manifest)."""
    side = Path(side)
    meta = read_manifest_json(side, fix="re-export the model",
                              missing=f"the moec metadata {side} is missing; rebuild the artifact with moec",
                              not_this=f"the moec metadata {side} is not a JSON object; re-export the model")
    return validate_sidecar(meta, side)


# --- The tokenizer that belongs to a model --------------------------------------------------------
# tokenizer.json has one fixed name (what Hugging Face tools look for), so two models exported into
# one folder would share one file. The sidecar records the sha256 of the model's own tokenizer at
# export; writers refuse to replace a different tokenizer.json, and readers refuse one that differs.


def check_tokenizer_slot(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Refuse to write ``src`` to ``dest`` when ``dest`` already holds a different tokenizer."""
    from moec.common.artifacts import sha256_file

    src, dest = Path(src), Path(dest)
    if dest.is_file() and dest.resolve() != src.resolve() and sha256_file(dest) != sha256_file(src):
        raise MoecError(f"{dest} already holds a different tokenizer (another model's, written into the same "
                        f"folder?); write this model into a folder of its own")


def check_tokenizer_belongs(tokenizer: str | os.PathLike, meta: dict | None, model: str | os.PathLike) -> None:
    """Refuse a tokenizer whose sha256 differs from the one recorded for ``model`` at export."""
    from moec.common.artifacts import sha256_file

    want = (meta or {}).get("tokenizer_sha256")
    if want and sha256_file(tokenizer) != want:
        raise MoecError(f"{tokenizer} is not the tokenizer {model} was exported with (its sha256 differs from the "
                        f"one recorded at export); copy the checkpoint's tokenizer.json beside the model, give "
                        f"--checkpoint with the checkpoint it was exported from, or use --prompt-ids")


def model_tokenizer(folder: str | os.PathLike, meta: dict | None, model: str | os.PathLike) -> Path | None:
    """The tokenizer.json that belongs to ``model``: the one in ``folder`` (None when there is none),
    which must resolve inside ``folder`` (a symbolic link to an arbitrary file is not read, copied or
    shipped) and, where the sidecar records ``tokenizer_sha256``, have that digest. Writers that copy
    a model's tokenizer (optimize, build) take it from here."""
    tok = side_file(Path(folder) / contract.TOKENIZER_FILE, f"the tokenizer of {model}",
                    "keep the checkpoint's tokenizer.json as a file in the model's folder")
    if not tok.exists():
        return None
    if not tok.is_file():
        raise MoecError(f"{tok} is not a file; the tokenizer of {model} must be the checkpoint's tokenizer.json")
    check_tokenizer_belongs(tok, meta, model)
    return tok
