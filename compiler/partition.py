"""``moec optimize --tp T --ep E``: one optimized graph per rank, plus parallel.json.

Every rank runs the whole optimize pipeline on its own copy of the input (loaded lazily; the
weights stay in the input's files until the rank file is written) with one extra phase between
precision and lowering: ``partition``, which builds the plan (passes/partition/plan.py) on the
fused graph and applies rank r's share of it. Lowering after partitioning means each rank's MoE
layer is lowered for the experts it holds (ep > 1: the gather/dense forms; ONNX Runtime's
com.microsoft.MoE routes by itself over all experts, so the ``ort`` lowering refuses an
ep-split layer and the target's next lowering, ``hybrid``, takes it).

Output folder (written as a whole: temporary folder, renamed into place):
  rank{r}.onnx (+ .data), rank{r}.moec.json   each rank's graph and sidecar
  parallel.json                               world size, mapping, plan, source sha256, per-rank
                                              file sha256 and weight bytes
  tokenizer.json                              copied from beside the input
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import onnx_ir as ir

from moec.common import contract
from moec.common.artifacts import atomic_dir, check_output_dir, sha256_file, write_json_atomic
from moec.common.errors import MoecError
from moec.common.sidecar import read_sidecar


PARALLEL_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How to split; ``moec optimize --tp/--ep`` fills it."""

    tp: int = 1
    ep: int = 1


@dataclasses.dataclass
class PartitionReport:
    out_dir: str
    world_size: int
    rank_files: list[str]
    moe_lowering: dict[str, int]
    total_ms: float


