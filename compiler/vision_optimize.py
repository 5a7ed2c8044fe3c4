"""The optimize stage for the vision graph (OUT.vision.onnx, ``moec export --vision``).

The vision tower is plain attention and MLPs: it goes through the text pipeline's phases that apply to it, built
from the same step lists (compiler/pipeline.py), so a change to a clean-up or the precision pass reaches both:

    cleanup    the text pipeline's clean-up passes
    fusion     the target's non-MoE fusions (rms_norm, rotary, attention), as the text graph gets them; on the
               vision graph they find nothing (LayerNorm, 2D rotary over patch rows and columns, unmasked
               attention), and a fusion that matched there would be one that fires where it must not
    precision  fp32 -> fp16/bf16, graph inputs and outputs kept fp32    (empty unless asked, or see below)
    cleanup    again, then onnx shape inference types every value

MoE fusion, partition, quantize and lowering have nothing to act on (no experts, no routing): no steps.

``moec optimize OUT.onnx`` with OUT.vision.onnx beside it writes both graphs in one file set (the optimized
vision graph is named as ``vision_onnx_path`` names it beside the optimized text graph, where ``moec build`` and
``moec run`` look for it; --dump-dir dumps the text graph's phases only); ``moec optimize OUT.vision.onnx``
optimizes the vision graph alone. The --tp/--ep rank graphs have no vision graph beside them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import onnx_ir as ir

from moec.common import contract
from moec.common.artifacts import atomic_file_set, write_json_atomic
from moec.common.errors import MoecError

# The fusion steps that need a MoE layer (compiler/pipeline.py's names).
MOE_FUSIONS = ("fuse_moe_gating", "fuse_grouped_experts")
LOW_PRECISIONS = ("fp16", "bf16")


def is_vision_graph(onnx_path: Path) -> bool:
    """Whether ``onnx_path``'s metadata says it is a moec vision graph (not the text model)."""
    import json

    from moec.runtime.vision import VISION_FORMAT

    try:
        return json.loads(contract.sidecar_path(onnx_path).read_text()).get("format") == VISION_FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # no (or unreadable) metadata: the text path reports it in its own words


def vision_precision(config, meta: dict, target, text_dtype: str | None, source: Path) -> str | None:
    """The precision the vision graph is converted to (None: none). ``--precision`` when given; without it, the
    text graph's fp16/bf16 for a TensorRT target (the vision export is fp32 unless the text export is fp16, only
    because the host's ONNX Runtime has no bf16 kernels; the engine should run the model's precision)."""
    if meta.get("target") is not None:
        return None  # optimized before: its precision is already what the sidecar says
    exported = meta.get("dtype", "fp32")
    if config.precision in LOW_PRECISIONS:
        if exported != "fp32":
            raise MoecError(f"{source} was exported as {exported}; --precision converts fp32 exports only "
                            "(export with --dtype fp32, or drop --precision)")
        return config.precision
    if config.precision is None and target.kind != "ort" and exported == "fp32" and text_dtype in LOW_PRECISIONS:
        return text_dtype
    return None


def check_vision_graph(in_path: Path, config, target, text_dtype: str | None = None) -> tuple[dict, str | None]:
    """The vision graph's metadata and the precision it will get, checked before any work: MoecError for
    missing or foreign metadata, a graph optimized for another target, a precision it cannot take."""
    from moec.compiler.pipeline import _check_external_data
    from moec.runtime.vision import read_vision_metadata

    meta = read_vision_metadata(in_path)
    done_for = meta.get("target")
    if done_for is not None and done_for != str(target):
        raise MoecError(f"{in_path} is already optimized for {done_for}; optimize the vision graph `moec export` "
                        f"wrote for {target} instead")
    _check_external_data(in_path)
    return meta, vision_precision(config, meta, target, text_dtype, in_path)


