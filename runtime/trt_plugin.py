"""moec's TensorRT plugin: the ``moec.GroupedExperts`` op inside a TensorRT engine.

The trt-plugin lowering emits one node ``op_type=PLUGIN_NAME`` in domain ``PLUGIN_NAMESPACE``
(plugin_version ``PLUGIN_VERSION``, common/contract.py) with inputs (hidden_TH, expert_ids_TK
int32, scores_TK, w_gate_up_EHI2, w_down_EIH) and the attribute ``score_on_input``. The ONNX
parser resolves such a node to the creator registered here under the same name, version and
namespace.

Two implementations of one plugin identity:
- class-based (``trt.IPluginV3`` with the OneCore/OneBuild/OneRuntime capabilities and an
  ``IPluginCreatorV3One``): works with ``tensorrt`` and ``tensorrt_rtx``. At enqueue it wraps the
  device pointers as torch tensors and runs ``torch.ops.moec.grouped_experts`` (the Triton
  kernels) on TensorRT's stream, so an engine using it needs Python, torch and Triton at run time.
- quickly deployable (``tensorrt.plugin``, full TensorRT >= 10.9 only): see
  ``register_quickly_deployable``. It registers the shape/type descriptor and a JIT (Python)
  implementation; it has NO ahead-of-time implementation: ``trtp.aot_impl`` describes exactly one
  kernel launch over (inputs, scalars, outputs) with no workspace (NVIDIA's QDP sample: it returns
  one kernel name, one PTX, one KernelLaunchParams), and this op needs four launches (grouping or
  two alignment launches, gate/up GEMM, down GEMM) and scratch buffers between them. A one-launch
  variant without scratch would recompute the gate/up GEMM once per output column block (about
  40x the weight reads at H=5120). The AOT route is a chain of single-launch QDP plugins, one per
  kernel, with the intermediates as plugin outputs and the zeroed fp32 accumulators passed on
  through QDP's output-to-input aliasing; the PTX side exists (runtime/kernels/aot.py compiles
  each launch for a target arch without a GPU). It is not built: no TensorRT that can import
  ``tensorrt.plugin`` exists on this project's machines (full TensorRT cannot be installed, see
  shared/FACTS.md; TensorRT-RTX's module is import stubs), so it could not be run once. This
  registration is import-guarded and untested for the same reason.

TensorRT for RTX (1.7.1, checked on the CPU here): its INetworkDefinition has no add_plugin_v3, and
when its ONNX parser meets a node for a registered Python IPluginV3 it calls the creator, logs
"Successfully created plugin: MoecGroupedExperts" and then aborts the whole process with
"terminate called without an active exception" (SIGABRT) before any other plugin method runs; the
same happens for a one-input identity plugin. Under gdb (2026-11-27) std::terminate is called from
inside libtensorrt_onnxparser_rtx.so itself (eight stripped parser frames under the Python parse
call), after create_plugin returns and before get_capability_interface is asked for anything.
TensorRT-RTX's Python INetworkDefinition has no add_plugin_v2/v3 either (the library exports
addPluginV3, the bindings do not), so no route adds a Python plugin layer there. The RTX wheel's
``tensorrt_rtx.plugin`` (quickly deployable plugins) is a set of import stubs: nothing of QDP's JIT
or AOT path can run with it. ``register_plugin`` therefore refuses tensorrt_rtx with a MoecError
unless forced (tests/runtime/test_plugin_trt.py records the abort in a subprocess).

Importing this module registers the class-based plugin with ``tensorrt`` when that is already
imported (the build and runtime stages import theirs first); it never imports a TensorRT flavour
itself. ``register_plugin(trt_module)`` does it explicitly.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from moec.common.contract import PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from moec.common.errors import MoecError

TRT_MODULES = ("tensorrt", "tensorrt_rtx")
NUM_INPUTS = 5  # hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH

# Python plugin objects must outlive TensorRT's use of them: TensorRT holds raw pointers only.
_CREATORS: dict[str, Any] = {}
_CLASSES: dict[str, tuple[type, type]] = {}


def plugins_available(trt_module) -> set[tuple[str, str, str]]:
    """(name, version, namespace) of every plugin creator registered in ``trt_module``'s registry."""
    registry = trt_module.get_plugin_registry()
    return {(c.name, str(c.plugin_version), c.plugin_namespace) for c in registry.all_creators if c is not None}


