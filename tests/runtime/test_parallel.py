"""Partitioned demo models as real processes over torch.distributed (gloo): ``moec run`` spawning
the ranks, torchrun starting them, logits against the single graph, a rank dying, bad rank sets.

Each test starts 2-4 Python processes (seconds each on a busy machine); every join has a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
import parallel_workers  # noqa: E402
from moec_cli import run_cli  # noqa: E402

from moec.common.errors import MoecError
from moec.compiler.partition import ParallelConfig, optimize_partitioned
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.runtime.parallel.launch import _free_port
from moec.runtime.parallel.rankset import check_rank_set

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
STEPS = 40


@pytest.fixture(scope="module")
def single(demo_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort"))
    return out


@pytest.fixture(scope="module")
def reference(single):
    """The single-rank greedy tokens and per-step last logits, 40 steps."""
    from moec.runtime.generate import GenerationConfig, generate
    from moec.runtime.ort_backend import OrtBackend

    backend = OrtBackend.from_onnx(single)
    seen = []
    forward = backend.forward

    def recording(ids, pos, cache):
        logits, cache = forward(ids, pos, cache)
        seen.append(logits[:, -1].copy())
        return logits, cache

    backend.forward = recording
    result = generate(backend, PROMPT, GenerationConfig(max_new_tokens=STEPS, stop_on_eos=False))
    return result.new_tokens, np.stack(seen)


@pytest.fixture(scope="module")
def part(demo_onnx, tmp_path_factory):
    cache = {}

    def get(tp, ep):
        if (tp, ep) not in cache:
            out = tmp_path_factory.mktemp(f"tp{tp}ep{ep}") / "ranks"
            optimize_partitioned(demo_onnx, out, OptimizeConfig(target="ort"), ParallelConfig(tp, ep))
            cache[(tp, ep)] = out
        return cache[(tp, ep)]

    return get


def _spawn(fn, world, args, timeout_s=180):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    import time

    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks did not finish within {timeout_s} s")


@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2), (2, 2), (1, 4)])
def test_moec_run_gives_the_single_rank_tokens(tp, ep, part, reference, capsys):
    code, out, err = run_cli(["run", part(tp, ep), "--prompt-ids", " ".join(map(str, PROMPT)),
                              "--max-new-tokens", STEPS, "--temperature", 0, "--json"], capsys)
    assert code in (0, None), err
    result = json.loads(out)
    assert result["describe"]["world_size"] == str(tp * ep) and result["describe"]["process_group"] == "gloo"
    # EOS may stop the single rank and the ranks alike; compare what both produced
    tokens = reference[0][0]
    assert result["ids"] == tokens[: len(result["ids"])] and len(result["ids"]) == len(tokens)


def test_logits_over_processes_match_the_single_graph(part, reference, tmp_path):
    """tp 2 x ep 2, 4 processes: rank 0's logits of every one of 40 steps within 1e-5."""
    folder = part(2, 2)
    _spawn(parallel_workers.record_logits, 4,
           (str(folder), 4, f"tcp://127.0.0.1:{_free_port()}", PROMPT, STEPS, str(tmp_path)))
    logits = np.load(tmp_path / "logits.npy")
    tokens, want = reference
    assert json.loads((tmp_path / "tokens.json").read_text()) == tokens
    assert logits.shape == want.shape
    assert float(np.abs(logits - want).max()) <= 1e-5


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun not installed")
def test_torchrun_starts_the_ranks(part, reference):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    moec = str(Path(sys.executable).parent / "moec")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(_free_port()), moec, "run",
                           str(part(1, 2)), "--prompt-ids", " ".join(map(str, PROMPT)), "--max-new-tokens", str(STEPS),
                           "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    assert json.loads(lines[0])["ids"] == reference[0][0][: len(json.loads(lines[0])["ids"])]


def test_torchrun_world_size_mismatch_refused(part, tmp_path):
    """3 processes for a 2-rank partition: every rank stops with a named error before any work."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    proc = subprocess.run([str(Path(sys.executable).parent / "moec"), "run", str(part(1, 2)), "--prompt-ids", "1 2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "partitioned for 2 ranks (tp 1 x ep 2) but 3 were launched" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_rank_dying_stops_the_others_with_a_named_error(part, tmp_path):
    """Plain processes (torch's spawn join would kill the survivor itself): rank 1 exits hard on
    its 4th step, rank 0 must stop by itself with RankLost, well within the timeout."""
    import multiprocessing

    folder = part(1, 2)
    ctx = multiprocessing.get_context("spawn")
    args = (str(folder), 2, f"tcp://127.0.0.1:{_free_port()}", str(tmp_path), 1, 20)
    procs = [ctx.Process(target=parallel_workers.die_mid_generation, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung"
    assert procs[1].exitcode == 17 and procs[0].exitcode == 0
    survivor = json.loads((tmp_path / "rank0.txt").read_text())
    assert survivor["type"] == "RankLost"
    assert "rank 0:" in survivor["message"] and "another rank has stopped" in survivor["message"]
    assert survivor["after_s"] < 60
    assert not (tmp_path / "rank1.txt").exists()  # it died


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def test_bad_rank_sets_refused(part, tmp_path, capsys):
    a = _copy(part(1, 2), tmp_path / "a")
    (a / "rank1.onnx").unlink()
    with pytest.raises(MoecError, match=r"missing rank file rank1\.onnx"):
        check_rank_set(a)
    mixed = _copy(part(1, 2), tmp_path / "mixed")
    shutil.copyfile(part(2, 1) / "rank1.onnx", mixed / "rank1.onnx")
    with pytest.raises(MoecError, match="rank graph of another partition"):
        check_rank_set(mixed)
    before = sorted(p.name for p in mixed.iterdir())
    code, out, err = run_cli(["run", mixed, "--prompt-ids", "1 2"], capsys)
    assert code == 2 and "another partition" in err and sorted(p.name for p in mixed.iterdir()) == before
    with pytest.raises(MoecError, match="but 4 were launched"):
        check_rank_set(part(1, 2), 4)


def test_moec_bench_on_a_partition_folder(part, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", part(1, 2), "--json-out", out, "--prompt-len", 8, "--gen-len", 6,
                                 "--repeats", 2, "--warmup", 0], capsys)
    assert code in (0, None), err
    result = json.loads(out.read_text())
    assert result["artifact"]["kind"] == "ort-parallel" and result["backend"]["world_size"] == "2"
    assert result["metrics"]["decode_ms_per_step"]["p50"] > 0 and result["collective_s"] > 0
