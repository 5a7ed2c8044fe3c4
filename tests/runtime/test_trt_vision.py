"""The TensorRT path of image prompts (runtime/trt_vision.py) on a real TensorRT-RTX sm89 engine folder built from
the multimodal demo. No engine runs on this CPU: the engines are stood in for at their seams, the text engine by
test_trt_backend's ONNX-Runtime-as-TensorRT context, the vision engine by a runner that checks the named inputs it
is given against the built engine's own I/O list and profile before running the graph the engine was built from.
Everything else (the manifest's vision entry, engine selection and integrity, the vision metadata, the shared
encode, the prompt layout, the generation loop, bench's separate vision time) is moec's real code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt_rtx")
PIL = pytest.importorskip("PIL")

from moec_cli import run_cli  # noqa: E402
from PIL import Image  # noqa: E402
from test_trt_backend import cpu_backend  # noqa: E402  (the text engine's CPU stand-in)

from moec.compiler.build import BuildConfig, build_engine  # noqa: E402
from moec.compiler.export import ExportConfig, export_onnx  # noqa: E402
from moec.compiler.export_vision import export_vision_onnx, image_token_id_of, vision_onnx_path  # noqa: E402
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx  # noqa: E402
from moec.models.demo import write_demo_checkpoint  # noqa: E402
from moec.runtime import trt_engines, trt_vision  # noqa: E402
from moec.runtime.bench import BenchConfig, bench_artifact  # noqa: E402
from moec.runtime.trt_backend import TrtBackend  # noqa: E402
from moec.runtime.vision import FEATURES, PIXELS, OrtVisionEncoder  # noqa: E402

STEPS = 8
_NP = {"float": np.float32, "half": np.float16}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_vision")
    ckpt = write_demo_checkpoint(root / "ckpt", layout="conditional_generation", vision=True)
    onnx = export_onnx(ckpt, root / "onnx" / "model.onnx",
                       ExportConfig(dtype="fp32", image_token_id=image_token_id_of(ckpt))).onnx_path
    export_vision_onnx(ckpt, vision_onnx_path(onnx))
    opt = root / "onnx" / "model.opt.onnx"
    optimize_onnx(onnx, opt, OptimizeConfig(target="trt-rtx:sm89"))
    engine = root / "engine"
    build_engine(opt, engine, BuildConfig(archs=("sm89",), progress=False))
    image = root / "pic.png"
    Image.fromarray(np.random.RandomState(1).randint(0, 256, (90, 120, 3), dtype=np.uint8)).save(image)
    return engine, opt, image


class CheckedVisionRunner:
    """TrtVisionEncoder._execute's stand-in: refuses what TensorRT would refuse for this engine (an input name it
    does not have, another dtype or rank, a static dim that differs, tiles outside the profile), then runs the
    optimized vision graph (the engine's source) on ONNX Runtime and returns the engine's outputs by name."""

    def __init__(self, engine_dir: Path, vision_onnx: Path):
        vision = json.loads((engine_dir / "manifest.json").read_text())["vision"]
        self.inputs = {t["name"]: t for t in vision["io"]["inputs"]}
        self.outputs = [t["name"] for t in vision["io"]["outputs"]]
        self.profile = vision["profile"]
        self.ort = OrtVisionEncoder(vision_onnx)
        self.calls = []

    def __call__(self, encoder, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert set(inputs) == set(self.inputs), inputs.keys()
        for name, array in inputs.items():
            io = self.inputs[name]
            assert array.dtype == _NP[io["dtype"]], (name, array.dtype, io["dtype"])
            assert len(array.shape) == len(io["shape"])
            assert all(d == s for d, s in zip(array.shape, io["shape"]) if s != -1), (array.shape, io["shape"])
            lo, _, hi = self.profile[name]
            assert all(a <= d <= b for d, a, b in zip(array.shape, lo, hi)), (array.shape, lo, hi)
        self.calls.append({n: a.shape for n, a in inputs.items()})
        features = self.ort.session.run(self.outputs, inputs)
        return dict(zip(self.outputs, features))


@pytest.fixture
def on_fake_gpu(built, monkeypatch):
    """This host as an sm89 GPU with both engines stood in for at their seams; returns the vision runner."""
    engine, opt, _ = built
    runner = CheckedVisionRunner(engine, vision_onnx_path(opt))
    monkeypatch.setattr(trt_engines, "local_gpu_arch", lambda: "sm89")
    monkeypatch.setattr(trt_vision, "_load_engine", lambda flavour, path, compatible: None)
    monkeypatch.setattr(trt_vision.TrtVisionEncoder, "_execute", lambda encoder, inputs: runner(encoder, inputs))
    monkeypatch.setattr(TrtBackend, "from_engine_dir",
                        classmethod(lambda cls, path, flavour=None: cpu_backend(path, opt)))
    return runner


def test_vision_engine_encodes_through_the_shared_code(built, on_fake_gpu):
    engine, opt, _ = built
    encoder = trt_vision.TrtVisionEncoder.from_engine_dir(engine)
    assert encoder.path == engine / "vision.sm89.plan" and encoder.metadata["patches_per_tile"] == 4
    pixels = np.random.default_rng(0).uniform(-1, 1, (5, 3, 56, 56)).astype(np.float32)
    got = encoder.encode(pixels)
    assert on_fake_gpu.calls == [{PIXELS: (5, 3, 56, 56)}]
    np.testing.assert_array_equal(got, OrtVisionEncoder(vision_onnx_path(opt)).encode(pixels))
    assert got.shape == (5 * 4, 64) and got.dtype == np.float32 and FEATURES in on_fake_gpu.outputs


def test_run_image_on_trt_gives_the_ort_tokens(built, on_fake_gpu, capsys):
    engine, opt, image = built
    runs = {}
    for artifact in (engine, opt):
        code, out, err = run_cli(["run", artifact, "--image", image, "--prompt", "what is it?",
                                  "--max-new-tokens", STEPS, "--json"], capsys)
        assert code == 0, err
        runs[artifact] = json.loads(out)
    trt_run, ort_run = runs[engine], runs[opt]
    assert trt_run["backend"] == "trt" and ort_run["backend"] == "ort"
    assert trt_run["prompt_ids"] == ort_run["prompt_ids"] and trt_run["ids"] == ort_run["ids"]
    assert trt_run["vision"]["tiles_hw"] == [[2, 2]] and trt_run["vision"]["image_rows"] == 5 * 4
    assert len(on_fake_gpu.calls) == 1


def test_bench_of_an_engine_folder_times_the_vision_engine_apart(built, on_fake_gpu):
    engine, _, _ = built
    result = bench_artifact(engine, BenchConfig(prompt_len=4, gen_len=2, repeats=2, warmup=0))
    assert result["metrics"]["vision_encoder_ms"]["p50"] > 0 and "prefill_ms" in result["metrics"]
    # One image at the processor's largest grid (2 x 2 + the global tile), once per repeat.
    assert on_fake_gpu.calls == [{PIXELS: (5, 3, 56, 56)}] * 2


def _edited(engine: Path, tmp_path: Path, edit) -> Path:
    copy = shutil.copytree(engine, tmp_path / "engine")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(copy, manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def _drop_vision(folder, manifest):
    del manifest["vision"]


def _tamper(folder, manifest):
    data = bytearray((folder / "vision.sm89.plan").read_bytes())
    data[-1] ^= 1
    (folder / "vision.sm89.plan").write_bytes(bytes(data))


def _escape(folder, manifest):
    manifest["vision"]["sidecar"] = "../model.opt.vision.moec.json"


def _old_build(folder, manifest):
    del manifest["vision"]["io"]  # a folder built before the manifest recorded the vision engine's I/O


@pytest.mark.parametrize("edit, message", [
    (_drop_vision, "was built from a text-only export"),
    (_tamper, "does not match the manifest"),
    (_escape, "not a plain file name"),
    (_old_build, "vision.io must list the input pixel_values"),
])
def test_bad_engine_folders_are_one_named_error(built, on_fake_gpu, tmp_path, capsys, edit, message):
    engine, _, image = built
    folder = _edited(engine, tmp_path, edit)
    code, _, err = run_cli(["run", folder, "--image", image, "--prompt", "hi", "--max-new-tokens", 1], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert on_fake_gpu.calls == []


def test_without_a_gpu_the_vision_engine_is_refused_by_name(built):
    engine, _, _ = built
    with pytest.raises(trt_engines.MoecError, match="no CUDA GPU is visible"):
        trt_vision.TrtVisionEncoder.from_engine_dir(engine)
