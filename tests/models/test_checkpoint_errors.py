"""Every bad checkpoint a user can hand moec: one MoecError naming the file or tensor, and from
the CLI a non-zero exit with no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moec.common.errors import MoecError
from moec.models import Llama4Config, load_pretrained
from moec.models.checkpoint import checkpoint_folder
from moec.models.demo import write_demo_checkpoint


@pytest.fixture
def ckpt(demo_ckpt, tmp_path):
    """A private copy of the demo checkpoint to damage."""
    return shutil.copytree(demo_ckpt, tmp_path / "ckpt")


@pytest.fixture
def sharded(tmp_path):
    return write_demo_checkpoint(tmp_path / "sharded", shards=3)


def _rewrite_weights(path, edit):
    file = path / "model.safetensors"
    with safe_open(str(file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(MoecError, match=r"config\.json: missing"):
        load_pretrained(ckpt)


def test_not_a_directory(tmp_path):
    with pytest.raises(MoecError, match="nowhere does not exist; give a Hugging Face checkpoint folder"):
        load_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("read", [load_pretrained, Llama4Config.from_pretrained, checkpoint_folder])
def test_a_file_or_nothing_given_as_checkpoint(tmp_path, read):
    """Every entry point that takes a checkpoint says what the path is, not what it lacks."""
    (tmp_path / "m.onnx").write_bytes(b"\xa3\x00 not a folder")
    with pytest.raises(MoecError, match=r"CHECKPOINT must be a folder \(got a file: .*m\.onnx\)"):
        read(tmp_path / "m.onnx")
    with pytest.raises(MoecError, match=r"nowhere does not exist"):
        read(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoecError, match=r"empty/config\.json: missing"):
        read(tmp_path / "empty")


def test_unsupported_architecture(ckpt):
    _edit_config(ckpt, lambda c: c.update(architectures=["MixtralForCausalLM"]))
    with pytest.raises(MoecError, match=r"config\.json: unsupported architecture MixtralForCausalLM"):
        load_pretrained(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(MoecError, match=r"config\.json: not valid JSON"):
        load_pretrained(ckpt)


def test_missing_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.feed_forward.experts.down_proj"))
    with pytest.raises(MoecError, match=r"missing tensor\(s\) model\.layers\.1\.feed_forward\.experts\.down_proj"):
        load_pretrained(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.update({"model.layers.9.mlp.weight": torch.zeros(2)}))
    with pytest.raises(MoecError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.9\.mlp\.weight'"):
        load_pretrained(ckpt)


def test_misshaped_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(MoecError, match=r"'model\.norm\.weight' has shape \[65\], expected \[64\]"):
        load_pretrained(ckpt)


def test_config_disagrees_with_weights(ckpt):
    _edit_config(ckpt, lambda c: c.update(num_local_experts=8))
    with pytest.raises(MoecError, match=r"experts\.(gate_up|down)_proj' has shape \[4, .*\], expected \[8, "):
        load_pretrained(ckpt)


def test_integer_tensor(ckpt):
    _rewrite_weights(ckpt, lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(MoecError, match=r"'model\.norm\.weight' is I8"):
        load_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    file = ckpt / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(MoecError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(ckpt)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(MoecError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(ckpt)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MoecError, match=r"no model\.safetensors .*pytorch_model\.bin: convert"):
        load_pretrained(ckpt)


def test_index_names_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MoecError, match=r"index\.json: names shard model-00002-of-00003\.safetensors"):
        load_pretrained(sharded)


def test_index_lists_tensor_not_in_shard(sharded):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(MoecError, match=r"does not hold, e\.g\. 'model\.extra\.weight'"):
        load_pretrained(sharded)


def test_index_not_an_index(sharded):
    (sharded / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(MoecError, match=r"index\.json: not a safetensors index"):
        load_pretrained(sharded)


def test_bad_dtype_name(demo_ckpt):
    with pytest.raises(MoecError, match="dtype 'int4'"):
        load_pretrained(demo_ckpt, dtype="int4")


def test_cli_reports_bad_checkpoint_without_traceback(tmp_path):
    """The CLI's exit path for a MoecError raised under the models stage (demo-checkpoint into a
    folder that is not a checkpoint)."""
    (tmp_path / "notes.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "moec.compiler", "demo-checkpoint", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "choose a new or empty folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def _drop(name):
    return lambda t: t.pop(name)


DAMAGES = {
    "missing-config": lambda p: (p / "config.json").unlink(),
    "unsupported-architecture": lambda p: _edit_config(p, lambda c: c.update(architectures=["GPT2LMHeadModel"])),
    "missing-tensor": lambda p: _rewrite_weights(p, _drop("model.norm.weight")),
    "unexpected-tensor": lambda p: _rewrite_weights(p, lambda t: t.update({"extra": torch.zeros(1)})),
    "misshaped-tensor": lambda p: _rewrite_weights(p, lambda t: t.update({"model.norm.weight": torch.ones(3)})),
    "truncated": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
    "corrupt": lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 4096),
}
NAMED = {
    "missing-config": "config.json",
    "unsupported-architecture": "config.json",
    "missing-tensor": "model.norm.weight",
    "unexpected-tensor": "'extra'",
    "misshaped-tensor": "model.norm.weight",
    "truncated": "model.safetensors",
    "corrupt": "model.safetensors",
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_moec_run_exits_2_with_one_line(ckpt, damage, capsys):
    """Through the CLI (`moec run CKPT --backend torch`): exit code 2, one error line naming the
    file or tensor, no traceback."""
    from moec.compiler.cli import cli, main

    if "run" not in cli.commands:
        pytest.skip("moec run is not built yet")
    DAMAGES[damage](ckpt)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(ckpt), "--backend", "torch", "--prompt-ids", "1 2", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and NAMED[damage] in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_tolerated_extras_load_to_the_same_model(ckpt, demo_ckpt):
    """Not errors: a saved rotary inv_freq buffer (derived from the config) is ignored."""
    _rewrite_weights(ckpt, lambda t: t.update({"model.rotary_emb.inv_freq": torch.zeros(8)}))
    ids = torch.tensor([[256, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(load_pretrained(ckpt)(ids)[0], load_pretrained(demo_ckpt)(ids)[0])


def _add_vision_tensors(path):
    _rewrite_weights(
        path,
        lambda t: t.update(
            {
                "vision_model.patch_embedding.weight": torch.zeros(4, 3),
                "vision_model.model.layers.0.mlp.fc1.weight": torch.zeros(2, 2),
                "multi_modal_projector.linear_1.weight": torch.zeros(2, 4),
            }
        ),
    )


def test_vision_weights_skipped_with_a_warning(tmp_path, caplog):
    ckpt = write_demo_checkpoint(tmp_path / "vis", layout="conditional_generation")
    _add_vision_tensors(ckpt)
    with caplog.at_level("WARNING", logger="moec"):
        load_pretrained(ckpt)
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("moec")]
    assert notes == [f"{ckpt}: the text model leaves out 3 vision/projector tensor(s) of the "
                     "Llama4ForConditionalGeneration checkpoint (moec loads the vision tower apart: `moec export "
                     "--vision`, `moec compile` without --text-only, `moec run --image`)"]


def test_cli_notes_skipped_vision_weights_once(tmp_path, capsys):
    """`moec run` and `moec verify` (which loads the checkpoint twice) print the note once on stderr;
    --json's stdout stays JSON."""
    from moec.compiler.cli import main

    ckpt = write_demo_checkpoint(tmp_path / "vis", layout="conditional_generation")
    _add_vision_tensors(ckpt)
    for args in (["run", ckpt, "--prompt-ids", "1 2", "--max-new-tokens", "1", "--json"],
                 ["verify", ckpt, "--decode-steps", "0", "--json"]):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            assert e.code in (0, None)
        out = capsys.readouterr()
        json.loads(out.out)
        assert out.err.count("note: ") == 1 and "leaves out 3 vision/projector tensor(s)" in out.err, (args, out.err)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_unreadable_json_files(sharded, name, monkeypatch):
    """An OS error reading config.json or the index (permissions, I/O) is named, not a traceback.
    (Tests may run as root, which chmod cannot lock out, so the read itself fails here.)"""
    import pathlib

    real = pathlib.Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == name:
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", read_text)
    with pytest.raises(MoecError, match=rf"{name}: cannot read it \(Permission denied\); check its permissions"):
        load_pretrained(sharded)
