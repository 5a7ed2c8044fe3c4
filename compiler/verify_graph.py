"""Verify any moec graph of a checkpoint (the export, an optimized, fused or quantized copy)
against PyTorch: ``moec verify CKPT --onnx GRAPH.onnx``.

What the graph is comes from its sidecar, which every moec stage writes beside it: its dtype
(``precision`` after ``moec optimize``, else the export's ``dtype``) picks the torch reference's
dtype and the default tolerances, and a quantized graph (``quantization``) is compared with torch
on the same dequantized weights, as ``moec compile``'s verify stage does, so each format is held
to the tolerance of its dtype, not a looser one.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec.common.errors import MoecError
from moec.compiler.verify import VerifyConfig, VerifyReport, verify_backends

# MoE lowerings whose nodes exist only inside TensorRT engines (ONNX Runtime cannot run them).
_TRT_ONLY_LOWERINGS = ("trt-native", "trt-plugin")


def graph_sidecar(onnx_path: str | os.PathLike) -> dict:
    from moec.common.sidecar import read_sidecar

    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise MoecError(f"--onnx {onnx_path} is a folder; give one .onnx graph (a rank graph of a partition folder "
                        "runs only with its other ranks)")
    if not onnx_path.is_file():
        raise MoecError(f"--onnx {onnx_path} does not exist; give a graph moec export or moec optimize wrote")
    return read_sidecar(onnx_path)


def graph_dtype(onnx_path: str | os.PathLike) -> str:
    """The dtype the graph computes in, from its sidecar."""
    meta = graph_sidecar(onnx_path)
    return str(meta.get("precision") or meta.get("dtype") or "fp32")


def check_graph_of(meta: dict, llama, onnx_path, checkpoint) -> None:
    """MoecError unless the graph was made from a model with the checkpoint's configuration, and
    ONNX Runtime can run it."""
    ours = llama.to_dict()
    theirs = meta.get("model_config") or {}
    differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if differ:
        first = differ[0]
        raise MoecError(f"{onnx_path} was not made from {checkpoint}: its model configuration differs in "
                        f"{', '.join(differ[:4])} ({first}: {theirs.get(first)!r} in the graph, {ours.get(first)!r} in the "
                        "checkpoint); give the checkpoint the graph was exported from")
    lowering = str(meta.get("moe_lowering") or "")
    trt_only = [name for name in lowering.split("+") if name in _TRT_ONLY_LOWERINGS]
    if trt_only:
        raise MoecError(f"{onnx_path} lowers its MoE layers to {', '.join(trt_only)}, which runs only inside TensorRT "
                        "engines; verify its export, or a graph optimized with the target's default lowering")


def _ort_has_gpu() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def quantization_spec(meta: dict, onnx_path=None):
    """The QuantizeSpec the graph's weights were quantized with (None for a float graph). A
    calibrated quantization (awq's scales, gptq's rounding, FP8 activation scales) is refused: the
    reference is rebuilt from the spec alone, and those numbers are the graph's own."""
    record = meta.get("quantization")
    if not record:
        return None
    from moec.passes.quantize import CALIBRATED_METHODS, make_spec

    if record.get("format") == "nvfp4":
        # ONNX Runtime 1.32 has no DequantizeLinear kernel for FLOAT4E2M1 (compiler/quantize_stage.py).
        raise MoecError(f"{onnx_path or 'the graph'} is quantized with nvfp4, which ONNX Runtime cannot run "
                        "(no FLOAT4E2M1 kernels); verify an int4 or fp8 quantization of the same pipeline instead, "
                        "or the engine on an sm120 GPU")
    method = record.get("method", "rtn")
    activations = record.get("activations", "none")
    if method in CALIBRATED_METHODS or not activations.startswith("none"):
        what = f"--quantize-method {method}" if method in CALIBRATED_METHODS else f"activations {activations}"
        raise MoecError(f"{onnx_path or 'the graph'} is quantized with {what}, calibrated on the export: verify "
                        "rebuilds its torch reference from the quantization record alone and cannot rebuild calibrated "
                        "numbers; verify an rtn / clip quantization of the same pipeline instead")
    return make_spec(record.get("format"), record.get("group_size"), record.get("scope"),
                     bool(record.get("symmetric", True)), method)


def verify_onnx(checkpoint: str | os.PathLike, onnx_path: str | os.PathLike,
                config: VerifyConfig | None = None) -> VerifyReport:
    """Compare ``onnx_path`` (any moec graph of ``checkpoint``) in ONNX Runtime with PyTorch.
    ``config.dtype`` must be the graph's (None config: the graph's dtype and its tolerances)."""
    from moec.models import Llama4Config
    from moec.models.checkpoint import checkpoint_folder
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.ort_backend import OrtBackend

    meta = graph_sidecar(onnx_path)
    dtype = graph_dtype(onnx_path)
    config = config or VerifyConfig(dtype=dtype)
    if config.dtype != dtype:
        raise MoecError(f"{onnx_path} computes in {dtype}; --dtype {config.dtype} does not apply to it "
                        "(drop --dtype: the graph's dtype is the reference's)")
    if dtype == "bf16" and not config.providers and not _ort_has_gpu():
        raise MoecError(f"{onnx_path} computes in bf16, which ONNX Runtime's CPU provider has no kernels for; verify it "
                        "on a GPU host, or verify the same pipeline in fp32 (moec compile does: its fp32 twin)")
    llama = Llama4Config.from_pretrained(checkpoint_folder(checkpoint))
    check_graph_of(meta, llama, onnx_path, checkpoint)
    spec = quantization_spec(meta, onnx_path)
    ort_backend = OrtBackend.from_onnx(onnx_path, providers=config.providers,
                                       graph_optimization=config.graph_optimization)
    torch_backend = TorchBackend.from_checkpoint(checkpoint, dtype=dtype)
    if spec is not None:
        from moec.compiler.quantize_stage import dequantize_module_weights

        dequantize_module_weights(torch_backend.model, spec)
    return verify_backends(torch_backend, ort_backend, config, llama.vocab_size, llama.attention_chunk_size)