def plugin_identity() -> tuple[str, str, str]:
    return (PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE)


RTX_ABORT = (
    "TensorRT for RTX aborts the process (\"terminate called without an active exception\") when its ONNX "
    "parser adds a Python IPluginV3 layer, so moec's {name} plugin cannot be used with it: build for TensorRT-RTX "
    "with a lowering that needs no plugin (moec optimize --moe-lowering hybrid, the default, gather or dense), or build with full TensorRT"
)


def register_plugin(trt_module, *, force: bool = False) -> Any:
    """Register the class-based plugin's creator with ``trt_module`` (``tensorrt`` or
    ``tensorrt_rtx``); idempotent. Returns the creator.

    For tensorrt_rtx this raises MoecError unless ``force``: a registered Python plugin turns an
    ONNX parse into a process abort there (see the module docstring), and a clear error before the
    build beats a crash in the middle of it."""
    key = trt_module.__name__
    if key == "tensorrt_rtx" and not force:
        raise MoecError(RTX_ABORT.format(name=PLUGIN_NAME))
    if key in _CREATORS:
        return _CREATORS[key]
    _, creator_cls = _plugin_classes(trt_module)
    creator = creator_cls()
    registry = trt_module.get_plugin_registry()
    if plugin_identity() not in plugins_available(trt_module):
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise MoecError(
                f"{key} refused to register plugin {PLUGIN_NAMESPACE}::{PLUGIN_NAME} v{PLUGIN_VERSION}; "
                f"see TensorRT's log above for the reason"
            )
    _CREATORS[key] = creator
    return creator


register = register_plugin  # the name compiler/build/network.py looks up


def _register_with_imported_flavours() -> None:
    module = sys.modules.get("tensorrt")
    if module is not None and hasattr(module, "IPluginV3"):
        register_plugin(module)


# --- enqueue: TensorRT device pointers as torch tensors ---------------------------------------


class _DeviceArray:
    """The CUDA array interface over memory TensorRT owns, so torch can view it without a copy
    (torch has no public from-pointer constructor; cupy would do the same at the cost of a dependency)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape, "typestr": typestr, "data": (int(ptr), False), "version": 3, "strides": None,
        }


def _torch_view(ptr: int, dims, trt_dtype, trt_module):
    import torch

    shape = tuple(int(d) for d in dims)
    dt = trt_module.DataType
    # The interface has no bfloat16 type string: view the 2-byte words as int16, then reinterpret.
    table = {
        dt.FLOAT: ("<f4", None), dt.HALF: ("<f2", None), dt.BF16: ("<i2", torch.bfloat16),
        dt.INT32: ("<i4", None), dt.INT64: ("<i8", None),
    }
    if trt_dtype not in table:
        raise MoecError(f"{PLUGIN_NAME}: tensor dtype {trt_dtype} is not supported")
    typestr, view_as = table[trt_dtype]
    t = torch.as_tensor(_DeviceArray(ptr, shape, typestr), device="cuda")
    return t.view(view_as) if view_as is not None else t


def run_grouped_experts(hidden, expert_ids, scores, w_gate_up, w_down, out, score_on_input: bool) -> None:
    """The plugin's enqueue body on torch tensors: [..., H] tokens (any leading dims), the op on
    the current stream, the result written into ``out``. Shared with the CPU tests, which run it
    on CPU tensors (the op's CPU fallback) since no engine can execute on this project's machines."""
    from moec.runtime.kernels.op import grouped_experts

    H = hidden.shape[-1]
    K = expert_ids.shape[-1]
    y = grouped_experts(
        hidden.reshape(-1, H), expert_ids.reshape(-1, K), scores.reshape(-1, K), w_gate_up, w_down,
        score_on_input=score_on_input,
    )
    out.copy_(y.view(out.shape))


def _int_field(fields, name: str, default: int) -> int:
    for f in fields or []:
        if f.name == name:
            return int(np.asarray(f.data).reshape(-1)[0])
    return default


def _plugin_classes(trt):
    """The plugin and creator classes for one TensorRT flavour (they must derive from that
    module's own base classes)."""
    if trt.__name__ in _CLASSES:
        return _CLASSES[trt.__name__]

    class MoecGroupedExpertsPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, score_on_input: int = 1, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = 1
            # One timing entry serves every instance with the same attributes.
            self.timing_cache_id = f"score_on_input={int(score_on_input)}"
            self.score_on_input = int(score_on_input)
            self.phase = phase

        # --- core / serialization
        def get_capability_interface(self, type):
            return self

        def clone(self):
            return MoecGroupedExpertsPlugin(self.score_on_input, self.phase)

        def get_fields_to_serialize(self):
            return trt.PluginFieldCollection([
                trt.PluginField("score_on_input", np.array([self.score_on_input], dtype=np.int32),
                                trt.PluginFieldType.INT32),
            ])

        # --- build
        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            floats = (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16)
            hidden_type = in_out[0].desc.type
            if pos == 0:
                return desc.type in floats
            if pos == 1:  # expert_ids_TK
                return desc.type in (trt.DataType.INT32, trt.DataType.INT64)
            if pos == 2:  # scores_TK: float32 or the hidden dtype (passes/ops.py)
                return desc.type in (trt.DataType.FLOAT, hidden_type)
            return desc.type == hidden_type  # both weights and the output

        def configure_plugin(self, inputs, outputs):
            pass

        def get_workspace_size(self, inputs, outputs):
            return 0  # intermediates come from torch's caching allocator on the same stream

        def get_valid_tactics(self):
            return []

        # --- runtime
        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            views = [_torch_view(inputs[i], input_desc[i].dims, input_desc[i].type, trt) for i in range(NUM_INPUTS)]
            out = _torch_view(outputs[0], output_desc[0].dims, output_desc[0].type, trt)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                run_grouped_experts(*views, out, bool(self.score_on_input))

    class MoecGroupedExpertsCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField("score_on_input", np.array([], dtype=np.int32), trt.PluginFieldType.INT32),
            ])

        def create_plugin(self, name, fields, phase):
            score_on_input = _int_field(fields, "score_on_input", 1)
            if score_on_input not in (0, 1):
                raise MoecError(f"{PLUGIN_NAME} node {name}: score_on_input must be 0 or 1, got {score_on_input}")
            return MoecGroupedExpertsPlugin(score_on_input, phase)

    _CLASSES[trt.__name__] = (MoecGroupedExpertsPlugin, MoecGroupedExpertsCreator)
    return _CLASSES[trt.__name__]


