"""fuse_rotary: moec's real-arithmetic interleaved RoPE -> ONNX RotaryEmbedding (opset 23, interleaved=1).

What onnxscript 0.7.2 offers does not match this export: its RotaryEmbedding rules
(rules/fusion/_rotary_embedding, ort_fusions/rotary_embedding, cos_sin_cache) know only the
rotate-half form (Slice, Neg, Concat of the two halves, "interleaved=0"); the TODO in
ort_fusions/rotary_embedding.py says the interleaved form is not covered. moec's model
(models/llama4.py ``apply_rope``) rotates (even, odd) pairs, as Llama 4's complex RoPE does, and
torch 2.13's exporter writes it as::

    pairs_BSNF2 = Reshape(x_BSND)                       [B, S, N, D/2, 2]
    x0, x1 = Gather(pairs, 0, axis=-1), Gather(pairs, 1, axis=-1)
    c, s = Unsqueeze(cos_BSF, 2), Unsqueeze(sin_BSF, 2)
    out = Reshape(Concat(Unsqueeze(x0*c - x1*s, -1), Unsqueeze(x0*s + x1*c, -1), axis=-1))  [B, S, N, D]

which is exactly ONNX RotaryEmbedding with interleaved=1, a 3D input [B, S, N*D], num_heads=N and
3D caches [B, S, D/2] (no position_ids: the caches are already per token). The rule is written with
onnxscript's pattern rewriter (pattern, check, rewrite); the check refuses, with a reason, what
would change the numbers: a pair axis that is not the last, gathers that are not (0, 1), caches not
[B, S, D/2] of x's dtype, a head dim that is not static and even. onnxscript's matcher already
refuses a match whose intermediates have other consumers. cos/sin themselves are left as they are
(computed once per graph and shared by every layer), so the fused graph computes the same angles.

Where it pays: TensorRT's ONNX parser maps RotaryEmbedding to one layer (TensorRT-RTX 1.7 builds the
fused demo graph for sm89: tests/passes/test_rotary.py), replacing 13 elementwise/shape nodes per q
or k. ONNX Runtime 1.32's CPU provider runs it with the same numbers (fp32 rel err 6e-7 on the demo's
logits and cache). So it is on where opset 23 is (ort, trt-rtx), as RMSNormalization.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from moec.passes.fusions._graph import FusionLog, collect_refusals, ensure_opset

NAME = "fuse_rotary"
ROTARY_OPSET = 23
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)



class _InterleavedRope(pattern.RewriteRuleClassBase):
    def __init__(self) -> None:
        super().__init__(name="InterleavedRotaryEmbedding23", remove_nodes=True)

    def pattern(self, op, x_BSND, pair_shape, i0, i1, c_BS1F, s_BS1F, ax_re, ax_im, out_shape):
        pairs = op.Reshape(x_BSND, pair_shape, _allow_other_attributes=True, _outputs=["pairs"])
        x0 = op.Gather(pairs, i0, _outputs=["x0"])
        x1 = op.Gather(pairs, i1, _outputs=["x1"])
        real = op.Sub(op.Mul(x0, c_BS1F), op.Mul(x1, s_BS1F))
        imag = op.Add(op.Mul(x0, s_BS1F), op.Mul(x1, c_BS1F))
        stacked = op.Concat(op.Unsqueeze(real, ax_re), op.Unsqueeze(imag, ax_im), _outputs=["stacked"])
        return op.Reshape(stacked, out_shape, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x_BSND, pairs, x0, x1, i0, i1, c_BS1F, s_BS1F, ax_re, ax_im, stacked, out, **_):
        result = pattern.MatchResult()
        if x_BSND.dtype not in _FLOATS:
            return result.fail(f"x dtype {x_BSND.dtype} is not one RotaryEmbedding takes", x_BSND)
        if x_BSND.shape is None or x_BSND.shape.rank() != 4:
            return result.fail("x is not known to be a 4D [B, S, N, D] tensor", x_BSND)
        B, S, N, D = x_BSND.shape
        if not (isinstance(N, int) and isinstance(D, int) and D % 2 == 0):
            return result.fail(f"heads {N} and head dim {D} must be static, the head dim even", x_BSND)
        if pairs.shape is None or list(pairs.shape) != [B, S, N, D // 2, 2]:
            return result.fail(f"the pair view {pairs.shape} is not [B, S, N, D/2, 2] of x {x_BSND.shape}", pairs)
        if out.shape is None or list(out.shape) != list(x_BSND.shape):
            return result.fail(f"the result {out.shape} is not x's shape {x_BSND.shape}", out)
        for g, want in ((x0, 0), (x1, 1)):
            node = g.producer()
            idx = node.inputs[1].const_value
            axis = node.attributes.get_int("axis", 0)
            if axis not in (4, -1) or idx is None or idx.numpy().shape != () or int(idx.numpy()) != want:
                return result.fail(f"{node.name!r} does not take element {want} of the last (pair) axis", node)
        for ax in (ax_re, ax_im):
            a = ax.const_value
            if a is None or [int(v) for v in a.numpy().ravel()] not in ([4], [-1]):
                return result.fail("the rotated halves are not stacked on a new last axis", ax)
        if stacked.producer().attributes.get_int("axis", 0) not in (4, -1):
            return result.fail("the rotated halves are not concatenated on the last axis", stacked)
        for name, v in (("cos", c_BS1F), ("sin", s_BS1F)):
            unsq = v.producer()
            if unsq is None or unsq.op_type != "Unsqueeze" or unsq.domain not in ("", "ai.onnx"):
                return result.fail(f"the {name} factor is not an Unsqueeze of a [B, S, D/2] cache", v)
            axes = unsq.inputs[1].const_value if len(unsq.inputs) > 1 and unsq.inputs[1] is not None else None
            cache = unsq.inputs[0]
            if axes is None or [int(a) for a in axes.numpy().ravel()] not in ([2], [-2]):
                return result.fail(f"the {name} factor is not broadcast over heads (Unsqueeze axis 2)", v)
            if cache.dtype != x_BSND.dtype:
                return result.fail(f"the {name} cache is {cache.dtype}, x is {x_BSND.dtype}", cache)
            if cache.shape is None or list(cache.shape) != [B, S, D // 2]:
                return result.fail(f"the {name} cache {cache.shape} is not [B, S, D/2] = [{B}, {S}, {D // 2}]", cache)
        return result

    def rewrite(self, op, x_BSND, c_BS1F, s_BS1F, **_):
        _, _, N, D = x_BSND.shape
        # Reshapes are views: the 3D form needs no transpose, unlike the 4D [B, N, S, D] form.
        x_BSH = op.Reshape(x_BSND, op.Constant(value_ints=[0, 0, N * D]))
        rotated_BSH = op.RotaryEmbedding(
            x_BSH, c_BS1F.producer().inputs[0], s_BS1F.producer().inputs[0], interleaved=1, num_heads=N
        )
        return op.Reshape(rotated_BSH, op.Constant(value_ints=[0, 0, N, D]))


rotary_ruleset = pattern.RewriteRuleSet([_InterleavedRope.rule()])


def fuse_rotary(model: ir.Model, log: FusionLog | None = None, allow_opset_upgrade: bool = True) -> int:
    if not ensure_opset(model, ROTARY_OPSET, NAME, "RotaryEmbedding", log, allow_opset_upgrade):
        return 0
    count = rotary_ruleset.apply_to_model(model)
    collect_refusals(rotary_ruleset, model, NAME, log)
    return count
