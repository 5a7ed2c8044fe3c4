"""Export without holding the checkpoint in memory: trace an uninitialised model, then give every
weight initializer of the graph a LazyTensor that reads its tensor from the checkpoint's
safetensors file when the saver writes it.

torch.export traces with fake tensors and never reads the weights' values, so the module it
traces can hold uninitialised memory (``moec.models.checkpoint.load_pretrained_lazy``: untouched
pages cost no RSS). onnx-ir's saver evaluates LazyTensors one at a time while it streams them into
the external-data file, so the peak is about the largest tensor (twice: read, and the bytes being
written) plus the libraries, whatever the number of layers. The lazy weight-layout fold
(``_fold_weight_layout_ops``) and onnxscript's optimizer run after the swap, so anything they
evaluate reads the real values, never the uninitialised ones.
"""

from __future__ import annotations

from pathlib import Path

from moec.common.errors import MoecError


def _ir_tensor(tensor, name: str):
    """An onnx-ir tensor over a CPU torch tensor's memory (bf16 through ml_dtypes, which numpy lacks)."""
    import onnx_ir as ir
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        array = tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return ir.Tensor(array, name=name)


def attach_checkpoint_weights(onnx_model, model, sources: dict[str, tuple[Path, str]], allow_nonfinite: bool = False) -> int:
    """Point every initializer that is one of ``model``'s weights at its checkpoint tensor (read
    lazily, cast to the initializer's dtype); returns how many. An initializer named after a weight
    that has no source would carry uninitialised memory into the graph: refused. Each tensor is
    checked finite as it is read (unless ``allow_nonfinite``): the export writes to a temporary
    name, so a refusal mid-save leaves nothing behind."""
    import onnx_ir as ir

    from moec.compiler.export import torch_dtype
    from moec.models.checkpoint import read_tensor

    weights = dict(model.named_parameters(remove_duplicate=False))
    dtypes = {ir.DataType.FLOAT: "fp32", ir.DataType.FLOAT16: "fp16", ir.DataType.BFLOAT16: "bf16"}
    attached = 0
    for value in onnx_model.graph.initializers.values():
        if value.name not in weights:
            continue  # a constant the trace made (the RoPE frequencies, shapes): real values already
        source = sources.get(value.name)
        if source is None:
            raise MoecError(f"export: graph weight {value.name!r} has no checkpoint tensor; this is a moec bug")
        dtype = torch_dtype(dtypes[value.dtype])

        def read(source=source, dtype=dtype, name=value.name):
            return _ir_tensor(read_tensor(source, dtype, allow_nonfinite), name)

        value.const_value = ir.LazyTensor(read, dtype=value.dtype, shape=value.shape, name=value.name)
        attached += 1
    return attached
