"""NaN or Inf weights are named by the loader (opt-out for users who know), and verify reports
non-finite outputs as a failure, never as equal (issue 11, "numbers that are not numbers")."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from moec.common.errors import MoecError
from moec.models.checkpoint import load_pretrained


@pytest.fixture
def nan_ckpt(demo_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    state = load_file(ck / "model.safetensors")
    w = state["model.layers.1.self_attn.q_proj.weight"].clone()
    w[0, 0] = float("nan")
    w[0, 1] = float("inf")
    state["model.layers.1.self_attn.q_proj.weight"] = w
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    return ck


def test_the_loader_names_the_first_non_finite_tensor(nan_ckpt):
    with pytest.raises(MoecError, match=r"'model.layers.1.self_attn.q_proj.weight' holds 2 non-finite value\(s\) "
                                        r"\(1 NaN, 1 Inf\)"):
        load_pretrained(nan_ckpt)
    model = load_pretrained(nan_ckpt, allow_nonfinite=True)  # the opt-out
    assert torch.isnan(model.model.layers[1].self_attn.q_proj.weight).any()


def test_a_cast_that_overflows_to_inf_is_named(demo_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = tmp_path / "ck"
    shutil.copytree(demo_ckpt, ck)
    state = load_file(ck / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].clone()
    state["model.norm.weight"][0] = 1e6  # finite in fp32, Inf in fp16
    save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    load_pretrained(ck)
    with pytest.raises(MoecError, match=r"'model.norm.weight' holds 1 non-finite value\(s\) \(0 NaN, 1 Inf\)"):
        load_pretrained(ck, dtype="fp16")


def test_export_refuses_nan_weights_unless_allowed(nan_ckpt, tmp_path, capsys):
    from moec_cli import run_cli

    code, _, err = run_cli(["export", nan_ckpt, "-o", tmp_path / "x" / "m.onnx"], capsys)
    assert code == 2 and "q_proj.weight' holds 2 non-finite" in err and "--allow-nonfinite-weights" in err
    assert not list(tmp_path.glob("x/*"))


class _Backend:
    """A stand-in backend whose logits are fixed; ``bad`` (NaN or Inf) is written at index 5 of
    every step's logits, the index argmax then picks."""

    def __init__(self, bad: float | None = None):
        self.bad, self.max_positions = bad, 64

    def init_cache(self, batch):
        from types import SimpleNamespace

        return SimpleNamespace(layers=[], keys=[], values=[], past_len=0)

    def forward(self, ids, pos, cache):
        from types import SimpleNamespace

        logits = np.zeros((ids.shape[0], ids.shape[1], 8), dtype=np.float32)
        logits[..., 3] = 1.0
        if self.bad is not None:
            logits[..., 5] = self.bad
        return logits, SimpleNamespace(layers=[], keys=[], values=[], past_len=cache.past_len + ids.shape[1])

    def describe(self):
        return {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_verify_reports_nan_as_a_failure_never_as_equal(bad):
    """NaN weights read by both backends (the real case: both load the same checkpoint) give NaN
    logits on both sides at the same place, so argmax agrees everywhere: before the fix verify
    printed "greedy equal" for every step beside a failing max abs."""
    import json

    from moec.compiler.verify import VerifyConfig, format_report, verify_backends

    cfg = VerifyConfig(batch=1, prompt_len=4, decode_steps=2)
    same = verify_backends(_Backend(), _Backend(), cfg, vocab_size=8, chunk_size=None)
    assert same.passed and same.greedy_match == [True, True, True]
    for torch_side, ort_side in ((_Backend(bad), _Backend(bad)), (_Backend(), _Backend(bad)), (_Backend(bad), _Backend())):
        report = verify_backends(torch_side, ort_side, cfg, vocab_size=8, chunk_size=None)
        assert not report.passed and report.greedy_match == [False, False, False]
        assert all(np.isnan(r.max_abs) and not r.passed for r in report.rows)
        assert "greedy token equal per step (prefill, decode...): NO, NO, NO" in format_report(report)
    json.dumps(same.to_dict()), json.dumps(report.to_dict())  # plain Python types for --json
