"""Contracts between stages, fixed in one place.

Export writes them, the passes keep them, the build stage and every runtime backend read them.
Change a value here and every stage follows; never spell one of these strings anywhere else.
"""

from __future__ import annotations

from pathlib import Path

# --- ONNX graph inputs and outputs of a moec export -------------------------------------------
# One graph serves prefill (S > 1) and decode (S == 1); the KV cache is explicit.
INPUT_IDS = "input_ids"  # int64 [B, S]
POSITION_IDS = "position_ids"  # int64 [B, S], absolute positions of the new tokens
LOGITS = "logits"  # [B, S, V]


def past_key(layer: int) -> str:  # [B, KVH, P, D]
    return f"past_key.{layer}"


def past_value(layer: int) -> str:  # [B, KVH, P, D]
    return f"past_value.{layer}"


def present_key(layer: int) -> str:  # [B, KVH, P + S, D]
    return f"present_key.{layer}"


def present_value(layer: int) -> str:  # [B, KVH, P + S, D]
    return f"present_value.{layer}"


# Optional input of a text graph exported for image prompts: [rows, hidden], one row per <|patch|> token of the
# new tokens (0 rows in decode steps), placed over those tokens' embeddings.
IMAGE_FEATURES = "image_features"
DIM_IMAGE_ROWS = "image_rows"


def io_names(num_layers: int, image_features: bool = False) -> tuple[list[str], list[str]]:
    """Graph input and output names, in order, of a moec export with ``num_layers`` layers."""
    inputs, outputs = [INPUT_IDS, POSITION_IDS] + ([IMAGE_FEATURES] if image_features else []), [LOGITS]
    for i in range(num_layers):
        inputs += [past_key(i), past_value(i)]
        outputs += [present_key(i), present_value(i)]
    return inputs, outputs


# Names of the dynamic dimensions in every export.
DIM_BATCH = "batch"
DIM_NEW_TOKENS = "new_tokens"
DIM_PAST = "past_len"

# --- Files written beside an exported / optimized .onnx ----------------------------------------
# model.onnx            the graph
# model.onnx.data       external weights (when written externally)
# model.moec.json       what the runtime needs: model config, generation settings, I/O names, dtype
# tokenizer.json        copied from the checkpoint when it has one


# Sidecar key an optimized graph for ONNX Runtime may carry: the layers whose attention is
# com.microsoft.GroupQueryAttention over their cache (passes/lowerings/ort_gqa.py); the ONNX Runtime
# backend binds those layers' ring caches as their own presents (updated in place).
GQA_LAYERS = "gqa_layers"


def sidecar_path(onnx_path: str | Path) -> Path:
    """The moec metadata file that travels with ``onnx_path``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".moec.json")


TOKENIZER_FILE = "tokenizer.json"
ENGINE_MANIFEST = "manifest.json"

# --- moec's own ONNX domain --------------------------------------------------------------------
MOEC_DOMAIN = "moec"
MOEC_OPSET_VERSION = 1
OP_MOE_GATING = "MoEGating"
OP_GROUPED_EXPERTS = "GroupedExperts"

# --- The TensorRT plugin the trt-plugin lowering emits and runtime/ implements ------------------
PLUGIN_NAME = "MoecGroupedExperts"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "moec"

# --- Multi-rank artifacts (moec optimize --tp/--ep, moec build of their folder) ------------------
LAYER_CHAIN_MANIFEST = "chain.json"  # `moec build --layers-per-engine`: the chain of layer-range engines
PARALLEL_MANIFEST = "parallel.json"  # world size, mapping, source and per-rank file hashes
PARALLEL_FORMAT = "moec-parallel"  # parallel.json's "format"
PARALLEL_ENGINES_FORMAT = "moec-parallel-engines"  # parallel.json of `moec build` over a partition folder
PARALLEL_METADATA_KEY = "moec.parallel"  # ONNX metadata_props of a rank graph: its rank and partition id
DIST_COLLECTIVE = "DistCollective"  # TensorRT's collective op (default domain), passes/partition/collectives.py


def rank_onnx(rank: int) -> str:
    return f"rank{rank}.onnx"

# --- Weight quantization names (moec.passes.quantize defines the formats; the CLI offers these
# names without importing the passes, which pull in onnx-ir: `moec --help` stays fast) --------
QUANT_FORMATS = ("int4", "int8", "fp8", "nvfp4")
QUANT_SCOPES = ("experts", "mlp", "all")
INT4_GROUPS = (32, 64, 128)
QUANT_METHODS = ("rtn", "clip", "awq", "gptq", "awq-gptq")  # int4 rounding: passes/quantize/clip.py, awq.py, gptq.py
QUANT_ACTIVATIONS = ("none", "static", "static-no-down", "dynamic")  # fp8: passes/quantize/fp8_act.py; dynamic: int4 on ort
# The DequantizeLinear metadata key by which the quantize pass tells the ort lowerings to compute with int8 activations.
QUANT_DYNAMIC_KEY = "moec.activations"
