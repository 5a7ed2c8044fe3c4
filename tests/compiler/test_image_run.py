"""`moec run --image` end to end on the multimodal demo (`moec demo-checkpoint --layout conditional_generation
--vision`, `moec export --vision`): torch and ONNX Runtime give transformers' greedy tokens; bad image input is one
named error each."""

import json
import shutil

import numpy as np
import pytest
import torch
from moec_cli import run_cli

from moec.compiler.export import ExportConfig, export_onnx
from moec.compiler.export_vision import export_vision_onnx, image_token_id_of, vision_onnx_path
from moec.models.demo import write_demo_checkpoint

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

STEPS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    ckpt = write_demo_checkpoint(root / "ckpt", layout="conditional_generation", vision=True)
    onnx = export_onnx(ckpt, root / "out" / "m.onnx", ExportConfig(dtype="fp32", image_token_id=image_token_id_of(ckpt)))
    export_vision_onnx(ckpt, vision_onnx_path(onnx.onnx_path))
    image = root / "pic.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (90, 120, 3), dtype=np.uint8)).save(image)
    return ckpt, onnx.onnx_path, image


def _reference_tokens(ckpt, prompt_ids, image):
    """transformers' Llama4ForConditionalGeneration, combined from its submodules as its forward does (the forward
    itself raises AttributeError 'image_outputs' in 5.24), greedy without a cache."""
    transformers = pytest.importorskip("transformers")
    from moec.models.image_processing import ImageProcessingConfig, open_image, preprocess_image

    model = transformers.Llama4ForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    pixels = preprocess_image(open_image(image), ImageProcessingConfig(56, 4)).pixels_TCHW.float()
    ids = torch.tensor([prompt_ids])
    tokens = []
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        features = model.get_image_features(pixel_values=pixels, return_dict=True).last_hidden_state
        projected = model.multi_modal_projector(features.view(-1, features.size(-1)))
        embeds = embeds.masked_scatter(model.get_placeholder_mask(ids, embeds, projected), projected)
        for _ in range(STEPS):
            nxt = int(model.language_model(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(nxt)
            embeds = torch.cat([embeds, model.get_input_embeddings()(torch.tensor([[nxt]]))], dim=1)
    return tokens


def test_image_prompt_on_torch_and_ort_gives_transformers_tokens(exported, capsys):
    ckpt, onnx, image = exported
    runs = {}
    for artifact in (ckpt, onnx):
        code, out, err = run_cli(["run", artifact, "--image", image, "--prompt", "what is it?",
                                  "--max-new-tokens", STEPS, "--json"], capsys)
        assert code == 0, err
        runs[artifact] = json.loads(out)
    torch_run, ort_run = runs[ckpt], runs[onnx]
    assert torch_run["prompt_ids"] == ort_run["prompt_ids"]
    assert torch_run["vision"]["tiles_hw"] == [[2, 2]] and torch_run["vision"]["image_rows"] == 5 * 4
    expected = _reference_tokens(ckpt, torch_run["prompt_ids"], image)
    got = len(torch_run["ids"])
    assert torch_run["ids"] == expected[:got] and ort_run["ids"] == expected[:got]
    # The image matters: the same prompt without its features answers otherwise.
    code, out, _ = run_cli(["run", ckpt, "--prompt", "what is it?", "--max-new-tokens", STEPS, "--json"], capsys)
    assert json.loads(out)["ids"] != torch_run["ids"]


def test_bad_image_input_is_one_named_error(exported, tmp_path, capsys):
    ckpt, onnx, image = exported
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "cut.png").write_bytes(image.read_bytes()[:200])
    text_only = write_demo_checkpoint(tmp_path / "text")
    text_export = tmp_path / "text_export"
    text_export.mkdir()
    for name in ("m.onnx", "m.moec.json", "tokenizer.json"):
        shutil.copy(onnx.with_name(name), text_export / name)
    cases = [
        ([ckpt, "--image", tmp_path / "notes.png"], "not an image"),
        ([onnx, "--image", tmp_path / "cut.png"], "truncated"),
        ([ckpt, "--image", image, "--image", image, "--prompt", "one <|image|> only"], "1 <|image|> slot(s) but 2"),
        ([text_only, "--image", image], "text-only checkpoint"),
        ([text_export / "m.onnx", "--image", image], "m.vision.onnx"),
    ]
    for args, message in cases:
        if "--prompt" not in args:
            args = [*args, "--prompt", "hi"]
        code, out, err = run_cli(["run", *args, "--max-new-tokens", 1], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, (args, err)


def test_build_makes_text_and_vision_engines_for_sm89(exported, tmp_path, capsys):
    """TensorRT-RTX builds both graphs on the CPU; one manifest lists the text engine and, under "vision", the
    vision engine (a profile over the tile count) and its metadata."""
    pytest.importorskip("tensorrt_rtx")
    _, onnx, _ = exported
    code, out, err = run_cli(["build", onnx, "-o", tmp_path / "eng", "--arch", "sm89", "--builder", "trt-rtx",
                              "--no-progress"], capsys)
    assert code == 0, err
    manifest = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert [e["file"] for e in manifest["engines"]] == ["engine.sm89.plan"]
    vision = manifest["vision"]
    assert [e["file"] for e in vision["engines"]] == ["vision.sm89.plan"]
    assert (tmp_path / "eng" / "vision.sm89.plan").stat().st_size == vision["engines"][0]["bytes"] > 0
    assert vision["profile"]["pixel_values"] == [[1, 3, 56, 56], [5, 3, 56, 56], [64, 3, 56, 56]]
    assert (tmp_path / "eng" / vision["sidecar"]).is_file()
    # The text engine's prefill profile takes image rows; decode takes none.
    rows = {p["name"]: p["shapes"]["image_features"] for p in manifest["profiles"]}
    assert rows["prefill"]["max"][0] > 0 and rows["decode"]["max"][0] == 0


def test_export_vision_refuses_text_only_and_wrong_shape_weights_before_writing(tmp_path, capsys):
    text_only = write_demo_checkpoint(tmp_path / "text")
    wrong = write_demo_checkpoint(tmp_path / "wrong", layout="conditional_generation", vision=True)
    config = json.loads((wrong / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 96  # the weights were drawn for 128
    (wrong / "config.json").write_text(json.dumps(config))
    for ckpt, message in ((text_only, "text-only"), (wrong, "has shape [128] but the vision config needs [96]")):
        out_dir = tmp_path / f"out_{ckpt.name}"
        code, _, err = run_cli(["export", ckpt, "-o", out_dir / "m.onnx", "--vision"], capsys)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], err
        assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bench_times_the_vision_encoder_apart(exported, tmp_path, capsys):
    _, onnx, _ = exported
    code, _, err = run_cli(["bench", onnx, "--json", tmp_path / "b.json", "--repeats", 2, "--warmup", 0,
                            "--prompt-len", 4, "--gen-len", 2], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "b.json").read_text())["metrics"]
    assert metrics["vision_encoder_ms"]["p50"] > 0 and "prefill_ms" in metrics


def test_compile_makes_both_graphs_by_default_and_text_only_skips_vision(exported, tmp_path, capsys):
    ckpt, _, image = exported
    code, out, err = run_cli(["compile", ckpt, "-o", tmp_path / "text", "--target", "ort", "--no-verify",
                              "--text-only", "--json"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "text" / "onnx").glob("*vision*"))
    pytest.importorskip("tensorrt_rtx")
    code, out, err = run_cli(["compile", ckpt, "-o", tmp_path / "both", "--no-verify", "--json"], capsys)
    assert code == 0, err
    onnx_dir, engine_dir = tmp_path / "both" / "onnx", tmp_path / "both" / "engine"
    assert (onnx_dir / "model.vision.onnx").is_file() and (onnx_dir / "model.opt.vision.onnx").is_file()
    # The vision graph went through the optimize stage for the target (not copied as exported).
    assert json.loads((onnx_dir / "model.opt.vision.moec.json").read_text())["target"] == "trt-rtx:sm89"
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert manifest["vision"]["engines"][0]["file"] == "vision.sm89.plan"
    assert (engine_dir / "vision.sm89.plan").is_file() and (engine_dir / "engine.sm89.plan").is_file()


def test_optimize_writes_both_graphs_and_build_makes_the_vision_engine_from_the_optimized_one(exported, tmp_path,
                                                                                              capsys):
    """`moec optimize` of a text graph with its vision graph beside it optimizes both (one file set), and
    TensorRT-RTX builds the sm89 vision engine from the optimized (fp16) vision graph."""
    pytest.importorskip("tensorrt_rtx")
    _, onnx, _ = exported
    opt = tmp_path / "opt" / "m.opt.onnx"
    code, out, err = run_cli(["optimize", onnx, "-o", opt, "--target", "trt-rtx:sm89", "--precision", "fp16"], capsys)
    assert code == 0, err
    assert "vision graph -> m.opt.vision.onnx: precision fp16" in " ".join(out.split())
    vision_meta = json.loads((tmp_path / "opt" / "m.opt.vision.moec.json").read_text())
    assert vision_meta["precision"] == "fp16" and vision_meta["target"] == "trt-rtx:sm89"
    code, out, err = run_cli(["build", opt, "-o", tmp_path / "eng", "--arch", "sm89", "--backend", "tensorrt-rtx",
                              "--no-progress"], capsys)
    assert code == 0, err
    vision = json.loads((tmp_path / "eng" / "manifest.json").read_text())["vision"]
    assert vision["precision"] == "fp16" and (tmp_path / "eng" / "vision.sm89.plan").stat().st_size > 0
    # The engine's I/O as TensorRT's network has it: fp32 pixels in (the casts are inside), fp32 features out.
    assert [(t["name"], t["dtype"], t["shape"]) for t in vision["io"]["inputs"]] == [
        ("pixel_values", "float", [-1, 3, 56, 56])]
    assert [(t["name"], t["dtype"]) for t in vision["io"]["outputs"]] == [("image_features", "float")]
