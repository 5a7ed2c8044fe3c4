"""fuse_attention: softmax(q k^T * scale + mask) v with GQA -> ONNX Attention (opset 23), for ONNX Runtime.

What onnxscript 0.7.2 offers does not match this export: ort_fusions/sdpa.py, mha.py, gqa.py and
rules/fusion/_gqa.py target com.microsoft MultiHeadAttention/GroupQueryAttention and expect their
own RoPE and KV-cache shapes (rotate-half RoPE, past/present inside the op, causal masks built from
a sequence-length input); moec's export computes masks from position ids and repeats kv heads with
Unsqueeze/Expand/Reshape. So the rule is written here, with onnxscript's pattern rewriter::

    k_BNTD = Reshape(Expand(Unsqueeze(k_BKTD, 2), [B, K, N/K, T, D]), [B, N, T, D])   (same for v)
    y_BNSD = MatMul(Softmax(Add(Mul(MatMul(q_BNSD, Transpose(k_BNTD, 0,1,3,2)), scale), mask_B1ST)), v_BNTD)
      -> Attention(q_BNSD, k_BKTD, v_BKTD, mask_B1ST, scale=scale)

Unsqueeze at axis 2 then Expand repeats each kv head N/K times in a row, which is ONNX Attention's
GQA (np.repeat over heads); the check refuses any other layout, a mask that does not broadcast to
[B, N, S, T], a non-scalar scale, a softmax not over keys, a non-float dtype. onnxscript's matcher
refuses intermediates with other consumers. An fp16/bf16 export's fp32 softmax (Cast, Softmax,
Cast) becomes softmax_precision=FLOAT (``_GqaSdpaFp32Softmax``). The QK norm and temperature tuning
stay before q's Transpose, the KV-cache Concat stays outside (its output is a graph output).

The mask input stays: it comes from the position ids (chunked causal on RoPE layers, causal from
absolute key positions on NoPE layers), which ``is_causal`` cannot express (it assumes query i sits
at past_len + i and knows no chunks). It is computed once per graph and shared by the layers.

Where it pays (benchmarks/attention_fusion.py, results in attention_fusion.txt; ORT 1.32 CPU, 1 thread
on a shared 2-core machine, N=32 K=8 D=128, chunked mask, ORT graph optimizations on): decode S=1 with
T=512 keys 2.1 -> 0.7 ms, T=2048 17-20 -> 4.5-5.4 ms (two runs), about 3x; the gain is mostly the GQA
Expand that no longer materializes N/K copies of the cache. Prefill is a wash within this machine's
noise (S=T=128: 5.6 vs 5.6 and 6.1 vs 7.1 ms; S=T=512: 85 vs 79 and 88 vs 110 ms). Decode dominates
generation, so it is on by default for ``--target ort``.

Where it does not: TensorRT. TensorRT-RTX 1.7 parses ONNX Attention, but building for sm89 fails
with "Attention operation was not supported by a dedicated kernel" for the fused demo graph in fp32
and also after --precision fp16 (checked); a lone fp16 Attention node with the same mask does build
(D 16 and 128), fp32 does not. Its parser also refuses softmax_precision ("not supported in TensorRT
Attention"), so the fp16-export form cannot go there at all. TensorRT documents its own attention
fusion of the MatMul/Softmax/MatMul chain (work-with-transformers, multi-head attention fusion), which
could not be timed here (no machine of this project runs a TensorRT engine). So the fusion is off for
trt/trt-rtx targets unless OptimizeConfig.fuse_attention forces it.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from moec.passes.fusions._graph import FusionLog, collect_refusals, ensure_opset

NAME = "fuse_attention"
ATTENTION_OPSET = 23
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _ints(value: ir.Value | None) -> list[int] | None:
    t = None if value is None else ir.convenience.get_const_tensor(value)
    return None if t is None else [int(v) for v in t.numpy().ravel()]


class _GqaSdpa(pattern.RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__(name="GqaAttention23", remove_nodes=True)

    @staticmethod
    def _repeat_kv(op, x_BKTD, axes, shape5, shape4, tag):
        x5 = op.Unsqueeze(x_BKTD, axes, _outputs=[f"{tag}_5"])
        x_e = op.Expand(x5, shape5, _outputs=[f"{tag}_e"])
        return op.Reshape(x_e, shape4, _allow_other_attributes=True, _outputs=[f"{tag}_BNTD"])

    def pattern(self, op, q_BNSD, k_BKTD, v_BKTD, k_axes, k_shape5, k_shape4, v_axes, v_shape5, v_shape4, scale, mask):
        k_BNTD = self._repeat_kv(op, k_BKTD, k_axes, k_shape5, k_shape4, "k")
        v_BNTD = self._repeat_kv(op, v_BKTD, v_axes, v_shape5, v_shape4, "v")
        kt = op.Transpose(k_BNTD, _outputs=["kt"])
        scores = op.Mul(op.MatMul(q_BNSD, kt), scale)
        probs = op.Softmax(op.Add(scores, mask), _outputs=["probs"])
        return op.MatMul(probs, v_BNTD)

    def check(self, context, q_BNSD, k_BKTD, v_BKTD, k_axes, v_axes, scale, mask, kt, probs,
              k_e, v_e, k_BNTD, v_BNTD, **_):
        result = pattern.MatchResult()
        if q_BNSD.dtype not in _FLOATS or k_BKTD.dtype != q_BNSD.dtype or v_BKTD.dtype != q_BNSD.dtype:
            return result.fail(f"q/k/v dtypes {q_BNSD.dtype}/{k_BKTD.dtype}/{v_BKTD.dtype}: one float type expected", q_BNSD)
        if mask.dtype != q_BNSD.dtype:
            return result.fail(f"the additive mask is {mask.dtype}, q is {q_BNSD.dtype}", mask)
        shapes = [v.shape for v in (q_BNSD, k_BKTD, v_BKTD, k_BNTD, v_BNTD, mask)]
        if any(s is None or s.rank() != 4 for s in shapes):
            return result.fail("q, k, v, their repeats and the mask must be known 4D tensors", q_BNSD)
        B, N, S, D = q_BNSD.shape
        _, K, T, Dk = k_BKTD.shape
        if not (isinstance(N, int) and isinstance(K, int) and isinstance(D, int) and N % K == 0 and Dk == D):
            return result.fail(f"heads {N}, kv heads {K}, head dims {D}/{Dk}: static, N a multiple of K, same D", q_BNSD)
        if list(v_BKTD.shape) != list(k_BKTD.shape):
            return result.fail(f"v {v_BKTD.shape} and k {k_BKTD.shape} differ", v_BKTD)
        for tag, axes, expanded, repeated in (("k", k_axes, k_e, k_BNTD), ("v", v_axes, v_e, v_BNTD)):
            # Axis 2 then Expand: each kv head repeated N/K times in a row (ONNX Attention's GQA order).
            if _ints(axes) not in ([2], [-3]):
                return result.fail(f"{tag} is not repeated per kv head (Unsqueeze axis {_ints(axes)}, expected 2)", axes)
            if expanded.shape is None or list(expanded.shape) != [B, K, N // K, T, D]:
                return result.fail(f"{tag} expands to {expanded.shape}, expected [B, K, N/K, T, D]", expanded)
            if list(repeated.shape) != [B, N, T, D]:
                return result.fail(f"{tag} repeats to {repeated.shape}, expected [B, N, T, D]", repeated)
        if _ints_attr(kt.producer(), "perm") != [0, 1, 3, 2]:
            return result.fail("k is not transposed to [B, N, D, T]", kt)
        axis = probs.producer().attributes.get_int("axis", -1)
        if axis not in (-1, 3):
            return result.fail(f"softmax over axis {axis}, not over the keys", probs)
        s = ir.convenience.get_const_tensor(scale)
        if s is None or s.numpy().size != 1:
            return result.fail("the score scale is not a constant scalar", scale)
        mB, mN, mS, mT = mask.shape
        if mN not in (1, N) or mB not in (1, B) or mS != S or mT != T:
            return result.fail(f"the mask {mask.shape} does not broadcast to [B, N, S, T] = {[B, N, S, T]}", mask)
        return result

    def rewrite(self, op, q_BNSD, k_BKTD, v_BKTD, mask, scale, **_):
        value = float(ir.convenience.get_const_tensor(scale).numpy().ravel()[0])
        return op.Attention(q_BNSD, k_BKTD, v_BKTD, mask, scale=value)


class _GqaSdpaFp32Softmax(_GqaSdpa):
    """An fp16/bf16 export: the model's softmax runs in fp32 between two Casts (models/llama4.py),
    which Attention says with softmax_precision=FLOAT. (TensorRT's parser refuses that attribute;
    this fusion is for ONNX Runtime, which takes it.)"""

    def __init__(self) -> None:
        pattern.RewriteRuleClassBase.__init__(self, name="GqaAttention23Fp32Softmax", remove_nodes=True)

    def pattern(self, op, q_BNSD, k_BKTD, v_BKTD, k_axes, k_shape5, k_shape4, v_axes, v_shape5, v_shape4, scale, mask):
        k_BNTD = self._repeat_kv(op, k_BKTD, k_axes, k_shape5, k_shape4, "k")
        v_BNTD = self._repeat_kv(op, v_BKTD, v_axes, v_shape5, v_shape4, "v")
        kt = op.Transpose(k_BNTD, _outputs=["kt"])
        scores = op.Add(op.Mul(op.MatMul(q_BNSD, kt), scale), mask)
        probs = op.Softmax(op.Cast(scores, to=ir.DataType.FLOAT), _outputs=["probs"])
        return op.MatMul(op.Cast(probs, _outputs=["probs_low"]), v_BNTD)

    def check(self, context, q_BNSD, probs_low, **kwargs):
        result = super().check(context, q_BNSD=q_BNSD, **kwargs)
        if result and probs_low.producer().attributes.get_int("to") != q_BNSD.dtype:
            return result.fail(f"the probabilities are cast to {probs_low.dtype}, not back to q's {q_BNSD.dtype}", probs_low)
        return result

    def rewrite(self, op, q_BNSD, k_BKTD, v_BKTD, mask, scale, **_):
        value = float(ir.convenience.get_const_tensor(scale).numpy().ravel()[0])
        return op.Attention(q_BNSD, k_BKTD, v_BKTD, mask, scale=value, softmax_precision=ir.DataType.FLOAT)


def _ints_attr(node: ir.Node, name: str) -> list[int] | None:
    a = node.attributes.get(name)
    return None if a is None else list(a.value)


attention_ruleset = pattern.RewriteRuleSet([_GqaSdpa.rule(), _GqaSdpaFp32Softmax.rule()])


def fuse_attention(model: ir.Model, log: FusionLog | None = None, allow_opset_upgrade: bool = True) -> int:
    if not ensure_opset(model, ATTENTION_OPSET, NAME, "Attention", log, allow_opset_upgrade):
        return 0
    count = attention_ruleset.apply_to_model(model)
    collect_refusals(attention_ruleset, model, NAME, log)
    return count
