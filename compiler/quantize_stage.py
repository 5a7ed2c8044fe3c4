"""The optimize stage's quantize phase: the request checked against the target before any work,
and the phase's one step (passes/quantize/apply.py does the work).

What each target builds (checked here, so `moec optimize` / `moec compile` refuse before the
export or the passes run):
- ort: every format. int4 experts become a MatMulNBits pair per expert (the split lowering, up to
  32 experts; above, and int8 experts, com.microsoft.QMoE), int4 dense weights MatMulNBits (with
  --quantize-activations dynamic all of them compute with int8 activations); fp8 weights run as
  DequantizeLinear -> MatMul / the hybrid expert lowering.
- trt / trt-rtx: DequantizeLinear feeding the gather / dense / hybrid lowerings. FP8 needs an
  FP8 tensor-core arch (sm89 and newer); the archs below cannot build it. NVFP4 (two
  DequantizeLinear: the E4M3 block scales by the fp32 global scale, then the E2M1 weights) needs
  FP4 tensor cores, Blackwell: trt on sm100 / sm103 / sm110 / sm120 / sm121, trt-rtx on sm120 /
  sm121 (TensorRT-RTX 1.7 refuses sm89 with "HW-specific datatypes: fp4_e2m1"). Asymmetric int4
  is refused: TensorRT has no UINT4 weights (its parser: "Failed to import initializer" for a
  UINT4 initializer) and its DequantizeLinear takes a zero point of 0 only (an INT4 zero point of
  1: "Non-zero zero point is not supported", DLA excepted). TRT_MoE (trt-native) takes float or
  FP8 experts (IMoELayer quantizes in FP8 only: passes/lowerings/trt_native.py); moec's plugin
  full-precision expert weights only.
- nvfp4 on ort is refused: ONNX Runtime 1.32's CPU provider has no DequantizeLinear kernel for
  FLOAT4E2M1 ("Could not find an implementation for DequantizeLinear(23)"; it runs opset-23
  DequantizeLinear of int8), so the DequantizeLinear form cannot run there.
"""

from __future__ import annotations

from moec.common.errors import MoecError
from moec.passes.quantize import QuantizeSpec, make_spec

# FP8 (E4M3) tensor cores: Ada (sm89), Hopper (sm90), Blackwell (sm100+); not Turing/Ampere/Orin.
FP8_ARCHS = frozenset({"sm89", "sm90", "sm100", "sm103", "sm110", "sm120", "sm121"})
# FP4 (E2M1) tensor cores: Blackwell, datacenter (sm100, sm103), Thor (sm110) and RTX / Spark (sm120, sm121).
NVFP4_ARCHS = frozenset({"sm100", "sm103", "sm110", "sm120", "sm121"})
# Lowerings that read the expert weights themselves and take full precision only.
_FLOAT_ONLY_LOWERINGS = {"trt-plugin": "moec's TensorRT plugin (its Triton kernel reads fp16/bf16/fp32 weights)",
                         "function": "moec's function bodies"}


def spec_of(config) -> QuantizeSpec | None:
    return make_spec(config.quantize, config.quantize_group, config.quantize_scope, config.quantize_symmetric,
                     config.quantize_method, config.quantize_activations, config.quantize_calibration)


def unsupported_reason(spec: QuantizeSpec, target, moe_lowering: str | None) -> str | None:
    """Why ``target`` (with ``moe_lowering``) cannot build ``spec`` (None when it can)."""
    if spec.format == "fp8" and target.is_trt and target.arch not in FP8_ARCHS:
        return (f"FP8 needs FP8 tensor cores (sm89 and newer); {target.arch} has none: use --quantize int4 or int8, "
                f"or a target like {target.kind}:sm89")
    if spec.format == "nvfp4" and target.kind == "ort":
        return ("ONNX Runtime 1.32's CPU provider has no DequantizeLinear for FLOAT4E2M1 (NVFP4 weights); "
                "use --quantize int4 or fp8 on ort, or a target like trt-rtx:sm120")
    if spec.format == "nvfp4" and target.is_trt and target.arch not in NVFP4_ARCHS:
        return (f"NVFP4 needs FP4 tensor cores (Blackwell: {', '.join(sorted(NVFP4_ARCHS & set(_archs(target.kind))))}); "
                f"{target.arch} has none: use --quantize int4 or fp8, or a target like {target.kind}:sm120")
    if (reason := asymmetric_int4_reason(spec, target)) is not None:
        return reason
    if moe_lowering == "trt-native" and spec.format != "fp8" and "experts" in spec.record()["kinds"]:
        return (f"--moe-lowering trt-native runs TensorRT's TRT_MoE (IMoELayer), whose quantization is FP8 only "
                f"(passes/lowerings/trt_native.py), not {spec.format} experts; use --quantize fp8, or the target's "
                "default lowering (or hybrid, gather, dense)")
    if spec.activations == "dynamic" and target.kind != "ort":
        return (f"--quantize-activations dynamic is ONNX Runtime's MatMulNBits computing with int8 activations; "
                f"target {target.kind}:{target.arch} runs int4 weights with float activations: drop it")
    if spec.activations == "dynamic" and moe_lowering == "ort" and "experts" in spec.record()["kinds"]:
        return ("--quantize-activations dynamic: com.microsoft.QMoE (--moe-lowering ort) has no int8-activation "
                "mode; drop --moe-lowering (the split lowering runs the experts as MatMulNBits)")
    if moe_lowering == "split" and spec.format != "int4" and "experts" in spec.record()["kinds"]:
        return (f"--moe-lowering split runs quantized experts as MatMulNBits, int4 only (8-bit MatMulNBits with float "
                f"activations is slower than fp32 here: benchmarks/results/quant_decode_speed_split.md), not "
                f"{spec.format}; drop --moe-lowering for com.microsoft.QMoE / hybrid")
    if moe_lowering in _FLOAT_ONLY_LOWERINGS and "experts" in spec.record()["kinds"]:
        return (f"--moe-lowering {moe_lowering} runs {_FLOAT_ONLY_LOWERINGS[moe_lowering]}, not quantized experts; "
                "use the target's default lowering (or hybrid, gather, dense)")
    return None