def vision_steps(config, target, precision: str | None) -> list:
    """The text pipeline's step lists with what has nothing to act on here left out (see the module docstring)."""
    from moec.compiler.pipeline import _cleanup_steps, _fusion_steps, _precision_steps, _typing_step

    fusions = [s for s in _fusion_steps(config, target) if s.name not in MOE_FUSIONS]
    return [*_cleanup_steps(), *fusions, *_precision_steps(dataclasses.replace(config, precision=precision)),
            *_cleanup_steps(), _typing_step()]


def write_optimized_vision(in_path: Path, dest: Path, config, target, meta: dict, precision: str | None) -> dict:
    """Run the vision steps over ``in_path`` and write the graph (+ .data over the inline limit) and its metadata
    to ``dest``, which lies in the caller's temporary folder; returns the vision part of the report."""
    from moec.compiler.pipeline import (INLINE_WEIGHT_LIMIT_BYTES, _Context, _has_external_data, _save,
                                        _weight_bytes, run_passes)
    from moec.passes.fusions._graph import FusionLog

    t0 = time.perf_counter()
    try:
        model = ir.load(in_path)
    except Exception as e:
        raise MoecError(f"{in_path}: not a readable ONNX model ({e})") from e
    external = _has_external_data(model) or _weight_bytes(model) > INLINE_WEIGHT_LIMIT_BYTES
    ctx = _Context(config, target, FusionLog())
    records = run_passes(model, vision_steps(config, target, precision), ctx)
    _save(model, dest, external)
    # "dtype" stays the export's: it is the graph's I/O type, which the precision pass keeps (casts inside).
    done = meta.get("precision") or meta.get("dtype", "fp32")
    write_json_atomic(contract.sidecar_path(dest), meta | {"target": str(target), "precision": precision or done})
    return {"in_path": str(in_path), "out_name": dest.name, "precision": precision or done,
            "passes": [dataclasses.asdict(r) for r in records], "fusions": dict(ctx.counts), "external_data": external,
            "total_ms": (time.perf_counter() - t0) * 1e3}


def optimize_vision_onnx(in_path: str | os.PathLike, out_path: str | os.PathLike, config):
    """``moec optimize OUT.vision.onnx -o X.vision.onnx``: the vision graph alone; an OptimizeReport with no MoE
    layers and the vision part under ``vision``."""
    from moec.compiler.pipeline import OptimizeReport, PassRecord, check_writable
    from moec.passes.targets import parse_target

    t0 = time.perf_counter()
    in_path, out_path = Path(in_path), Path(out_path)
    for given, option in ((config.quantize, "--quantize"), (config.require_fusion, "--require-fusion"),
                          (config.dump_dir is not None, "--dump-dir")):
        if given:
            raise MoecError(f"{in_path} is a vision graph (no MoE layers): {option} applies to the text graph; "
                            "drop it, or optimize the text graph, which optimizes the vision graph beside it too")
    if not out_path.name.endswith(".vision.onnx"):
        raise MoecError(f"-o {out_path}: name the optimized vision graph NAME.vision.onnx, beside the NAME.onnx it "
                        "belongs to (where `moec build` and `moec run` look for it)")
    target = parse_target(config.target)
    meta, precision = check_vision_graph(in_path, config, target)
    check_writable(out_path)
    with atomic_file_set(out_path) as tmp:
        vision = write_optimized_vision(in_path, tmp / out_path.name, config, target, meta, precision)
    if not vision["external_data"]:
        (out_path.parent / f"{out_path.name}.data").unlink(missing_ok=True)  # of an earlier external write
    return OptimizeReport(
        in_path=str(in_path), out_path=str(out_path), target=str(target), moe_lowering={},
        precision=vision["precision"], passes=[PassRecord(**r) for r in vision["passes"]], refusals=[],
        fused_gating=0, fused_experts=0, moe_layers=0, warnings=[], total_ms=(time.perf_counter() - t0) * 1e3,
        vision=vision)