# --- quickly deployable plugin (full TensorRT >= 10.9) -----------------------------------------

_QDP_REGISTERED = False


def register_quickly_deployable() -> bool:
    """Register the op through ``tensorrt.plugin`` (descriptor + JIT implementation) when full
    TensorRT with that module is importable; returns whether it did. Untested here (no full
    TensorRT on this project's machines). The class-based creator and this one share the plugin
    identity, so a process uses one or the other, not both."""
    global _QDP_REGISTERED
    if _QDP_REGISTERED:
        return True
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError:
        return False
    plugin_id = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

    @trtp.register(plugin_id)
    def _desc(hidden_TH: trtp.TensorDesc, expert_ids_TK: trtp.TensorDesc, scores_TK: trtp.TensorDesc,
              w_gate_up_EHI2: trtp.TensorDesc, w_down_EIH: trtp.TensorDesc, score_on_input: int) -> trtp.TensorDesc:
        return hidden_TH.like()

    @trtp.autotune(plugin_id)
    def _autotune(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, outputs):
        # Positions: hidden, ids, scores, gate_up, down, out; "|" lists alternatives per position.
        return [
            trtp.AutoTuneCombination("BF16, INT32, FP32, BF16, BF16, BF16"),
            trtp.AutoTuneCombination("BF16, INT32, BF16, BF16, BF16, BF16"),
            trtp.AutoTuneCombination("FP16, INT32, FP32, FP16, FP16, FP16"),
            trtp.AutoTuneCombination("FP16, INT32, FP16, FP16, FP16, FP16"),
        ]

    @trtp.impl(plugin_id)
    def _impl(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input: int, outputs, stream):
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            views = [
                _torch_view(t.data_ptr, t.shape, t.dtype, trt)
                for t in (hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH)
            ]
            out = _torch_view(outputs[0].data_ptr, outputs[0].shape, outputs[0].dtype, trt)
            run_grouped_experts(*views, out, bool(score_on_input))

    _QDP_REGISTERED = True
    return True


_register_with_imported_flavours()
