"""Graph passes over exported ONNX models (onnx-ir; onnxscript's rewriter/optimizer where they fit).

- ``ops``: schemas and standard-op bodies of moec.MoEGating / moec.GroupedExperts.
- ``cleanup``: constant folding, dead code, identities, shape simplification (library passes).
- ``fusions``: ``fuse_moe_gating``, ``fuse_grouped_experts`` (moec ops); ``fuse_rms_norm``, ``fuse_rotary``,
  ``fuse_attention`` (standard opset-23 ops); each ``fuse_x(model) -> int``.
- ``precision``: fp32 -> fp16/bf16 with the routing kept fp32.
- ``targets`` and ``lowerings``: what each target runs (ort, gather, dense, trt-native, trt-plugin).

The pass manager and the ``moec optimize`` stage live in ``moec.compiler.pipeline``. Nothing here
imports the runtime or the torch model code.
"""
