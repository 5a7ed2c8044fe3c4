"""moec's vision tower against transformers 5.24's Llama4VisionModel + Llama4MultiModalProjector.

Llama4ForConditionalGeneration.forward raises AttributeError ('image_outputs') in 5.24, so the reference is its
own combination of submodules: get_image_features (= vision_model) -> last_hidden_state -> view(-1, dim) ->
multi_modal_projector, as its forward does before masked_scatter."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.llama4 import modeling_llama4 as hf  # noqa: E402

from moec.common.errors import MoecError  # noqa: E402
from moec.models.vision import VisionConfig, VisionTower, load_vision_state  # noqa: E402


def _hf_config(image_size: int, layers: int) -> dict:
    return {
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_channels": 3, "image_size": image_size, "patch_size": 14, "rope_parameters": {"rope_theta": 10000.0},
            "pixel_shuffle_ratio": 0.5, "projector_input_dim": 48, "projector_output_dim": 48,
            "vision_output_dim": 48, "norm_eps": 1e-5,
        },
        "text_config": {"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "intermediate_size": 32,
                        "intermediate_size_mlp": 64},
    }


def _reference(config_dict: dict):
    cfg = transformers.Llama4Config(**config_dict)
    torch.manual_seed(0)
    vision, projector = hf.Llama4VisionModel(cfg.vision_config).eval(), hf.Llama4MultiModalProjector(cfg).eval()
    with torch.no_grad():  # post_init leaves some weights at zero/one; random ones test every path
        for p in list(vision.parameters()) + list(projector.parameters()):
            p.normal_(0, 0.2)
    return vision, projector


def _checkpoint_tensors(vision, projector) -> dict:
    tensors = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    tensors |= {f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()}
    return tensors


@pytest.mark.parametrize("image_size,layers,tiles", [(28, 1, 1), (56, 2, 1), (56, 2, 5), (28, 2, 3)])
def test_features_equal_transformers(image_size, layers, tiles):
    config_dict = _hf_config(image_size, layers)
    vision, projector = _reference(config_dict)
    tower = VisionTower(VisionConfig.from_hf_dict(config_dict)).eval()
    load_vision_state(tower, _checkpoint_tensors(vision, projector), "test")
    pixels = torch.randn(tiles, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_features = vision(pixels, return_dict=True).last_hidden_state
        expected = projector(image_features.view(-1, image_features.size(-1)))
        got = tower(pixels)
    patches_per_tile = (image_size // 14) ** 2 // 4
    assert got.shape == (tiles * patches_per_tile, 64)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_wrong_rotary_would_be_caught():
    """The check is sharp enough: class token first instead of last changes the features past 1e-5."""
    config_dict = _hf_config(56, 1)
    vision, projector = _reference(config_dict)
    tower = VisionTower(VisionConfig.from_hf_dict(config_dict)).eval()
    load_vision_state(tower, _checkpoint_tensors(vision, projector), "test")
    tower.vision_model.rope_cos = tower.vision_model.rope_cos.roll(1, dims=0)
    tower.vision_model.rope_sin = tower.vision_model.rope_sin.roll(1, dims=0)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image_features = vision(pixels, return_dict=True).last_hidden_state
        expected = projector(image_features.view(-1, image_features.size(-1)))
        assert (tower(pixels) - expected).abs().max() > 1e-3


def test_text_only_and_mismatched_weights_are_named():
    config_dict = _hf_config(28, 1)
    tower = VisionTower(VisionConfig.from_hf_dict(config_dict))
    with pytest.raises(MoecError, match="no vision_model"):
        load_vision_state(tower, {"language_model.model.norm.weight": torch.ones(64)}, "ckpt")
    vision, projector = _reference(_hf_config(28, 2))
    with pytest.raises(MoecError, match="do not match"):
        load_vision_state(tower, _checkpoint_tensors(vision, projector), "ckpt")
    with pytest.raises(MoecError, match="text-only"):
        VisionConfig.from_hf_dict({"text_config": {"hidden_size": 64}})


def test_load_vision_tower_from_conditional_generation_checkpoint(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from moec.models.checkpoint import load_pretrained, load_vision_tower
    from moec.models.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "ckpt", layout="conditional_generation")
    text_only = write_demo_checkpoint(tmp_path / "text", layout="conditional_generation")
    config = json.loads((ckpt / "config.json").read_text())
    vision_dict = _hf_config(56, 2)
    vision_dict["text_config"] = config["text_config"]
    vision, projector = _reference(vision_dict)
    config["vision_config"] = vision_dict["vision_config"]
    (ckpt / "config.json").write_text(json.dumps(config))
    weights = load_file(ckpt / "model.safetensors") | _checkpoint_tensors(vision, projector)
    save_file({k: v.contiguous() for k, v in weights.items()}, ckpt / "model.safetensors")

    tower = load_vision_tower(ckpt)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        image_features = vision(pixels, return_dict=True).last_hidden_state
        expected = projector(image_features.view(-1, image_features.size(-1)))
        torch.testing.assert_close(tower(pixels), expected, atol=1e-5, rtol=0)
    load_pretrained(ckpt)  # the text loader still skips the vision tensors (with its note)
    with pytest.raises(MoecError, match="no vision"):
        load_vision_tower(text_only)


def test_vision_tower_exports_to_onnx_with_dynamic_tiles(tmp_path):
    """Real arithmetic only (no complex rotary), so torch.onnx's dynamo export takes it; ORT equals torch."""
    ort = pytest.importorskip("onnxruntime")
    tower = VisionTower(VisionConfig.from_hf_dict(_hf_config(56, 2))).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.2)
    tiles = torch.export.Dim("tiles", min=1, max=64)
    program = torch.onnx.export(tower, (torch.randn(2, 3, 56, 56),), dynamo=True, dynamic_shapes=({0: tiles},),
                                input_names=["pixels"], output_names=["features"])
    program.save(str(tmp_path / "vision.onnx"))
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"))
    for count in (1, 5):
        pixels = torch.randn(count, 3, 56, 56, generator=torch.Generator().manual_seed(count))
        got = torch.from_numpy(session.run(None, {"pixels": pixels.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, tower(pixels), atol=1e-5, rtol=0)


def test_wrong_shape_vision_weights_are_named():
    """Same names, other sizes (a config.json of another model): one line naming the tensor, not torch's
    multi-line size-mismatch RuntimeError."""
    tower = VisionTower(VisionConfig.from_hf_dict(_hf_config(28, 1)))
    wider = _hf_config(28, 1)
    wider["vision_config"]["hidden_size"] = 64
    vision, projector = _reference(wider)
    with pytest.raises(MoecError, match=r"vision tensor vision_model\.\S+ has shape \[") as e:
        load_vision_state(tower, _checkpoint_tensors(vision, projector), "ckpt")
    assert "\n" not in str(e.value)
