"""moec optimize holds one tensor at a time, not the model: its peak traced allocation grows far
less than the weights when the layer count grows (measured at Scout's real size it is a flat
120 MB for 1, 2 and 4 layers of 4.49 GB each: benchmarks/results/memory_scale.md).

tracemalloc sees numpy's allocations (every copy, cast, transpose or concatenation of a weight)
and not the pages of the memory-mapped external data, which are the file's own: so the peak is
the copies optimize makes, which is what would grow if it loaded every weight at once.
"""

from __future__ import annotations

import tracemalloc

import pytest

from moec.compiler.export import ExportConfig, export_onnx
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.models import Llama4Config
from moec.models.demo import write_demo_checkpoint

FEW, MANY = 1, 2
TARGETS = ("trt-rtx:sm89", "ort")


def _config(layers: int) -> Llama4Config:
    # Every layer MoE, with experts large enough (48 MiB of fp32 a layer) that the weights, not
    # the graph's Python objects (which grow too, about 3 MiB a layer), dominate the difference.
    return Llama4Config.preset("llama4-tiny").replace(
        num_hidden_layers=layers, hidden_size=128, intermediate_size=2048, num_local_experts=16,
        interleave_moe_layer_step=1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = {}
    for layers in (FEW, MANY):
        root = tmp_path_factory.mktemp(f"opt_mem_{layers}")
        ckpt = write_demo_checkpoint(root / "ckpt", _config(layers))
        onnx_path = root / "onnx" / "model.onnx"
        export_onnx(ckpt, onnx_path, ExportConfig(dtype="fp32", external_data_threshold_bytes=0))
        out[layers] = onnx_path
    return out


def _weight_bytes(onnx_path) -> int:
    return onnx_path.with_name(onnx_path.name + ".data").stat().st_size


def _peak_traced(onnx_path, target: str) -> int:
    out = onnx_path.with_name(f"opt-{target.replace(':', '-')}.onnx")
    tracemalloc.start()
    try:
        optimize_onnx(onnx_path, out, OptimizeConfig(target=target))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _growth(exports, target: str) -> tuple[int, int]:
    """(growth of the peak, growth of the weights) from FEW to MANY layers."""
    peaks = {n: _peak_traced(path, target) for n, path in exports.items()}
    return peaks[MANY] - peaks[FEW], _weight_bytes(exports[MANY]) - _weight_bytes(exports[FEW])


@pytest.mark.parametrize("target", TARGETS)
def test_optimize_peak_does_not_grow_with_the_weights(exports, target):
    peak_growth, weight_growth = _growth(exports, target)
    assert weight_growth > 40 << 20  # the model is what this test says it is
    # Loading every weight at once would grow the peak by at least the weights' growth.
    assert peak_growth < weight_growth / 4, (
        f"optimize's peak traced allocation grew {peak_growth / 2**20:.1f} MiB for "
        f"{weight_growth / 2**20:.1f} MiB more weights ({FEW} -> {MANY} layers)")


def test_measure_fires_when_every_weight_is_held(exports, monkeypatch):
    """The same measure fails a pipeline that copies every weight into memory before the passes."""
    import moec.compiler.pipeline as pipeline

    held = []
    real_run = pipeline.run_passes

    def run_holding_weights(model, *args, **kwargs):
        held.extend(v.const_value.numpy().copy() for v in model.graph.initializers.values()
                    if v.const_value is not None)
        return real_run(model, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run_passes", run_holding_weights)
    peak_growth, weight_growth = _growth(exports, "trt-rtx:sm89")
    assert peak_growth >= weight_growth / 4
