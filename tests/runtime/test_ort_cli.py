"""``moec run`` on an ONNX export (and on the checkpoint, for the same tokens), and its bad inputs."""

from __future__ import annotations

import json
import shutil

import pytest

from moec.common import contract
from moec_cli import run_cli


def test_run_onnx_equals_run_checkpoint(demo_onnx, demo_ckpt, capsys):
    args = ["--prompt", "The quick brown fox", "--max-new-tokens", "12", "--json"]
    code, out, err = run_cli(["run", demo_onnx, *args], capsys)
    assert code == 0, err
    got = json.loads(out)
    code, out, err = run_cli(["run", demo_ckpt, *args], capsys)
    assert code == 0, err
    want = json.loads(out)
    assert got["backend"] == "ort" and want["backend"] == "torch"
    assert got["prompt_ids"] == want["prompt_ids"] and len(got["prompt_ids"]) > 8  # longer than a chunk
    assert got["ids"] == want["ids"] and len(got["ids"]) >= 1
    assert set(got["timings"]) >= {"prefill_s", "decode_step_s", "total_s", "decode_tokens_per_s"}
    assert got["describe"]["onnxruntime"]


def test_run_text_output_and_sampling(demo_onnx, capsys):
    args = ["run", demo_onnx, "--prompt-ids", "5 6 7", "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "30", "--top-p", "0.95"]
    code, out1, err = run_cli([*args, "--seed", "1", "--json"], capsys)
    assert code == 0, err
    code, out2, _ = run_cli([*args, "--seed", "1", "--json"], capsys)
    assert json.loads(out1)["ids"] == json.loads(out2)["ids"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "[ort] 3 prompt + " in err and "tok/s" in err


def test_backend_override(demo_onnx, capsys):
    code, _, err = run_cli(["run", demo_onnx, "--backend", "torch", "--prompt-ids", "1"], capsys)
    assert code == 2 and "torch backend runs a checkpoint directory" in err and "Traceback" not in err


def test_prompt_needs_a_tokenizer(demo_onnx, demo_ckpt, tmp_path, capsys):
    shutil.copyfile(demo_onnx, tmp_path / "m.onnx")
    shutil.copyfile(contract.sidecar_path(demo_onnx), tmp_path / "m.moec.json")
    code, _, err = run_cli(["run", tmp_path / "m.onnx", "--prompt", "hi"], capsys)
    assert code == 2 and "--prompt needs tokenizer.json" in err and "--checkpoint" in err
    code, out, err = run_cli(["run", tmp_path / "m.onnx", "--prompt", "hi", "--checkpoint", demo_ckpt, "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["run", tmp_path / "m.onnx", "--prompt-ids", "1 2", "--max-new-tokens", "2"], capsys)
    assert code == 0 and len(out.split()) == 2  # ids, no tokenizer to decode them


def test_prompt_longer_than_max_positions(demo_onnx, capsys):
    side = json.loads(contract.sidecar_path(demo_onnx).read_text())
    ids = " ".join(["5"] * (side["max_positions"] + 1))
    code, _, err = run_cli(["run", demo_onnx, "--prompt-ids", ids], capsys)
    assert code == 2 and f"accepts at most {side['max_positions']} positions" in err


def test_not_a_moec_export(tmp_path, demo_onnx, capsys):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(g), tmp_path / "other.onnx")
    code, _, err = run_cli(["run", tmp_path / "other.onnx", "--prompt-ids", "1"], capsys)
    assert code == 2 and "not a moec export" in err and "other.moec.json" in err
    shutil.copyfile(contract.sidecar_path(demo_onnx), tmp_path / "other.moec.json")
    code, _, err = run_cli(["run", tmp_path / "other.onnx", "--prompt-ids", "1"], capsys)
    assert code == 2 and "missing inputs ['input_ids', 'position_ids'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.moec.json", "other.onnx"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-ids", "1 x 3"], "--prompt-ids must be integers"),
        (["--prompt-ids", " "], "--prompt-ids is empty"),
        (["--prompt", "a", "--prompt-ids", "1"], "exactly one of --prompt"),
        ([], "exactly one of --prompt"),
        (["--prompt-ids", "1", "--top-p", "0"], "'--top-p': 0.0 is not in the range 0<x<=1"),
        (["--prompt-ids", "1", "--top-p", "1.5"], "'--top-p': 1.5 is not in the range 0<x<=1"),
        (["--prompt-ids", "1", "--temperature", "-1"], "'--temperature': -1.0 is not in the range x>=0"),
        (["--prompt-ids", "1", "--top-k", "-2"], "'--top-k': -2 is not in the range x>=0"),
        (["--prompt-ids", "1", "--seed", "-1", "--temperature", "1"], "'--seed': -1 is not in the range x>=0"),
        (["--prompt-ids", "3 999999 999999"], "token ids must lie in [0, 264), got 999999 (at positions 1, 2), for "),
        (["--prompt-ids", "1", "--dtype", "fp16"], "--dtype only applies to the torch backend"),
    ],
)
def test_bad_run_options(demo_onnx, capsys, args, message):
    code, _, err = run_cli(["run", demo_onnx, *args], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_unknown_artifact(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path / "nope", "--prompt-ids", "1"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["run", tmp_path / "empty", "--prompt-ids", "1"], capsys)
    assert code == 2 and "cannot tell what" in err


def test_trt_branch_is_lazy_and_reports_errors(tmp_path, capsys):
    """--backend trt goes to moec.runtime.trt_backend; a folder without an engine is a user error."""
    (tmp_path / "engine").mkdir()
    code, _, err = run_cli(["run", tmp_path / "engine", "--backend", "trt", "--prompt-ids", "1"], capsys)
    assert code == 2 and "Traceback" not in err and err.startswith("error: ")


def test_onnx_alone_with_checkpoint_for_config_and_tokenizer(demo_onnx, demo_ckpt, tmp_path, capsys):
    """An .onnx without its sidecar and tokenizer runs when --checkpoint supplies both."""
    shutil.copyfile(demo_onnx, tmp_path / "bare.onnx")
    code, _, err = run_cli(["run", tmp_path / "bare.onnx", "--prompt-ids", "1 2"], capsys)
    assert code == 2 and "bare.moec.json is missing" in err
    args = ["--prompt", "hello", "--max-new-tokens", "5", "--json"]
    code, out, err = run_cli(["run", tmp_path / "bare.onnx", "--checkpoint", demo_ckpt, *args], capsys)
    assert code == 0, err
    code, ref, err = run_cli(["run", demo_onnx, *args], capsys)
    assert json.loads(out)["ids"] == json.loads(ref)["ids"]
    assert json.loads(out)["describe"]["dtype"] == "fp32"


def test_corrupt_tokenizer(demo_onnx, tmp_path, capsys):
    """A tokenizer.json that `tokenizers` cannot read: --prompt is refused naming the file;
    --prompt-ids still generates and prints ids, saying why there is no text."""
    for f in (demo_onnx, contract.sidecar_path(demo_onnx)):
        shutil.copyfile(f, tmp_path / f.name)
    tok = tmp_path / contract.TOKENIZER_FILE
    tok.write_text('{"version": "1.0", "model": ')
    model = tmp_path / demo_onnx.name
    code, _, err = run_cli(["run", model, "--prompt", "hi"], capsys)
    assert code == 2 and f"{tok}: not a usable tokenizer" in err and "--prompt-ids" in err and "Traceback" not in err
    code, out, err = run_cli(["run", model, "--prompt-ids", "1 2", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    assert len(out.split()) == 3 and all(t.isdigit() for t in out.split())
    assert "printing token ids, not text" in err and str(tok) in err
    code, out, err = run_cli(["run", model, "--prompt-ids", "1 2", "--max-new-tokens", "3", "--json"], capsys)
    assert code == 0 and json.loads(out)["text"] is None and len(json.loads(out)["ids"]) == 3


def test_generated_control_bytes_are_escaped_for_the_terminal(demo_onnx, monkeypatch, capsys):
    """Human output escapes what a terminal would act on; --json keeps the exact text."""
    import moec.runtime.generate as gen

    # The demo tokenizer is byte-level: ids 0..255 decode to those bytes.
    emitted = [ord(c) for c in "Hi\x1b[31m\x07\r\n\tok\x7f"]
    real = gen.generate

    def fixed(backend, ids, config):
        result = real(backend, ids, config)
        result.new_tokens = [emitted]
        return result

    monkeypatch.setattr(gen, "generate", fixed)
    code, out, err = run_cli(["run", demo_onnx, "--prompt-ids", "1", "--max-new-tokens", "1"], capsys)
    assert code == 0, err
    assert out == "Hi\\x1b[31m\\x07\\r\n\tok\\x7f\n"
    code, out, err = run_cli(["run", demo_onnx, "--prompt-ids", "1", "--max-new-tokens", "1", "--json"], capsys)
    assert code == 0 and json.loads(out)["text"] == "Hi\x1b[31m\x07\r\n\tok\x7f"
