"""Exported MoE blocks shared by the pass tests (each export takes seconds: built once)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import moe_blocks as mb  # noqa: E402

BLOCKS = {
    "ref_k1": lambda: mb.RefMoE(k=1),
    "ref_k2": lambda: mb.RefMoE(k=2, experts=5, seed=1),
    "softmax_k2": lambda: mb.SoftmaxMoE(k=2, seed=2),
    "unrolled_in": lambda: mb.UnrolledMoE(experts=3, seed=3),
    "unrolled_out": lambda: mb.UnrolledMoE(experts=3, score_on_input=False, seed=4),
}


@pytest.fixture(scope="session")
def block_onnx(tmp_path_factory):
    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("blocks")

    def get(name: str, dtype: str = "fp32") -> Path:
        if (name, dtype) not in cache:
            cache[(name, dtype)] = mb.export_block(BLOCKS[name](), root / f"{name}_{dtype}.onnx", dtype=dtype)
        return cache[(name, dtype)]

    return get


def ort_run(model: ir.Model | Path, feeds: dict) -> list[np.ndarray]:
    """ONNX Runtime on the CPU with its own graph optimizations off (so we compare our graphs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    data = str(model) if isinstance(model, Path) else ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def fp32_reference(module, feeds: dict) -> np.ndarray:
    """``module`` (a fresh copy of an exported block, still fp32) on ``feeds["x"]`` in fp32."""
    import torch

    with torch.no_grad():
        return module.float()(torch.from_numpy(feeds["x"].astype(np.float32))).numpy()


# How much further from fp32 a rewritten fp16 graph may be than the graph it was rewritten from
# (largest relative error of one output). A fused op rounds at other points than the ops it
# replaces: measured up to 1.42x (the fused fp16 attention of the demo), 0.9-1.1x for the MoE
# fusions; a planted fault (expert weights rounded to 4 mantissa bits) gives 10x and more.
REWRITE_FACTOR = 2.0


def assert_as_close_as_unfused(after: np.ndarray, before: np.ndarray, ref: np.ndarray) -> float:
    """A rewritten low-precision graph (``after``) is no further from the fp32 reference than the
    graph it was rewritten from (``before``), up to REWRITE_FACTOR: comparing the two
    low-precision results with a fixed number would depend on the CPU's fp16 kernels."""
    err_after, err_before = rel_err(after, ref), rel_err(before, ref)
    assert err_before > 0
    ratio = err_after / err_before
    assert ratio <= REWRITE_FACTOR, f"rewritten graph {err_after:.3e} vs {err_before:.3e} from fp32 ({ratio:.2f}x)"
    return ratio


def block_input(dtype: str = "fp32", seed: int = 0, hidden: int = 16, batch: int = 2, seq: int = 5) -> dict:
    x = np.random.default_rng(seed).standard_normal((batch, seq, hidden))
    return {"x": x.astype(np.float16 if dtype == "fp16" else np.float32)}


@pytest.fixture(scope="session")
def demo_clean(demo_onnx, tmp_path_factory):
    """The demo export after moec's clean-up passes: what the fusions meet in the pipeline."""
    from moec.passes import cleanup

    model = ir.load(demo_onnx)
    for _ in range(2):
        for p in cleanup.CLEANUP_PASSES:
            p(model)
    out = tmp_path_factory.mktemp("demo_clean") / "model.onnx"
    ir.save(model, out)
    return out


def demo_feeds(model: ir.Model | Path, past: int, new: int, batch: int = 2, seed: int = 0) -> dict:
    """Demo-graph inputs for ``new`` tokens after ``past`` cached ones (positions past .. past+new-1)."""
    graph = (ir.load(model) if isinstance(model, Path) else model).graph
    rng = np.random.default_rng(seed)
    feeds = {}
    for v in graph.inputs:
        if v.name == "input_ids":
            feeds[v.name] = rng.integers(0, 250, (batch, new)).astype(np.int64)
        elif v.name == "position_ids":
            feeds[v.name] = np.tile(np.arange(past, past + new), (batch, 1)).astype(np.int64)
        else:  # past_key.i / past_value.i [B, K, P, D]; a chunked layer's ring has a fixed slot count
            slots = v.shape[2] if isinstance(v.shape[2], int) else past
            feeds[v.name] = rng.standard_normal((batch, v.shape[1], slots, v.shape[3])).astype(np.float32)
    return feeds
