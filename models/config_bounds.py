"""Upper bounds on a Llama 4 config's sizes: what any machine can hold, checked when config.json is
read, naming the field that is too large.

A config.json with ``hidden_size`` 2**40 or ``num_hidden_layers`` 10**6 is not a model anyone can
run, and without a bound it ends in an allocation overflow deep in torch or in a loop that builds
a million layers for minutes. The bound for sizes is the address space of one process: x86-64 and
AArch64 give a process 47 bits of user virtual addresses (128 TiB), so weights, or one sequence's
KV cache, larger than that cannot be mapped by any machine, whatever its memory. The layer count
is bounded separately because layers cost time before they cost memory: every layer is modules
to build and ONNX nodes and KV inputs to export (the deepest released LLMs have about 126).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moec.common.errors import MoecError

if TYPE_CHECKING:
    from moec.models.config import Llama4Config

ADDRESS_SPACE_BYTES = 1 << 47  # a process's user virtual address space on x86-64 / AArch64 (4-level pages)
MAX_LAYERS = 1024  # 8x the deepest released LLM (Llama 3.1 405B: 126 layers)
_MIN_WEIGHT_BYTES = 2  # bf16/fp16: the smallest float moec loads


def check_layer_count(layers: int, source: str) -> None:
    if layers > MAX_LAYERS:
        raise MoecError(f"{source}: field 'num_hidden_layers' is {layers}, more than moec builds ({MAX_LAYERS}, 8x "
                        f"the deepest released LLM); check the value")


def _tensors(c: Llama4Config) -> list[tuple[str, int, tuple[str, ...]]]:
    """(tensor, elements, the fields its shape comes from) for every weight of the model."""
    H, V, hd = c.hidden_size, c.vocab_size, c.head_dim
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    att = ("hidden_size", "num_attention_heads", "head_dim")
    out = [("model.embed_tokens.weight", V * H, ("vocab_size", "hidden_size"))]
    if not c.tie_word_embeddings:
        out.append(("lm_head.weight", V * H, ("vocab_size", "hidden_size")))
    moe = len(c.moe_layers)
    dense = c.num_hidden_layers - moe
    E, I, I_mlp = c.num_local_experts, c.intermediate_size, c.intermediate_size_mlp
    layers = c.num_hidden_layers
    out += [
        ("self_attn (q, k, v, o) x layers", layers * (2 * H * q + 2 * H * kv), att + ("num_key_value_heads", "num_hidden_layers")),
        ("feed_forward.experts.gate_up_proj x MoE layers", moe * E * H * 2 * I, ("num_local_experts", "hidden_size", "intermediate_size")),
        ("feed_forward.experts.down_proj x MoE layers", moe * E * I * H, ("num_local_experts", "intermediate_size", "hidden_size")),
        ("feed_forward.shared_expert x MoE layers", moe * 3 * H * I, ("hidden_size", "intermediate_size")),
        ("feed_forward (dense MLP) x dense layers", dense * 3 * H * I_mlp, ("hidden_size", "intermediate_size_mlp")),
    ]
    return out


def _largest_field(c: Llama4Config, fields: tuple[str, ...]) -> str:
    return max(fields, key=lambda f: getattr(c, f))


def check_config_bounds(c: Llama4Config, source: str) -> None:
    """MoecError naming the field when the weights or one sequence's KV cache cannot fit any
    machine's address space (ADDRESS_SPACE_BYTES)."""
    tensors = _tensors(c)
    weight_bytes = sum(n for _, n, _ in tensors) * _MIN_WEIGHT_BYTES
    if weight_bytes > ADDRESS_SPACE_BYTES:
        name, n, fields = max(tensors, key=lambda t: t[1])
        field = _largest_field(c, fields)
        raise MoecError(
            f"{source}: field '{field}' ({getattr(c, field)}) is too large: the model would hold "
            f"{weight_bytes / 2**40:.0f} TiB of weights even in bf16 (largest: {name}, {n * _MIN_WEIGHT_BYTES / 2**40:.0f} "
            f"TiB, from {', '.join(fields)}), more than one process can address on any machine "
            f"({ADDRESS_SPACE_BYTES >> 40} TiB); check the value")
    kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * c.max_position_embeddings * _MIN_WEIGHT_BYTES
    if kv_bytes > ADDRESS_SPACE_BYTES:
        raise MoecError(
            f"{source}: field 'max_position_embeddings' ({c.max_position_embeddings}) is too large: one sequence's "
            f"KV cache at that length would take {kv_bytes / 2**40:.0f} TiB even in bf16, more than one process can "
            f"address on any machine ({ADDRESS_SPACE_BYTES >> 40} TiB); check the value")
