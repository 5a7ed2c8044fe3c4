"""The vision export at real size: Scout's and Maverick's towers exceed protobuf's 2 GiB in fp32, so the export
writes their weights as external data (OUT.vision.onnx.data). Sized from config.json on the meta device (no real
weights here); the writing path itself is checked on the tiny demo with the threshold at 0."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from moec.compiler.export_vision import VisionExportConfig, export_vision_onnx, vision_weight_bytes
from moec.models.demo import write_demo_checkpoint

CONFIGS = Path(__file__).resolve().parents[3] / "shared" / "llama4-configs"
if not CONFIGS.is_dir():  # a worktree beside the project's shared folder, or the main checkout under /work
    CONFIGS = Path("/work/shared/llama4-configs")
PROTOBUF_LIMIT = 2**31


@pytest.mark.parametrize("name", ["Llama-4-Scout-17B-16E-Instruct", "Llama-4-Maverick-17B-128E-Instruct"])
def test_real_vision_towers_exceed_protobuf_in_fp32_and_go_external(name):
    path = CONFIGS / f"{name}.config.json"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    hf = json.loads(path.read_text())
    fp32 = vision_weight_bytes(hf, "fp32")
    assert fp32 > PROTOBUF_LIMIT > VisionExportConfig().external_data_threshold_bytes
    assert vision_weight_bytes(hf, "fp16") * 2 == fp32
    # The count is the real tower's: transformers' vision model + projector have the same parameters.
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.Llama4Config.from_dict(hf)
    with torch.device("meta"):
        reference = [transformers.models.llama4.modeling_llama4.Llama4VisionModel(config.vision_config),
                     transformers.models.llama4.modeling_llama4.Llama4MultiModalProjector(config)]
    reference_params = sum(p.numel() for m in reference for p in m.parameters())
    from moec.models.vision import VisionConfig, VisionTower

    with torch.device("meta"):
        ours = VisionTower(VisionConfig.from_hf_dict(hf))
    assert sum(p.numel() for p in ours.parameters()) == reference_params
    assert fp32 == 4 * sum(t.numel() for t in (*ours.parameters(), *ours.buffers()))


def test_export_over_the_threshold_writes_the_weights_beside_the_graph(tmp_path):
    import onnxruntime as ort

    ckpt = write_demo_checkpoint(tmp_path / "ckpt", layout="conditional_generation", vision=True)
    inline = export_vision_onnx(ckpt, tmp_path / "inline" / "m.vision.onnx")
    external = export_vision_onnx(ckpt, tmp_path / "external" / "m.vision.onnx",
                                  VisionExportConfig(external_data_threshold_bytes=0))
    assert sorted(p.name for p in external.parent.iterdir()) == ["m.vision.moec.json", "m.vision.onnx",
                                                                 "m.vision.onnx.data"]
    assert sorted(p.name for p in inline.parent.iterdir()) == ["m.vision.moec.json", "m.vision.onnx"]
    graph = onnx.load(external, load_external_data=False).graph
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.vision.onnx.data"}
    # The meta-device size is what the export holds: the tower's weights, plus the exporter's few shape and
    # scalar constants (int64, a few hundred bytes), nothing folded away.
    from onnx import numpy_helper

    hf = json.loads((ckpt / "config.json").read_text())
    held = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(inline).graph.initializer)
    assert 0 <= held - vision_weight_bytes(hf, "fp32") < 4096, (held, vision_weight_bytes(hf, "fp32"))
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 56, 56)).astype(np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
           for p in (inline, external)]
    np.testing.assert_array_equal(run[0], run[1])
    # Exported inline again over it: the stale data file of the earlier external write goes.
    export_vision_onnx(ckpt, external)
    assert not external.with_name("m.vision.onnx.data").exists()