def asymmetric_int4_reason(spec: QuantizeSpec, target) -> str | None:
    """Asymmetric int4 on a TensorRT target: its DequantizeLinear form runs on ONNX Runtime, but no
    TensorRT engine can be built from it (the module docstring has the parser's words)."""
    if spec.format == "int4" and not spec.symmetric and target.is_trt:
        return ("TensorRT has no UINT4 weights and its DequantizeLinear takes no zero point (\"Non-zero zero point "
                "is not supported\"), so asymmetric int4 cannot build; drop --quantize-asymmetric (symmetric int4 "
                "builds), or use --target ort")
    return None


def _archs(kind: str) -> tuple[str, ...]:
    from moec.common.archs import STATIC_ARCHS

    return STATIC_ARCHS.get(kind, ())


def whole_blocks(target) -> bool:
    """TensorRT's ONNX parser takes blocked DequantizeLinear only where the block divides K."""
    return target.is_trt


def check_quantize_request(config, target) -> QuantizeSpec | None:
    """The validated spec, or a named MoecError for a request the target cannot build."""
    spec = spec_of(config)
    if spec is not None and (reason := unsupported_reason(spec, target, config.moe_lowering)):
        raise MoecError(f"target {target}: --quantize {spec.label()}: {reason}")
    return spec


def check_model_fits(spec: QuantizeSpec | None, c, source: str, whole_blocks: bool = False) -> None:
    """Before an export, from the checkpoint's config ``c`` alone: the scope names some weight and
    the group is no longer than any reduction dimension in it (one that does not divide K leaves a
    shorter last block) (the pass checks the graph itself again)."""
    if spec is None:
        return
    moe, dense = bool(c.moe_layer_indices()), len(c.moe_layer_indices()) < c.num_hidden_layers
    if spec.scope == "experts" and not moe:
        raise MoecError(f"--quantize-scope experts names no weight in {source}: it has no MoE layers; "
                        "use --quantize-scope mlp or all")
    kinds = spec.record()["kinds"]
    ks = {}  # reduction dimension -> a weight that has it
    if moe:
        ks.update({c.hidden_size: "experts.gate_up_proj", c.intermediate_size: "experts.down_proj"})
    if "mlp" in kinds:
        ks.setdefault(c.hidden_size, "mlp gate_proj/up_proj")
        if moe:
            ks.setdefault(c.intermediate_size, "shared_expert.down_proj")
        if dense:
            ks.setdefault(c.intermediate_size_mlp, "feed_forward.down_proj")
    if "attention" in kinds:
        ks.setdefault(c.hidden_size, "self_attn.q/k/v_proj")
        ks.setdefault(c.num_attention_heads * c.head_dim, "self_attn.o_proj")
    for k, weight in sorted(ks.items()):
        block = spec.block_for(k)
        if block > k:
            raise MoecError(f"--quantize-group {block} is longer than {weight}'s reduction dimension {k} in {source}; "
                            f"choose a group of at most the smallest K of the scope ({', '.join(map(str, sorted(ks)))})")
        if whole_blocks and k % block:
            from moec.passes.quantize.apply import group_does_not_divide

            raise MoecError(f"{source}: " + group_does_not_divide(spec, weight, k, list(ks)))


