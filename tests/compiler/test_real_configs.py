"""The first path a user with a real checkpoint takes, on the real Scout and Maverick config.json
(every field kept, sizes shrunk; tests/compiler/real_configs.py): the defaults of export, verify and
compile must work there, not only on the demo model.

What the real configs bring that the demo does not: vocabulary 202,048 (logits of a long prompt are
GBs), attention chunk 8192 and 10 M / 1 M positions (a profile or a KV cache at the model's limit
cannot exist), 40 heads (an unfused score matrix of 16 K tokens is 86 GB), bf16 weights.
"""

from __future__ import annotations

import json

import onnx
import pytest
from real_configs import write_shrunk_checkpoint

from moec.common import contract
from moec.compiler.cli import main


@pytest.fixture(scope="module", params=["scout", "maverick"])
def real_ckpt(request, tmp_path_factory):
    return request.param, write_shrunk_checkpoint(request.param, tmp_path_factory.mktemp(request.param), "bf16")


def test_bf16_checkpoint_exports_bf16_by_default(real_ckpt, tmp_path):
    from moec.compiler.export import ExportConfig, export_onnx

    _, ckpt = real_ckpt
    res = export_onnx(ckpt, tmp_path / "m.onnx", ExportConfig(max_seq=64))
    assert res.dtype == "bf16"
    assert json.loads(contract.sidecar_path(res.onnx_path).read_text())["dtype"] == "bf16"
    model = onnx.load(str(res.onnx_path), load_external_data=False)
    # 2-D weights; the ring caches' slot-position constants (int64 [1, R]) are indices, not weights.
    dtypes = {t.data_type for t in model.graph.initializer if len(t.dims) == 2 and t.data_type != onnx.TensorProto.INT64}
    assert dtypes == {onnx.TensorProto.BFLOAT16}
    # fp32 stays available.
    res32 = export_onnx(ckpt, tmp_path / "m32.onnx", ExportConfig(dtype="fp32", max_seq=64))
    assert res32.dtype == "fp32" and res32.weight_bytes > 1.9 * res.weight_bytes


def test_stored_dtype_reads_the_tensors(real_ckpt, tmp_path):
    from moec.models.checkpoint import stored_dtype

    name, ckpt = real_ckpt
    assert stored_dtype(ckpt) == "bf16"
    fp16 = write_shrunk_checkpoint(name, tmp_path / "fp16", "fp16")
    # config.json still says bfloat16 (it is the real file): the tensors decide.
    assert json.loads((fp16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert stored_dtype(fp16) == "fp16"


def test_verify_fp32_with_the_default_prompt(real_ckpt, capsys):
    """The default prompt fits the memory budget at the real vocabulary and heads; it cannot cross
    the real 8192 chunk within it, and the report says so."""
    _, ckpt = real_ckpt
    main(["verify", str(ckpt), "--dtype", "fp32", "--decode-steps", "2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and all(report["greedy_match"])
    assert 16 <= report["prompt_len"] < 8192 and "--prompt-len to cross it" in report["prompt_rule"]


def test_default_prompt_rule():
    from moec.compiler.verify import VERIFY_BUDGET_BYTES, default_prompt_len, prompt_bytes

    # A small model with chunk 8 crosses two chunks, as before.
    assert default_prompt_len(2, 4, 512, 8, 500)[0] == 19
    # Only one chunk fits the positions.
    assert default_prompt_len(2, 4, 512, 8, 12)[0] == 11
    # The real Scout/Maverick sizes: the longest prompt within the budget, not 16,387 tokens.
    n, rule = default_prompt_len(2, 40, 202048, 8192, 8192 - 6)
    assert prompt_bytes(n, 2, 40, 202048) <= VERIFY_BUDGET_BYTES < prompt_bytes(n * 10 // 9 + 1, 2, 40, 202048)
    assert "8192" in rule
    # Positions too few to cross a chunk: said so.
    assert "no room" in default_prompt_len(1, 4, 512, 64, 30)[1]


@pytest.mark.slow
def test_compile_with_defaults(real_ckpt, tmp_path, capsys):
    """`moec compile CKPT -o OUT`: bf16 export (the checkpoint's), an 8192-position context,
    verify of the fp32 twin on this CPU, an sm89 TensorRT-RTX engine with the memory plan."""
    pytest.importorskip("tensorrt_rtx")
    _, ckpt = real_ckpt
    out = tmp_path / "out"
    main(["compile", str(ckpt), "-o", str(out), "--json"])
    report = json.loads(capsys.readouterr().out)
    stages = {s["stage"]: s for s in report["stages"]}
    assert report["passed"] and [s["status"] for s in report["stages"]] == ["ok"] * 4 + ["skipped", "ok"]
    # The shrunk checkpoints hold the text weights only (vision_config kept, no vision_model.* tensors).
    assert stages["verify vision"]["detail"] == "no vision tower in the checkpoint"
    assert "bf16 (the checkpoint's)" in stages["export"]["detail"]
    assert "8192 positions (default" in stages["export"]["detail"]
    assert "fp32 twin" in stages["verify"]["detail"]
    manifest = json.loads((out / "engine" / contract.ENGINE_MANIFEST).read_text())
    assert manifest["precision"] == "bf16" and manifest["limits"]["max_positions"] == 8192
    assert manifest["memory"]["weight_bytes"] > 0 and "h100" in manifest["memory"]["fits"]
