"""ONNX Runtime's quantized ops for weights the quantize pass left as DequantizeLinear:
com.microsoft.QMoE for fused experts (int4 blockwise, int8 per channel) and MatMulNBits for int4
MatMul / Gemm weights.

QMoE (onnxruntime 1.32, weights_prepacked=0, quant_type "int") stores each expert's weights as
[N, K * bits / 8] bytes (K packed two nibbles a byte, low nibble first), scales [E, N] per channel
or [E, N, K / block_size] blockwise, and unsigned values with a default zero point of 2^(bits-1).
fc1 is SwiGLU-fused and interleaved like com.microsoft.MoE (swiglu_fusion=1: row 2i gate column
i, row 2i+1 up column i). moec's signed symmetric values are stored shifted by 2^(bits-1); the
asymmetric int4 zero points go in packed as QMoE's fc*_zero_points. Refused: fp8 (QMoE's fp8
takes square blocks or one scale per expert, not a scale per output channel) and any other
DequantizeLinear layout; the hybrid lowering then runs the DequantizeLinear as it is.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from moec.common.contract import QUANT_DYNAMIC_KEY
from moec.passes.fusions._graph import Refuse, is_initializer
from moec.passes.lowerings._weights import derived
from moec.passes.quantize._base import num_blocks

ORT_DOMAIN = "com.microsoft"
_INT_STORAGE = {ir.DataType.INT4: (4, True), ir.DataType.UINT4: (4, False), ir.DataType.INT8: (8, True),
                ir.DataType.UINT8: (8, False)}


@dataclasses.dataclass(frozen=True)
class Dequantized:
    """A weight that is DequantizeLinear(q, scale[, zero_point]) of initializers."""

    q: ir.Value
    scale: ir.Value
    zero_point: ir.Value | None
    axis: int
    block_size: int  # 0: DequantizeLinear's per-axis form
    dynamic: bool = False  # --quantize-activations dynamic: MatMulNBits computes with int8 activations


def dequantized(value: ir.Value) -> Dequantized | None:
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    q, scale, zp = (list(node.inputs) + [None, None])[:3]
    if not all(v is None or is_initializer(v) for v in (q, scale, zp)):
        return None
    axis, block = node.attributes.get("axis"), node.attributes.get("block_size")
    return Dequantized(q, scale, zp, axis.value if axis is not None else 1, block.value if block is not None else 0,
                       node.metadata_props.get(QUANT_DYNAMIC_KEY) == "int8")


def _kernel_block(block: int) -> bool:
    """QMoE's and MatMulNBits' block_size: a power of two >= 16."""
    return block >= 16 and not block & (block - 1)


def _unsigned(a: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    a = a.astype(np.int16)
    return (a + (1 << (bits - 1)) if signed else a).astype(np.uint8)


def _pack(a_NK: np.ndarray, bits: int) -> np.ndarray:
    """[..., K] values in [0, 2^bits) -> [..., K * bits / 8] bytes, low nibble first."""
    if bits == 8:
        return a_NK.astype(np.uint8)
    return (a_NK[..., 0::2] | (a_NK[..., 1::2] << 4)).astype(np.uint8)


def interleave_gate_up(a_EN2: np.ndarray, inter: int) -> np.ndarray:
    """[E, 2I, ...] gate rows then up rows -> rows gate0, up0, gate1, up1, ..."""
    gate, up = a_EN2[:, :inter], a_EN2[:, inter:]
    return np.stack([gate, up], axis=2).reshape(a_EN2.shape[0], 2 * inter, *a_EN2.shape[2:])


def _expert_weight(graph, d: Dequantized, name: str, interleave: bool):
    """(weights, scales, zero_points | None, bits, block) of one expert matrix [E, K, N] in
    QMoE's layout: [E, N, K*bits/8], [E, N(, K/block)], [E, N, K/block*bits/8]."""
    if d.q.dtype not in _INT_STORAGE:
        raise Refuse(f"{d.q.name} is {d.q.dtype}; com.microsoft.QMoE takes 4- or 8-bit integers per channel or block")
    bits, signed = _INT_STORAGE[d.q.dtype]
    E, K, N = (int(x) for x in d.q.shape)
    if d.axis != 1 or not d.block_size:
        raise Refuse(f"{d.q.name}: dequantized on axis {d.axis} (block {d.block_size}); QMoE blocks along K (axis 1)")
    block = d.block_size
    # 8 bit: per channel only (blockwise int8 experts run with int8 activations on the CPU, another
    # arithmetic). 4 bit: always blockwise, also where a group spans all of K (one block size for fc1 and fc2).
    per_channel = bits == 8
    if per_channel and block != K:
        raise Refuse("blockwise int8 experts: QMoE's CPU kernel runs them with int8 activations, not this arithmetic")
    if per_channel and d.zero_point is not None:
        raise Refuse("per-channel zero points: QMoE takes zero points blockwise only")
    if not per_channel and not _kernel_block(block):
        raise Refuse(f"block {block}: QMoE's block_size is a power of two >= 16")
    half = N // 2

    def rows(a_EKN):  # [E, K, N] -> [E, N, K], interleaved for fc1
        a = a_EKN.transpose(0, 2, 1)
        return interleave_gate_up(a, half) if interleave else a

    w = derived(graph, d.q, f"qmoe_{name}", (E, N, K * bits // 8),
                lambda q: _pack(rows(_unsigned(q, bits, signed)), bits), dtype=ir.DataType.UINT8)
    kb = num_blocks(K, block)  # QMoE takes a shorter last block: K need not be a multiple of it
    scale_shape = (E, N) if per_channel else (E, N, kb)
    s = derived(graph, d.scale, f"qmoe_{name}", scale_shape,
                lambda a: rows(a).reshape(scale_shape))
    zp = None
    if d.zero_point is not None:
        zp = derived(graph, d.zero_point, f"qmoe_{name}", (E, N, (kb * bits + 7) // 8),
                     lambda z: _pack_padded(rows(_unsigned(z, bits, signed)), bits), dtype=ir.DataType.UINT8)
    return w, s, zp, bits, 0 if per_channel else block


def _pack_padded(a: np.ndarray, bits: int) -> np.ndarray:
    if bits == 4 and a.shape[-1] % 2:
        a = np.concatenate([a, np.zeros((*a.shape[:-1], 1), a.dtype)], axis=-1)
    return _pack(a, bits)


def quantized_experts(pair) -> tuple[Dequantized, Dequantized] | None:
    gu, down = dequantized(pair.w_gate_up_EHI2), dequantized(pair.w_down_EIH)
    if gu is None and down is None:
        return None
    if gu is None or down is None:
        raise Refuse("only one of the two expert weights is quantized; QMoE quantizes both")
    return gu, down


def qmoe(op, pair, x_in, router, k: int, normalize: int, quantized: tuple[Dequantized, Dequantized]):
    """com.microsoft.QMoE for a Llama 4 / Mixtral pair whose routing ort.py already mapped."""
    graph = pair.experts.graph
    gu, down = quantized
    fc1, s1, z1, bits1, block1 = _expert_weight(graph, gu, "fc1", interleave=True)
    fc2, s2, z2, bits2, block2 = _expert_weight(graph, down, "fc2", interleave=False)
    if (bits1, block1) != (bits2, block2):
        raise Refuse(f"gate_up ({bits1} bit, block {block1}) and down ({bits2} bit, block {block2}) differ; "
                     "QMoE takes one block size")
    if s1.dtype != pair.x_TH.dtype:
        raise Refuse(f"scales are {s1.dtype}, the hidden state {pair.x_TH.dtype}; QMoE takes them in one dtype")
    attrs = dict(k=k, activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                 expert_weight_bits=bits1, activation_alpha=1.0, activation_beta=0.0)
    if block1:
        attrs["block_size"] = block1
    inputs = [x_in, router, fc1, s1, None, fc2, s2, None, None, None, None]
    if z1 is not None or z2 is not None:
        inputs += [z1, z2]
    return op.QMoE(*inputs, **attrs, _domain=ORT_DOMAIN)


# --- dense weights -----------------------------------------------------------------------------


def matmul_nbits(graph: ir.Graph, node: ir.Node) -> tuple[list, dict] | None:
    """MatMulNBits inputs and attributes for a MatMul / Gemm whose weight is a blockwise int4
    DequantizeLinear (None when it is anything else: it then runs as DequantizeLinear -> MatMul)."""
    d = dequantized(node.inputs[1])
    if d is None or d.q.dtype not in (ir.DataType.INT4, ir.DataType.UINT4) or not d.block_size:
        return None
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value
    if node.op_type == "Gemm":
        extra = [a for a in ("alpha", "beta", "transA") if node.attributes.get(a) is not None
                 and node.attributes[a].value != {"alpha": 1.0, "beta": 1.0, "transA": 0}[a]]
        if extra or (len(node.inputs) > 2 and node.inputs[2] is not None):
            return None
    k_axis = 1 if trans else 0
    if d.axis != k_axis:
        return None
    if not _kernel_block(d.block_size):
        return None
    shape = tuple(int(x) for x in d.q.shape)
    K, N = (shape[1], shape[0]) if trans else shape
    return _nbits_inputs(graph, d, node.inputs[0], K, N, (lambda a: a) if trans else (lambda a: a.T), "matmulnbits")


def matmul_nbits_expert(graph: ir.Graph, d: Dequantized, e: int, x: ir.Value) -> tuple[list, dict]:
    """MatMulNBits inputs and attributes for expert ``e`` of a stacked [E, K, N] expert weight that
    is an int4 DequantizeLinear blocked along K (axis 1): the caller has checked
    ``nbits_expert_refusal`` for the layer first (before any expert's initializers are derived)."""
    E, K, N = (int(x) for x in d.q.shape)
    return _nbits_inputs(graph, d, x, K, N, lambda a: a[e].T, f"split{e}_nbits")


def nbits_expert_refusal(d: Dequantized) -> str | None:
    """Why a stacked expert weight cannot go to MatMulNBits one expert at a time (None: it can)."""
    if d.q.dtype in (ir.DataType.INT8, ir.DataType.UINT8):
        # Measured: 8-bit MatMulNBits with float activations (accuracy_level 0) took 68-176 ms for one
        # 2048 x 4096 token where fp32 MatMul took 4.7 (2 threads, AVX2; quant_decode_speed_split.md).
        return (f"{d.q.name} is 8-bit: ONNX Runtime's 8-bit MatMulNBits with float activations is slower than "
                "fp32 on the CPU; com.microsoft.QMoE takes int8 experts")
    if d.q.dtype not in _INT_STORAGE or d.axis != 1 or not d.block_size:
        return (f"{d.q.name} ({d.q.dtype}, axis {d.axis}, block {d.block_size}): MatMulNBits takes int4 blocked "
                "along K")
    if not _kernel_block(d.block_size):
        return f"{d.q.name}: block {d.block_size}; MatMulNBits' block_size is a power of two >= 16"
    return None


def _nbits_inputs(graph: ir.Graph, d: Dequantized, x: ir.Value, K: int, N: int, to_NK, tag: str) -> tuple[list, dict]:
    """MatMulNBits' packed B [N, K/block, block*bits/8], scales [N, K/block] and packed zero points
    from a DequantizeLinear's initializers; ``to_NK`` picks and transposes the [K, N] matrix (and
    its [K/block, N] scales) out of the stored arrays."""
    bits, signed = _INT_STORAGE[d.q.dtype]
    block = d.block_size
    kb = num_blocks(K, block)

    def packed_b(q):
        # MatMulNBits stores whole blocks: a shorter last block is padded (with the value 0; the
        # kernel reads K elements of it).
        q_NK = to_NK(_unsigned(q, bits, signed))
        q_NK = np.pad(q_NK, ((0, 0), (0, kb * block - K)), constant_values=1 << (bits - 1))
        return _pack(q_NK, bits).reshape(N, kb, block * bits // 8)

    b = derived(graph, d.q, tag, (N, kb, block * bits // 8), packed_b, dtype=ir.DataType.UINT8)
    scales = derived(graph, d.scale, tag, (N, kb), lambda s: np.ascontiguousarray(to_NK(s)))
    inputs = [x, b, scales]
    if d.zero_point is not None:
        inputs.append(derived(graph, d.zero_point, tag, (N, (kb * bits + 7) // 8),
                              lambda z: _pack_padded(to_NK(_unsigned(z, bits, signed)), bits),
                              dtype=ir.DataType.UINT8))
    attrs = dict(K=K, N=N, bits=bits, block_size=block)
    if d.dynamic:
        attrs["accuracy_level"] = 4  # int8 activations, quantized per row and block at run time
    return inputs, attrs


def lower_dense_int4(model: ir.Model) -> int:
    """Every MatMul / Gemm on a blockwise int4 DequantizeLinear -> com.microsoft.MatMulNBits."""
    from moec.passes.fusions._graph import insert_and_replace, name_new_nodes, remove_dead
    from moec.passes.ops import OpBuilder

    count = 0
    for node in list(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            continue
        found = matmul_nbits(model.graph, node)
        if found is None:
            continue
        inputs, attrs = found
        op = OpBuilder()
        out = op.MatMulNBits(*inputs, **attrs, _domain=ORT_DOMAIN)
        out.dtype, out.shape = node.outputs[0].dtype, node.outputs[0].shape
        name_new_nodes(op.nodes, f"{node.name}/matmul_nbits")
        insert_and_replace(model.graph, node, op.nodes, [node.outputs[0]], [out])
        count += 1
    if count:
        remove_dead(model)
        model.opset_imports.setdefault(ORT_DOMAIN, 1)
    return count
