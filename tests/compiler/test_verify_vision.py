"""compile's `verify vision` stage (compiler/verify_vision.py): the vision graph on ONNX Runtime against the
checkpoint's tower, and an image prompt through both text models; it passes on the multimodal demo, fails on a
wrong feature or a wrong merge, and is skipped (saying why) where there is no vision graph."""

import json

import pytest
from moec_cli import run_cli

from moec.compiler.export import ExportConfig, export_onnx
from moec.compiler.export_vision import export_vision_onnx, image_token_id_of, vision_onnx_path
from moec.compiler.verify import VerifyConfig
from moec.compiler.verify_vision import verify_vision
from moec.models.demo import write_demo_checkpoint
from moec.models.torch_backend import TorchBackend
from moec.runtime.ort_backend import OrtBackend
from moec.runtime.vision import OrtVisionEncoder

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("vv")
    ckpt = write_demo_checkpoint(root / "ckpt", layout="conditional_generation", vision=True)
    onnx = export_onnx(ckpt, root / "out" / "m.onnx", ExportConfig(dtype="fp32", image_token_id=image_token_id_of(ckpt)))
    export_vision_onnx(ckpt, vision_onnx_path(onnx.onnx_path))
    return ckpt, onnx.onnx_path


def _verify(ckpt, onnx):
    return verify_vision(ckpt, vision_onnx_path(onnx), VerifyConfig(decode_steps=4),
                         TorchBackend.from_checkpoint(ckpt, dtype="fp32"), OrtBackend.from_onnx(onnx))


def test_the_demo_passes_over_a_multi_tile_picture(exported):
    rep = _verify(*exported)
    assert rep.passed, rep.to_dict()
    assert rep.tiles_hw == [(2, 2)]  # the picture crosses tiles in both directions (plus the global thumbnail)
    assert rep.image_rows == 5 * 4  # 4 tiles + the thumbnail, 4 <|patch|> rows each
    assert [r.output for r in rep.rows] == ["image_features"] + ["logits"] * 5
    assert rep.greedy_match == [True] * 5
    assert rep.rows[0].max_abs < 1e-4 and 0 < rep.rows[1].max_abs < 1e-4


def test_a_wrong_feature_fails_the_features_row(exported, monkeypatch):
    encode = OrtVisionEncoder.encode

    def off_by_a_little(self, pixels):
        out = encode(self, pixels)
        out[3, 5] += 1e-2  # one element of one image row
        return out

    monkeypatch.setattr(OrtVisionEncoder, "encode", off_by_a_little)
    rep = _verify(*exported)
    assert not rep.passed and rep.failures[0].output == "image_features"
    assert rep.failures[0].max_abs == pytest.approx(1e-2, rel=1e-3)


def test_a_wrong_merge_fails_the_image_prompt_though_the_features_match(exported, monkeypatch):
    forward = OrtBackend.forward

    def reversed_rows(self, ids, pos, cache, image_features_NH=None):
        rows = None if image_features_NH is None else image_features_NH[::-1].copy()
        return forward(self, ids, pos, cache, image_features_NH=rows)

    monkeypatch.setattr(OrtBackend, "forward", reversed_rows)
    rep = _verify(*exported)
    assert rep.rows[0].passed  # the vision graph itself is right
    assert not rep.passed and {r.step for r in rep.failures} >= {"prefill"}


def test_compile_runs_it_on_the_multimodal_demo_and_a_failure_exits_1_leaving_nothing(tmp_path, capsys, monkeypatch):
    code, stdout, err = run_cli(["compile", "-o", tmp_path / "ok", "--target", "ort", "--json"], capsys)
    assert code == 0, err
    stages = {s["stage"]: s for s in json.loads(stdout)["stages"]}
    assert stages["verify vision"]["status"] == "ok", stages["verify vision"]
    assert "2x2 tile grid" in stages["verify vision"]["detail"]
    assert json.loads((tmp_path / "ok" / "verify_vision_report.json").read_text())["passed"]
    assert (tmp_path / "ok" / "checkpoint" / "demo-image.png").is_file()

    encode = OrtVisionEncoder.encode
    monkeypatch.setattr(OrtVisionEncoder, "encode", lambda self, p: encode(self, p) * 1.01)
    code, _, err = run_cli(["compile", "-o", tmp_path / "bad", "--target", "ort"], capsys)
    assert code == 1
    assert "verify vision failed" in err and "image_features at vision" in err
    assert "Traceback" not in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, why", [
    (["--text-only"], "--text-only"),
    (["{ck}"], "no vision tower in the checkpoint"),
])
def test_skipped_without_a_vision_graph_saying_why(argv, why, demo_ckpt, tmp_path, capsys):
    argv = [str(demo_ckpt) if a == "{ck}" else a for a in argv]
    code, stdout, err = run_cli(["compile", *argv, "-o", tmp_path / "out", "--target", "ort", "--json",
                                 "--max-seq", 32, "--prompt-len", 4], capsys)
    assert code == 0, err
    stages = {s["stage"]: s for s in json.loads(stdout)["stages"]}
    assert (stages["verify vision"]["status"], stages["verify vision"]["detail"]) == ("skipped", why)
    assert not list((tmp_path / "out" / "onnx").glob("*vision*"))
