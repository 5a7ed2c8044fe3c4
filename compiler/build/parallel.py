"""``moec build OUT_DIR`` for a partition folder: one engine folder per rank, one parallel.json.

ENG_DIR/
  rank{r}/               what ``moec build`` writes for one graph (engines per arch, manifest.json);
                         its manifest also records ``parallel``: world size, rank, tp, ep, the
                         partition id and this rank's share of the mapping
  parallel.json          world size, mapping, and every rank's engines with their sha256

Each rank graph's DistCollective nodes become TensorRT DistCollective layers (NCCL at run time,
SM80+). ``load_rank_engines`` is what a runtime calls first: it refuses a set that is incomplete
(a rank folder or engine missing), mixed (ranks of different partitions or builds, or an engine
whose sha256 is not the recorded one) or launched with another world size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moec.common import contract
from moec.common.artifacts import atomic_dir, check_output_dir, sha256_file, write_json_atomic
from moec.common.errors import MoecError
from moec.common.manifest_json import fields_named, read_manifest_json

ENGINES_FORMAT = contract.PARALLEL_ENGINES_FORMAT


def rank_dir(rank: int) -> str:
    return f"rank{rank}"


def build_rank_engines(part_dir: str | Path, out_dir: str | Path, config) -> dict:
    """Build every rank of ``part_dir`` (``moec optimize --tp/--ep``'s folder) for ``config.archs``."""
    from moec.compiler.build import build_engine
    from moec.runtime.parallel.rankset import check_rank_set

    part_dir, out_dir = Path(part_dir), Path(out_dir)
    manifest = check_rank_set(part_dir)  # missing / foreign rank files: named errors before any work
    check_output_dir(out_dir, command="build", inputs=[part_dir])
    plan_ranks = {r["rank"]: r for r in manifest["plan"]["ranks"]}
    ranks = []
    with atomic_dir(out_dir, command="build", inputs=[part_dir]) as tmp:
        for r in manifest["ranks"]:
            rank = r["rank"]
            result = build_engine(part_dir / r["file"], tmp / rank_dir(rank), config)
            m = result.manifest
            m["parallel"] = {"world_size": manifest["world_size"], "rank": rank, "tp": manifest["tp"], "ep": manifest["ep"],
                             "partition_id": manifest["partition_id"], "mapping": plan_ranks[rank]}
            write_json_atomic(tmp / rank_dir(rank) / contract.ENGINE_MANIFEST, m)
            ranks.append({"rank": rank, "dir": rank_dir(rank), "source_sha256": r["sha256"],
                          "dist_collective_layers": m["network_layers"]["by_type"].get("DIST_COLLECTIVE", 0),
                          "engines": [{"file": e["file"], "archs": e["archs"], "sha256": e["sha256"], "bytes": e["bytes"]}
                                      for e in m["engines"]]})
        tok = part_dir / contract.TOKENIZER_FILE
        if tok.is_file():
            shutil.copyfile(tok, tmp / contract.TOKENIZER_FILE)
        out = {"format": ENGINES_FORMAT, "version": 1, "world_size": manifest["world_size"], "tp": manifest["tp"],
               "ep": manifest["ep"], "partition_id": manifest["partition_id"], "archs": list(config.archs),
               "mapping": manifest["plan"]["mapping"], "plan_ranks": manifest["plan"]["ranks"],
               "source": {"folder": str(part_dir), "sha256": sha256_file(part_dir / contract.PARALLEL_MANIFEST)},
               "ranks": ranks}
        write_json_atomic(tmp / contract.PARALLEL_MANIFEST, out)
    return out


def load_rank_engines(eng_dir: str | Path, world_size: int | None = None, arch: str | None = None) -> dict[int, Path]:
    """{rank: engine file} for ``arch`` (the first built arch when None), after checking the set
    is complete, of one partition and build, and of ``world_size`` ranks when given."""
    eng_dir = Path(eng_dir)
    path = eng_dir / contract.PARALLEL_MANIFEST
    manifest = read_manifest_json(
        path, fix="rebuild with `moec build`", format=ENGINES_FORMAT,
        missing=f"{eng_dir} has no {contract.PARALLEL_MANIFEST}; build a partition folder with `moec build`",
        not_this=f"{path} is not a moec multi-rank engine manifest; rebuild with `moec build OUT_DIR`")
    # A hand-edited manifest: a missing key or a wrong type is a named error, not a traceback.
    with fields_named(path, "rebuild with `moec build`", " (or a rank's manifest it lists)"):
        return _rank_engines(manifest, eng_dir, path, world_size, arch)


def _rank_engines(manifest: dict, eng_dir: Path, path: Path, world_size: int | None, arch: str | None) -> dict[int, Path]:
    from moec.common.confine import plain_file_name

    world = int(manifest["world_size"])
    if world_size is not None and world_size != world:
        raise MoecError(f"{eng_dir} holds engines for {world} ranks but {world_size} were launched; launch {world}")
    if sorted(r["rank"] for r in manifest["ranks"]) != list(range(world)):
        raise MoecError(f"{path} does not list ranks 0..{world - 1}: the rank set is incomplete; rebuild with `moec build`")
    arch = arch or manifest["archs"][0]
    engines = {}
    for r in manifest["ranks"]:
        rank_dir = plain_file_name(eng_dir, r["dir"], f"{path} rank {r['rank']} dir", "rebuild with `moec build`")
        rank_manifest = rank_dir / contract.ENGINE_MANIFEST
        if not rank_manifest.is_file():
            raise MoecError(f"{eng_dir} is missing rank {r['rank']}'s engines ({r['dir']}/); the rank set is incomplete, "
                            "copy the whole folder `moec build` wrote")
        par = read_manifest_json(rank_manifest, fix="rebuild with `moec build`").get("parallel") or {}
        if par.get("partition_id") != manifest["partition_id"] or par.get("rank") != r["rank"]:
            raise MoecError(f"{rank_manifest} is rank {par.get('rank')} of partition {par.get('partition_id')}, not rank "
                            f"{r['rank']} of {manifest['partition_id']}: a mixed rank set; rebuild or copy one build's folder")
        entry = next((e for e in r["engines"] if arch in e["archs"]), None)
        if entry is None:
            raise MoecError(f"{eng_dir}: rank {r['rank']} has no engine for {arch}; built: {', '.join(manifest['archs'])}")
        engine = plain_file_name(rank_dir, entry["file"], f"{path} rank {r['rank']} engine", "rebuild with `moec build`")
        if not engine.is_file():
            raise MoecError(f"{engine} is missing; the rank set is incomplete")
        if sha256_file(engine) != entry["sha256"]:
            raise MoecError(f"{engine} is not the engine {contract.PARALLEL_MANIFEST} records (sha256 differs): a mixed "
                            "rank set; copy one build's folder whole")
        engines[r["rank"]] = engine
    return engines


def inspect_rank_engines(eng_dir: str | Path) -> dict:
    """``moec inspect`` of a multi-rank engine folder: the set checked as a runtime would load it
    (every arch), then each rank's folder inspected like a single engine folder."""
    from moec.compiler.build import inspect_engine_dir

    eng_dir = Path(eng_dir)
    load_rank_engines(eng_dir)  # a missing, incomplete, mixed or foreign set: named errors, first arch
    manifest = read_manifest_json(eng_dir / contract.PARALLEL_MANIFEST, fix="rebuild with `moec build`")
    for arch in manifest["archs"][1:]:
        load_rank_engines(eng_dir, arch=arch)
    ranks = [inspect_engine_dir(eng_dir / r["dir"]) for r in sorted(manifest["ranks"], key=lambda r: r["rank"])]
    return {"path": str(eng_dir), "parallel": {k: manifest[k] for k in ("world_size", "tp", "ep", "partition_id", "archs")},
            "ranks": ranks, "problems": [f"rank {i}: {p}" for i, r in enumerate(ranks) for p in r["problems"]]}
