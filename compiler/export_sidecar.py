"""The export's sidecar (``model.moec.json``): what later stages and the runtime need to know about
a graph without loading it: model config, dtype, positions, per-layer KV cache kinds, router
precisions, tokenizer digest."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from moec.common import contract

if TYPE_CHECKING:  # export.py imports this module; the config is only named in annotations here
    from moec.compiler.export import ExportConfig


SIDECAR_FORMAT = "moec-onnx"


SIDECAR_VERSION = 1


def router_precisions(onnx_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(node name, input element type) of the router math: every TopK, and every Sigmoid fed by
    a ScatterElements (the -inf scatter of the selected logits). Reads the graph, not the weights."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path), load_external_data=False))
    types = {
        vi.name: onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)
        for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)
    }
    producer = {o: n for n in m.graph.node for o in n.output}
    found = []
    for n in m.graph.node:
        src = producer.get(n.input[0]) if n.input else None
        if n.op_type == "TopK" or (n.op_type == "Sigmoid" and src is not None and src.op_type == "ScatterElements"):
            found.append((n.name, types.get(n.input[0], "?")))
    return found


def kv_cache_entries(model, max_positions: int) -> list[dict]:
    """The sidecar's ``kv_cache``: per layer {"layer", "kind": "chunked" | "full", "slots"}; a
    full cache's slots are the most it holds (max_positions)."""
    return [{"layer": i, "kind": kind, "slots": slots or max_positions} for i, (kind, slots) in enumerate(model.cache_kinds())]


def build_sidecar(llama_config, config: ExportConfig, max_positions: int, external_data: str | None, tokenizer: bool) -> dict:
    """The runtime's view of an export. Keys every reader may rely on:

    format/version, model_config (Llama4Config.to_dict()), dtype, num_layers, moe_layers,
    num_key_value_heads, head_dim, vocab_size, max_positions, max_batch, generation
    {eos_token_ids, bos_token_id, pad_token_id, max_positions}, io {inputs, outputs},
    dynamic_dims, external_data (file name or null), tokenizer (file name or null), exporter;
    export_onnx adds tokenizer_sha256 (the checkpoint's tokenizer.json) when there is one, and
    kv_cache (``kv_cache_entries``).
    """
    import onnx
    import torch

    inputs, outputs = contract.io_names(llama_config.num_hidden_layers, config.image_token_id is not None)
    image = {} if config.image_token_id is None else {"image_token_id": config.image_token_id}
    return image | {
        "format": SIDECAR_FORMAT,
        "version": SIDECAR_VERSION,
        "model_config": llama_config.to_dict(),
        "dtype": config.dtype,
        "num_layers": llama_config.num_hidden_layers,
        "moe_layers": list(llama_config.moe_layer_indices()),
        "num_key_value_heads": llama_config.num_key_value_heads,
        "head_dim": llama_config.head_dim,
        "vocab_size": llama_config.vocab_size,
        "max_positions": max_positions,
        "max_batch": config.max_batch,
        "generation": {
            "eos_token_ids": list(llama_config.eos_token_ids),
            "bos_token_id": llama_config.bos_token_id,
            "pad_token_id": llama_config.pad_token_id,
            "max_positions": max_positions,
        },
        "io": {"inputs": inputs, "outputs": outputs},
        "dynamic_dims": {"batch": contract.DIM_BATCH, "new_tokens": contract.DIM_NEW_TOKENS, "past": contract.DIM_PAST},
        "external_data": external_data,
        "tokenizer": contract.TOKENIZER_FILE if tokenizer else None,
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": config.opset, "dynamo": True},
    }