def quantize_steps(config, target) -> list:
    """The quantize phase: empty without --quantize (a disabled step is an empty step). On ort,
    int4 dense weights then become MatMulNBits (the experts' DequantizeLinear waits for the MoE
    lowering, which turns it into MatMulNBits per expert or QMoE)."""
    from moec.compiler.pipeline import Step

    spec = spec_of(config)
    if spec is None:
        return []

    def run(model, ctx):
        from moec.passes.quantize.apply import quantize_weights

        n = quantize_weights(model, spec, ctx.log, whole_blocks=whole_blocks(target),
                             calibration=getattr(ctx, "calibration", None))
        ctx.counts["quantized"] = ctx.counts.get("quantized", 0) + n
        return n

    steps = [Step("quantize", f"quantize_{spec.label()}", run)]
    if target.kind == "ort" and spec.format == "int4":
        from moec.passes.lowerings.ort_quant import lower_dense_int4

        steps.append(Step("quantize", "lower_matmul_nbits", lambda m, c: lower_dense_int4(m)))  # reads the DQ's metadata
    return steps


def checkpoint_fp8_steps() -> tuple:
    """The fold before the fusions and the restore after the quantize phase of a pre-quantized
    checkpoint's FP8 weights (passes/quantize/checkpoint_fp8.py); both find nothing elsewhere."""
    from moec.compiler.pipeline import Step
    from moec.passes.quantize.checkpoint_fp8 import fold_checkpoint_fp8, restore_checkpoint_fp8

    def restore(model, ctx):
        n = restore_checkpoint_fp8(model)
        # With those --quantize fp8 took as they were: every checkpoint FP8 weight the graph holds.
        ctx.counts["checkpoint_fp8"] = sum(node.name.endswith("/checkpoint_fp8") for node in model.graph)
        return n

    return (Step("cleanup", "fold_checkpoint_fp8", lambda m, c: fold_checkpoint_fp8(m)),
            # The lowering phase's first step (it is there for the lowerings), so a graph without
            # --quantize dumps no quantize phase.
            Step("lowering", "restore_checkpoint_fp8", restore))


def calibrate_request(spec: QuantizeSpec | None, in_path, tokenizer):
    """The calibration a request needs (awq, gptq, FP8 activations), from the export at ``in_path``
    (passes/quantize/calibrate.py); None when it needs none."""
    if spec is None or not spec.calibrated:
        return None
    from moec.passes.quantize import calibration_file
    from moec.passes.quantize.calibrate import calibrate

    return calibrate(in_path, tokenizer, calibration_file(spec))


def check_checkpoint_fp8(sidecar: dict | None, spec: QuantizeSpec | None, target, in_path) -> None:
    """An export that kept its checkpoint's FP8 weights, for a TensorRT arch without FP8 tensor
    cores: named before any work."""
    quant = (sidecar or {}).get("quantization") or {}
    if quant.get("source") != "checkpoint" or not target.is_trt or target.arch in FP8_ARCHS:
        return
    raise MoecError(f"{in_path} holds its checkpoint's FP8 weights (export --fp8-weights keep); target {target} has "
                    "no FP8 tensor cores: optimize for sm89 or newer, or re-export with --fp8-weights dequantize")


def dequantize_module_weights(model, spec: QuantizeSpec) -> int:
    """Replace, in a torch ``Llama4ForCausalLM``, every weight ``spec`` quantizes by its
    dequantized value: the reference the verify stage compares a quantized graph with (the same
    blocks along the same K as the pass; a Linear's [N, K] weight is the MatMul's [K, N] one
    transposed, so its blocks are the same numbers). Returns how many weights were replaced."""
    import numpy as np
    import torch

    from moec.passes.quantize import SCOPES, WEIGHT_KINDS, dequantize

    kinds = SCOPES[spec.scope]
    count = 0
    for name, param in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            kind, axis = "experts", 1
        else:
            kind = next((k for k, p in WEIGHT_KINDS.items() if p.search(name)), None)
            axis = 1  # nn.Linear weight [N, K]
        if kind is None or kind not in kinds:
            continue
        w = param.detach().float().numpy()
        qt = spec.quantize(w, axis, spec.block_for(w.shape[axis]))
        with torch.no_grad():
            param.copy_(torch.from_numpy(np.ascontiguousarray(dequantize(qt))).to(param.dtype))
        count += 1
    return count


def check_engine_archs(sidecar: dict, archs, onnx_path) -> None:
    """`moec build` of a quantized graph for an arch that cannot run its format: named before any
    engine is built (the graph itself says nothing about the arch it was optimized for)."""
    quant = (sidecar or {}).get("quantization") or {}
    if quant.get("format") == "fp8":
        bad = [a for a in archs if a not in FP8_ARCHS]
        if bad:
            raise MoecError(f"{onnx_path} has FP8 weights (moec optimize --quantize fp8); {', '.join(bad)} has no FP8 "
                            "tensor cores: build for sm89 or newer, or re-optimize with --quantize int4 or int8")
    if quant.get("format") == "nvfp4":
        bad = [a for a in archs if a not in NVFP4_ARCHS]
        if bad:
            raise MoecError(f"{onnx_path} has NVFP4 weights (moec optimize --quantize nvfp4); {', '.join(bad)} has no "
                            "FP4 tensor cores: build for sm120 (TensorRT-RTX) or sm100+ (TensorRT), or re-optimize "
                            "with --quantize int4 or fp8")
