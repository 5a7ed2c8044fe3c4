"""moec's MoE kernels: the ``moec.GroupedExperts`` op as a torch custom op (op.py), its plain-torch
semantics and CPU fallback (reference.py) and the Triton GPU kernels (moe_triton.py) with their
launch-parameter table (moe_configs.json). Importing this package imports nothing heavy."""