def _plan_id(plan_dict: dict, source_sha: str) -> str:
    text = json.dumps({"plan": plan_dict, "source": source_sha}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def optimize_partitioned(in_path: str | os.PathLike, out_dir: str | os.PathLike, config, parallel: ParallelConfig) -> PartitionReport:
    """Write ``out_dir``/rank{r}.onnx for every rank of ``parallel`` and parallel.json."""
    from moec.compiler.pipeline import (_Context, _check_external_data, _check_not_optimized_for_another_target,
                                        _has_external_data, _save, _weight_bytes, INLINE_WEIGHT_LIMIT_BYTES,
                                        PRECISIONS, Step, build_pipeline, run_passes)
    from moec.passes.fusions._graph import FusionLog
    from moec.passes.partition import Mapping, apply_partition, build_plan
    from moec.passes.targets import lowerings_for, parse_target

    t_start = time.perf_counter()
    in_path, out_dir = Path(in_path), Path(out_dir)
    mapping = Mapping(parallel.tp, parallel.ep)
    target = parse_target(config.target)
    lowerings_for(target, config.moe_lowering)
    from moec.compiler.quantize_stage import check_quantize_request

    quant = check_quantize_request(config, target)  # the format against the target, before any work
    if quant is not None and quant.calibrated:
        raise MoecError(f"--quantize {quant.label()} calibrates on the export, and --tp/--ep rank graphs hold slices "
                        "of the weights that calibration does not see; use --quantize-method rtn or clip (and no "
                        "--quantize-activations) with --tp/--ep")
    if config.precision is not None and config.precision not in PRECISIONS:
        raise MoecError(f"precision {config.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if config.dump_dir is not None:
        raise MoecError("--dump-dir is not available with --tp/--ep; dump the single-rank optimize instead")
    if not in_path.is_file():
        raise MoecError(f"{in_path}: no such ONNX file; export one with `moec export`")
    sidecar = read_sidecar(in_path, required=False)
    if sidecar is None:
        raise MoecError(f"{in_path} has no {contract.sidecar_path(in_path).name} beside it; partitioning reads the "
                        "model's head and expert counts from it (keep the files `moec export` wrote together)")
    try:
        mapping.check_divisible(sidecar.get("model_config"))  # before any work
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise MoecError(f"{contract.sidecar_path(in_path)}: model_config lacks or mistypes a size the split needs "
                        f"({type(e).__name__}: {e}); partition the model.onnx `moec export` wrote") from None
    check_output_dir(out_dir, command="optimize", inputs=[in_path])
    _check_external_data(in_path)
    source_sha = sha256_file(in_path)
    data_path = in_path.with_name(in_path.name + ".data")
    source = {"path": str(in_path), "sha256": source_sha}
    if data_path.is_file():
        source["data_sha256"] = sha256_file(data_path)

    ranks, counts, plan_dict, plan_id = [], {}, None, None
    with atomic_dir(out_dir, command="optimize", inputs=[in_path]) as tmp:
        for rank in range(mapping.world_size):
            try:
                model = ir.load(in_path)
            except Exception as e:
                raise MoecError(f"{in_path}: not a readable ONNX model ({e})") from e
            if _check_not_optimized_for_another_target(in_path, model, sidecar, target):
                raise MoecError(f"{in_path} is already optimized; partition the export (`moec export`'s model.onnx)")
            external = _has_external_data(model) or _weight_bytes(model) > INLINE_WEIGHT_LIMIT_BYTES
            held: dict[str, int] = {}

            def partition(m: ir.Model, ctx, rank=rank, held=held) -> int:
                nonlocal plan_dict, plan_id
                plan = build_plan(m, sidecar["model_config"], mapping)
                d = plan.to_dict()
                if plan_dict is None:
                    plan_dict, plan_id = d, _plan_id(d, f"{source_sha}:{target}:{config.precision}:{config.moe_lowering}")
                elif d != plan_dict:  # the passes are deterministic; a difference is a moec bug
                    raise RuntimeError(f"rank {rank}'s partition plan differs from rank 0's")
                n = apply_partition(m, plan, rank, plan_id)
                init = m.graph.initializers
                held["sharded_bytes"] = sum(init[name].const_value.nbytes for name in plan.weights)
                held["replicated_bytes"] = sum(init[name].const_value.nbytes for name in plan.replicated if name in init)
                return n

            ctx = _Context(config, target, FusionLog())
            run_passes(model, build_pipeline(config, target, Step("partition", "apply_partition", partition)), ctx)
            if ctx.counts.get("experts", 0) == 0 and sidecar["model_config"].get("moe_layers"):
                raise MoecError(f"{in_path}: no MoE layer was fused, so the experts cannot be split")
            name = contract.rank_onnx(rank)
            _save(model, tmp / name, external)
            lowering = "+".join(sorted(ctx.lowered)) or "none"
            for k, v in ctx.lowered.items():
                counts[k] = counts.get(k, 0) + v
            rank_side = dict(sidecar)
            rank_side.update({"target": str(target), "moe_lowering": lowering,
                              "precision": config.precision or sidecar.get("dtype", "fp32"),
                              "parallel": {"world_size": mapping.world_size, "rank": rank, "tp": mapping.tp,
                                           "ep": mapping.ep, "partition_id": plan_id}})
            if quant is not None:  # what `moec build` checks the archs against and the rank manifest records
                rank_side["quantization"] = quant.record() | {"weights": ctx.counts.get("quantized", 0)}
            write_json_atomic(contract.sidecar_path(tmp / name), rank_side)
            files = [name] + ([name + ".data"] if (tmp / (name + ".data")).exists() else [])
            ranks.append({"rank": rank, "file": name, "sha256": sha256_file(tmp / name),
                          "files": {f: sha256_file(tmp / f) for f in files}, "moe_lowering": lowering, **held})
            del model
        tok = in_path.parent / contract.TOKENIZER_FILE
        if tok.is_file():
            shutil.copyfile(tok, tmp / contract.TOKENIZER_FILE)
        write_json_atomic(tmp / contract.PARALLEL_MANIFEST, {
            "format": contract.PARALLEL_FORMAT, "version": PARALLEL_VERSION, "world_size": mapping.world_size,
            "tp": mapping.tp, "ep": mapping.ep, "partition_id": plan_id, "target": str(target),
            "source": source, "plan": plan_dict, "ranks": ranks,
        })
    return PartitionReport(str(out_dir), mapping.world_size, [r["file"] for r in ranks], counts,
                           (time.perf_counter() - t_start) * 1e3)
