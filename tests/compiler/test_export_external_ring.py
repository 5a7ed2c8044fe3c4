"""An export whose weights go to external data keeps a ring cache's slot constants in the graph:
strict shape inference (the export's own check) reads them for data propagation and cannot read
external data. Before, every external export with a ring of more than 32 slots failed there."""

from __future__ import annotations

import json

import numpy as np
import onnx

from moec.compiler.export import ExportConfig, export_onnx


def test_external_export_with_a_64_slot_ring_passes_its_check_and_runs(tmp_path):
    from moec.models.demo import write_demo_checkpoint
    from moec.runtime.ort_backend import OrtBackend

    ckpt = tmp_path / "ckpt"
    write_demo_checkpoint(ckpt, preset="llama4-tiny", seed=0)
    config = json.loads((ckpt / "config.json").read_text())
    config["attention_chunk_size"] = 64  # int64 slot constants of 512 bytes: over onnx-ir's 256-byte default
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "onnx" / "model.onnx"
    result = export_onnx(ckpt, out, ExportConfig(dtype="fp32", external_data_threshold_bytes=0))
    assert result.external_data_path is not None and result.external_data_path.is_file()
    model = onnx.load(str(out), load_external_data=False)
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert any(t.data_type == onnx.TensorProto.INT64 and 64 in t.dims for t in inline)
    backend = OrtBackend.from_onnx(out)
    logits, _ = backend.forward(np.array([[1, 2, 3]]), np.array([[0, 1, 2]]), backend.init_cache(1))
    assert np.isfinite(logits).all()
