"""A partition folder (``moec optimize --tp/--ep``) checked as one set of ranks before any run.

Refused with a named error, before a process starts or a byte is written: a folder without
parallel.json, a rank file that is missing, a rank file that is not the one parallel.json
recorded (its sha256, or the partition id in its metadata, differ: a rank graph from another
partition), and a launch whose world size is not the partition's.
"""

from __future__ import annotations

import json
from pathlib import Path

from moec.common import contract
from moec.common.artifacts import sha256_file
from moec.common.errors import MoecError
from moec.common.manifest_json import read_manifest_json




def is_rank_set(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / contract.PARALLEL_MANIFEST).is_file()


def read_parallel_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / contract.PARALLEL_MANIFEST
    manifest = read_manifest_json(
        path, fix="re-run `moec optimize --tp/--ep`",
        missing=f"{folder} has no {contract.PARALLEL_MANIFEST}; give the folder `moec optimize --tp/--ep` wrote")
    if manifest.get("format") == contract.PARALLEL_ENGINES_FORMAT:
        raise MoecError(f"{folder} holds per-rank TensorRT engines (`moec build` of a partition folder); `moec run` "
                        "runs the partition folder itself on ONNX Runtime, TensorRT ranks need GPUs with NCCL")
    if manifest.get("format") != contract.PARALLEL_FORMAT or not isinstance(manifest.get("ranks"), list):
        raise MoecError(f"{path} is not a moec partition manifest; re-run `moec optimize --tp/--ep`")
    _check_manifest_fields(manifest, folder, path)
    return manifest


def _check_manifest_fields(manifest: dict, folder: Path, path: Path) -> None:
    """The fields the runner reads, with their types, and each rank file a plain file name inside
    ``folder`` (moec.common.confine): a hand-edited or hostile manifest is a named error, not a
    traceback or a read of a file elsewhere."""
    from moec.common.confine import plain_file_name

    fix = "re-run `moec optimize --tp/--ep`"

    def whole(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    for key in ("world_size", "tp", "ep"):
        if not whole(manifest.get(key)) or manifest[key] < 1:
            raise MoecError(f"{path}: {key} is {manifest.get(key)!r}, expected a whole number >= 1; {fix}")
    if not isinstance(manifest.get("partition_id"), str):
        raise MoecError(f"{path}: partition_id is {manifest.get('partition_id')!r}, expected a string; {fix}")
    for i, r in enumerate(manifest["ranks"]):
        if not isinstance(r, dict) or not whole(r.get("rank")) or not isinstance(r.get("sha256"), str):
            raise MoecError(f"{path}: ranks[{i}] is not an object with a rank number, a file and a sha256; {fix}")
        plain_file_name(folder, r.get("file"), f"{path} ranks[{i}].file", fix)


def check_rank_set(folder: Path, world_size: int | None = None, *, hash_files: bool = True) -> dict:
    """The manifest of ``folder`` after checking that every rank file is present and the one it
    records; ``world_size``: the launch's, which must match."""
    folder = Path(folder)
    manifest = read_parallel_manifest(folder)
    world = int(manifest["world_size"])
    if world_size is not None and world_size != world:
        raise MoecError(f"{folder} is partitioned for {world} ranks (tp {manifest['tp']} x ep {manifest['ep']}) "
                        f"but {world_size} were launched; launch {world} (e.g. torchrun --nproc-per-node {world})")
    if sorted(r["rank"] for r in manifest["ranks"]) != list(range(world)):
        raise MoecError(f"{folder / contract.PARALLEL_MANIFEST} does not list ranks 0..{world - 1}; re-run `moec optimize --tp/--ep`")
    missing = [r["file"] for r in manifest["ranks"] if not (folder / r["file"]).is_file()]
    if missing:
        raise MoecError(f"{folder} is missing rank file{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                        "copy the whole folder `moec optimize --tp/--ep` wrote")
    for r in manifest["ranks"]:
        path = folder / r["file"]
        if _partition_id(path) != manifest["partition_id"]:
            raise MoecError(f"{path} is a rank graph of another partition (its partition id is not "
                            f"{manifest['partition_id']}, the one {contract.PARALLEL_MANIFEST} records); "
                            "do not mix rank files of different `moec optimize --tp/--ep` runs")
        if hash_files and sha256_file(path) != r["sha256"]:
            raise MoecError(f"{path} is not the rank {r['rank']} graph {contract.PARALLEL_MANIFEST} records (sha256 "
                            "differs); do not mix rank files of different `moec optimize --tp/--ep` runs")
    return manifest


def _partition_id(path: Path) -> str | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise MoecError(f"{path}: not a readable ONNX model ({e})") from e
    text = next((p.value for p in model.metadata_props if p.key == contract.PARALLEL_METADATA_KEY), None)
    if not text:
        return None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return meta.get("partition_id") if isinstance(meta, dict) else None
