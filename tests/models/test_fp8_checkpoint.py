"""Pre-quantized (fbgemm_fp8) checkpoints: both FP8 layouts load to exactly q * scale, FP8 survives
`moec optimize --quantize fp8` unchanged, and every inconsistency is a named error."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moec.common.errors import MoecError
from moec.models.checkpoint import load_pretrained

QUANT = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
         "modules_to_not_convert": ["self_attn", "router", "shared_expert", "lm_head", "embed_tokens"]}


def _fp8_rows(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fbgemm's per-row FP8: scale = max|row| / 448, q = w / scale in E4M3."""
    scale = w_NK.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (w_NK / scale).to(torch.float8_e4m3fn), scale.float()


def _write_fp8(src: Path, dst: Path, layout: str, edit=None) -> dict[str, torch.Tensor]:
    """``src`` (a demo checkpoint) with its routed experts in FP8; returns the expected float
    experts (q * scale) by stacked name. ``edit(tensors)`` damages the file for the error tests."""
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    want = {}
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = tensors.pop(name)  # [E, in, out]
        q, s = _fp8_rows(w.transpose(1, 2))  # per output row: [E, out, in], [E, out, 1]
        want[name] = (q.float() * s).transpose(1, 2)
        base = name.rsplit(".", 1)[0]
        if layout == "stacked":
            tensors[name] = q.transpose(1, 2).contiguous()
            gate_up = name.endswith("gate_up_proj")
            tensors[name + "_scale"] = (s.transpose(1, 2) if gate_up else s).contiguous()
        else:
            I = w.shape[2] // 2 if name.endswith("gate_up_proj") else None
            for e in range(w.shape[0]):
                if I is not None:
                    for proj, rows in (("gate", slice(0, I)), ("up", slice(I, 2 * I))):
                        tensors[f"{base}.{e}.{proj}_proj.weight"] = q[e, rows].contiguous()
                        tensors[f"{base}.{e}.{proj}_proj.weight_scale"] = s[e, rows].contiguous()
                else:
                    tensors[f"{base}.{e}.down_proj.weight"] = q[e].contiguous()
                    tensors[f"{base}.{e}.down_proj.weight_scale"] = s[e].contiguous()
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = QUANT
    (dst / "config.json").write_text(json.dumps(config))
    return want


@pytest.mark.parametrize("layout", ["per_expert", "stacked"])
def test_fp8_layouts_load_to_q_times_scale(demo_ckpt, tmp_path, layout):
    want = _write_fp8(demo_ckpt, tmp_path / "fp8", layout)
    model = load_pretrained(tmp_path / "fp8", dtype="fp32")
    state = model.state_dict()
    for name, w in want.items():
        assert torch.equal(state[name], w), name
    # Everything else is the source checkpoint's, untouched.
    src = load_pretrained(demo_ckpt, dtype="fp32").state_dict()
    assert torch.equal(state["model.layers.1.self_attn.q_proj.weight"], src["model.layers.1.self_attn.q_proj.weight"])


def test_fp8_values_survive_optimize_quantize_fp8(demo_ckpt, tmp_path):
    import numpy as np
    import onnx_ir as ir

    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx

    _write_fp8(demo_ckpt, tmp_path / "fp8", "stacked")
    q_file = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    export_onnx(tmp_path / "fp8", tmp_path / "onnx" / "model.onnx", ExportConfig(dtype="fp32"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimize_onnx(tmp_path / "onnx" / "model.onnx", tmp_path / "opt" / "model.onnx",
                      OptimizeConfig(target="trt-rtx:sm89", quantize="fp8"))
    inits = ir.load(tmp_path / "opt" / "model.onnx").graph.initializers
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"):
        q = inits[f"{name}.fp8.q"].const_value.numpy().astype(np.float32)
        assert np.array_equal(q, q_file[name].float().numpy()), name  # the checkpoint's own FP8 values


def test_unsupported_quantization_config_is_named(demo_ckpt, tmp_path):
    shutil.copytree(demo_ckpt, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecError, match=r"quantization_config\.quant_method 'gptq' is not supported; moec loads fbgemm_fp8"):
        load_pretrained(tmp_path / "c")


def _drop(key):
    return lambda t: t.pop(key)


def _reshape(key):
    return lambda t: t.__setitem__(key, t[key][:-1].contiguous())


def _add(key):
    return lambda t: t.__setitem__(key, torch.ones(4, 1))


EXPERTS = "model.layers.1.feed_forward.experts"


@pytest.mark.parametrize("edit,message", [
    (_drop(f"{EXPERTS}.0.down_proj.weight_scale"), r"FP8 tensor '.*experts\.0\.down_proj\.weight' has no scale"),
    (_reshape(f"{EXPERTS}.2.gate_proj.weight_scale"), r"scale '.*experts\.2\.gate_proj\.weight_scale' has shape \[31, 1\], expected \[32, 1\]"),
    (_drop(f"{EXPERTS}.3.up_proj.weight"), r"experts\.3\.up_proj\.weight is missing"),
    (_add(f"{EXPERTS}.9.down_proj.weight_scale"), r"belongs to no FP8 weight"),
])
def test_damaged_fp8_checkpoints_are_named(demo_ckpt, tmp_path, edit, message):
    _write_fp8(demo_ckpt, tmp_path / "fp8", "per_expert", edit)
    with pytest.raises(MoecError, match=message):
        load_pretrained(tmp_path / "fp8")


def test_fp8_tensors_without_quantization_config_are_named(demo_ckpt, tmp_path):
    _write_fp8(demo_ckpt, tmp_path / "fp8", "per_expert")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecError, match=r"belongs to an FP8 \(fbgemm_fp8\) checkpoint, but config\.json has no quantization_config"):
        load_pretrained(tmp_path / "fp8")


def test_fp8_module_listed_as_not_converted_is_named(demo_ckpt, tmp_path):
    _write_fp8(demo_ckpt, tmp_path / "fp8", "stacked")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"].append("feed_forward.experts")
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoecError, match="is FP8 but quantization_config.modules_to_not_convert lists 'feed_forward.experts'"):
        load_pretrained(tmp_path / "fp8")


def test_a_non_finite_fp8_weight_or_scale_is_named_unless_allowed(demo_ckpt, tmp_path):
    """q * scale is assembled while the headers are read, so it bypassed the per-tensor finite
    check (issue 11): an Inf scale or a NaN code in the FP8 weight is named like any weight."""
    from moec.models.checkpoint import load_pretrained_lazy

    def inf_scale(t):
        t[f"{EXPERTS}.0.down_proj.weight_scale"][0, 0] = float("inf")

    _write_fp8(demo_ckpt, tmp_path / "fp8", "per_expert", inf_scale)
    msg = r"experts\.down_proj \(FP8 weight x scale\)' holds .* non-finite value"
    with pytest.raises(MoecError, match=msg):
        load_pretrained(tmp_path / "fp8")
    with pytest.raises(MoecError, match=msg):
        load_pretrained_lazy(tmp_path / "fp8")  # what export reads
    load_pretrained(tmp_path / "fp8", allow_nonfinite=True)
    load_pretrained_lazy(tmp_path / "fp8", allow_nonfinite=True)

    def nan_code(t):
        t[f"{EXPERTS}.1.gate_proj.weight"].view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN

    _write_fp8(demo_ckpt, tmp_path / "fp8b", "per_expert", nan_code)
    with pytest.raises(MoecError, match=r"experts\.gate_up_proj \(FP8 weight x scale\)' holds .* \(\d+ NaN"):
        load_pretrained(tmp_path / "fp8b")
