"""``moec bench NEW --against OLD``: the pairing (order, attribution, stopping) with fake backends
and a fake clock, so nothing here depends on timing; then the real thing on the demo export
(structure only), the CLI, and a closed stdout."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from moec.common.errors import MoecError
from moec.runtime.bench import BENCH_FORMAT, BenchConfig
from moec.runtime.bench_paired import (PairedBackend, PairedConfig, bench_paired, generate_measure, look_points,
                                       run_paired)
from tests.moec_cli import run_cli


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Fake:
    """A backend whose step costs ``ms_per_token`` of fake time per token, and that records the
    order of calls in a shared log."""

    max_positions, eos_token_ids = 64, ()

    def __init__(self, name, ms_per_token, clock, log):
        self.name, self.ms, self.clock, self.log = name, ms_per_token, clock, log

    def init_cache(self, batch):
        return 0

    def forward(self, ids, pos, cache):
        self.log.append(self.name)
        self.clock.t += self.ms * ids.shape[1] / 1e3
        logits = np.zeros((ids.shape[0], ids.shape[1], 8), np.float32)
        logits[..., 3 if self.name == "new" else 5] = 1  # NEW's logits drive the loop: token 3
        return logits, cache + ids.shape[1]

    def describe(self):
        return {"backend": "fake"}


def pair(new_ms=2.0, old_ms=1.0, prompt_len=4):
    clock, log = Clock(), []
    p = PairedBackend(Fake("new", new_ms, clock, log), Fake("old", old_ms, clock, log), prompt_len, clock=clock)
    return p, clock, log


def test_steps_alternate_and_flip_every_round():
    p, clock, log = pair()
    measure = generate_measure(p, BenchConfig(prompt_len=4, gen_len=4, batch=1), prefills=1)
    measure()
    # Round 0: prefill + 3 decode steps, NEW first on even steps.
    assert log == ["new", "old", "old", "new", "new", "old", "old", "new"]
    log.clear()
    measure()
    # Round 1 starts with OLD: every step position is led by each artifact in half the rounds.
    assert log == ["old", "new", "new", "old", "old", "new", "new", "old"]


def test_times_are_attributed_to_each_artifact():
    p, clock, _ = pair(new_ms=2.0, old_ms=1.0)
    measured = generate_measure(p, BenchConfig(prompt_len=4, gen_len=4, batch=2), prefills=3)()
    # Prefill: 4 tokens x 2 ms for NEW, x 1 ms for OLD (the median of three prefills); decode: 1 token.
    assert measured["new"] == (pytest.approx(8.0), [pytest.approx(2.0)] * 3)
    assert measured["old"] == (pytest.approx(4.0), [pytest.approx(1.0)] * 3)


def test_chunked_prefill_is_one_prefill():
    p, clock, _ = pair(new_ms=2.0, old_ms=1.0, prompt_len=5)
    p.max_new_tokens_per_step = 2  # as a TensorRT engine's prefill profile
    measured = generate_measure(p, BenchConfig(prompt_len=5, gen_len=3, batch=1), prefills=2)()
    assert measured["new"][0] == pytest.approx(10.0) and measured["old"][0] == pytest.approx(5.0)
    assert measured["new"][1] == [pytest.approx(2.0)] * 2


def test_new_logits_drive_the_loop_and_both_get_the_same_tokens():
    from moec.runtime.generate import GenerationConfig, generate

    p, _, _ = pair()
    seen = {"new": [], "old": []}
    for who in ("new", "old"):
        orig = p.backends[who].forward

        def spy(ids, pos, cache, who=who, orig=orig):
            seen[who].append(ids.tolist())
            return orig(ids, pos, cache)

        p.backends[who].forward = spy
    out = generate(p, [[1, 2, 3, 4]], GenerationConfig(max_new_tokens=3, stop_on_eos=False))
    assert out.new_tokens == [[3, 3, 3]] and seen["new"] == seen["old"]


def test_run_paired_ratios_and_max_time():
    p, clock, _ = pair(new_ms=3.0, old_ms=2.0)
    bc = BenchConfig(prompt_len=4, gen_len=4, batch=1, warmup=2)
    calls = []
    inner = generate_measure(p, bc, prefills=1)

    def measure():
        calls.append(1)
        clock.t += 0.5  # the round's host-side work: 0.5 s of fake time
        return inner()

    out = run_paired(PairedConfig(bc, max_time=10.0, min_rounds=4), measure, clock=clock)
    # A round is 0.5 s + 35 ms of steps: the 19th round passes 10 s. 2 warm-up rounds come first.
    assert out["stop"] == "max-time" and out["rounds"] == 19 and len(calls) == 21
    assert out["ratios"]["decode_ms_per_step"] == [pytest.approx(1.5)] * 19
    assert out["ratios"]["decode_tokens_per_s"] == [pytest.approx(1 / 1.5)] * 19
    assert out["ratios"]["prefill_ms"] == [pytest.approx(1.5)] * 19
    assert out["new"]["decode_ms_per_step"] == [pytest.approx(3.0)] * 19
    assert len(out["samples"]["new"]["decode_ms_per_step"]) == 19 * 3


def test_run_paired_looks_only_at_its_planned_rounds():
    p, clock, _ = pair()
    bc = BenchConfig(prompt_len=4, gen_len=3, batch=1, warmup=0)
    asked = []

    def decided(ratios):
        asked.append(len(ratios["decode_ms_per_step"]))
        return len(asked) == 2

    out = run_paired(PairedConfig(bc, max_time=1e9, min_rounds=10, looks=4), generate_measure(p, bc, 1), decided,
                     clock=clock)
    assert asked == [10, 40] and out["stop"] == "decided" and out["rounds"] == 40
    assert out["looks"] == 4 and out["looked_at"] == [10, 40]
    # Never decided: the planned early looks (2 of 3 looks) and no more, up to max-rounds.
    asked.clear()
    out = run_paired(PairedConfig(bc, max_time=1e9, min_rounds=5, max_rounds=200), generate_measure(p, bc, 1),
                     lambda r: asked.append(len(r["decode_ms_per_step"])) and False, clock=clock)
    assert asked == [5, 20] and out["stop"] == "max-rounds" and out["rounds"] == 200 and out["looks"] == 3
    # One look in all: the gate's at the end, no early stop.
    assert look_points(30, 1) == () and look_points(30, 3) == (30, 120)
    # max-time is a hard budget, even before the first look.
    out = run_paired(PairedConfig(bc, max_time=1e-9, min_rounds=6), generate_measure(p, bc, 1), decided, clock=clock)
    assert out["rounds"] == 1 and out["stop"] == "max-time" and out["looked_at"] == []


@pytest.mark.parametrize("kwargs, message", [
    ({"max_time": 0.0}, "--max-time must be a positive"),
    ({"max_time": float("nan")}, "--max-time must be a positive"),
    ({"min_rounds": 1}, "--rounds must be >= 2"),
    ({"prefills": 0}, "prefills per round must be >= 1"),
    ({"looks": 0}, "looks must be >= 1"),
])
def test_paired_config_refuses(kwargs, message):
    with pytest.raises(MoecError, match=message):
        PairedConfig(**kwargs)


TINY = PairedConfig(BenchConfig(prompt_len=4, gen_len=3, batch=1, warmup=1, threads=1), max_time=60.0, min_rounds=3,
                    max_rounds=3, prefills=2)


def test_bench_paired_on_the_demo_export(demo_onnx):
    res = bench_paired(demo_onnx, demo_onnx, TINY)
    assert res["format"] == BENCH_FORMAT and res["paired"]["rounds"] == 3 and res["paired"]["stop"] == "max-rounds"
    assert res["against"]["path"] == str(demo_onnx) and res["artifact"]["identity"] == res["against"]["identity"]
    assert res["config"]["threads"] == 1 and res["host"]["cores"] >= 1
    for block in ("metrics", "against_metrics"):
        assert set(res[block]) == {"prefill_ms", "decode_ms_per_step", "decode_tokens_per_s", "prefill_tokens_per_s"}
    n = res["paired"]["rounds"]
    assert all(len(v) == n and all(x > 0 for x in v) for v in res["paired"]["ratios"].values())
    assert res["paired"]["order"].startswith("per step: new, old, old, new")


def test_bench_paired_refuses_another_model(demo_onnx, tmp_path):
    import shutil

    from moec.common import contract

    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copy2(demo_onnx, other)
    side = json.loads(contract.sidecar_path(demo_onnx).read_text())
    side["model_config"]["hidden_size"] = side["model_config"]["hidden_size"] * 2
    contract.sidecar_path(other).write_text(json.dumps(side))
    with pytest.raises(MoecError, match="are different models \\(model_config_sha256"):
        bench_paired(demo_onnx, other, TINY)
    with pytest.raises(MoecError, match="--against .* does not exist"):
        bench_paired(demo_onnx, tmp_path / "nope.onnx", TINY)


def test_cli_bench_against_then_gate(demo_onnx, tmp_path, capsys):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(["bench", demo_onnx, "--against", demo_onnx, "--json-out", out, "--prompt-len", 4,
                                 "--gen-len", 3, "--threads", 1, "--max-time", "0.5", "--rounds", 3], capsys)
    assert code == 0, err
    res = json.loads(out.read_text())
    assert "paired" in res and "OLD decode_ms_per_step" in stdout and "wrote" in stdout
    code, _, err = run_cli(["gate", out, "--max-regression", "900%"], capsys)
    # A few rounds on a shared CPU may not decide even a 900% threshold; never a regression though.
    assert code in (0, 2), err
    code, _, err = run_cli(["bench", demo_onnx, "--against", demo_onnx, "--threads", 0], capsys)
    assert code == 2 and "--threads" in err
    code, _, err = run_cli(["bench", demo_onnx, "--against", demo_onnx, "--max-regression", "5"], capsys)
    assert code == 2 and "ambiguous" in err


def test_cli_bench_refuses_to_write_over_the_against_artifact(demo_onnx, tmp_path, capsys):
    from moec.common import contract

    before = contract.sidecar_path(demo_onnx).read_bytes()
    code, _, err = run_cli(["bench", tmp_path / "x.onnx", "--against", demo_onnx, "--json-out",
                            contract.sidecar_path(demo_onnx)], capsys)
    assert code == 2 and "benched artifact" in err and contract.sidecar_path(demo_onnx).read_bytes() == before


def test_a_closed_stdout_never_loses_the_json(demo_onnx, tmp_path):
    out = tmp_path / "r.json"
    # `moec bench ... --json X | head -c 1`: the reader goes away before the table is printed.
    proc = subprocess.Popen([sys.executable, "-m", "moec.compiler", "bench", str(demo_onnx), "--json-out", str(out),
                             "--prompt-len", "4", "--gen-len", "3", "--repeats", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # closed before the bench prints anything
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err
    assert json.loads(out.read_text())["format"] == BENCH_FORMAT


def test_a_json_that_cannot_be_written_is_an_error(demo_onnx, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(["bench", demo_onnx, "--json-out", blocker / "r.json", "--prompt-len", 4, "--gen-len", 3,
                            "--repeats", 1], capsys)
    assert code == 2 and "r.json" in err and "Traceback" not in err


def test_no_output_buffer_of_either_artifact_outlives_its_step():
    # The loop keeps the logits it gets until the next step; handing it NEW's own buffer gave NEW a
    # step with its previous output still alive and OLD a free one: a bias in self-comparisons.
    kept = {}

    class Keeping(Fake):
        def forward(self, ids, pos, cache):
            logits, cache = super().forward(ids, pos, cache)
            kept[self.name] = logits
            return logits, cache

    clock, log = Clock(), []
    p = PairedBackend(Keeping("new", 1.0, clock, log), Keeping("old", 1.0, clock, log), 4, clock=clock)
    logits, _ = p.forward(np.zeros((1, 4), np.int64), np.arange(4)[None], p.init_cache(1))
    assert not np.shares_memory(logits, kept["new"]) and not np.shares_memory(logits, kept["old"])
    assert np.array_equal(logits, kept["new"])  # NEW's logits still drive the loop
