"""Partitioning (passes/partition, compiler/partition.py) on the demo export, in one process.

Every rank's graph is run with ONNX Runtime, all ranks in lockstep on threads, the collectives
summed in memory (tests/runtime/test_parallel.py runs the same graphs as real processes over
torch.distributed): logits must equal the unsplit graph's within 1e-5 (fp32).
"""

from __future__ import annotations

import json
import threading

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.partition import ParallelConfig, optimize_partitioned
from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
from moec.passes.partition import Mapping
from moec.runtime.parallel.segments import SegmentedGraph

CONFIGS = {"tp2": (2, 1), "ep2": (1, 2), "tp2xep2": (2, 2), "ep4": (1, 4)}


@pytest.fixture(scope="module")
def single(demo_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "model.onnx"
    optimize_onnx(demo_onnx, out, OptimizeConfig(target="ort"))
    return out


@pytest.fixture(scope="module")
def parts(demo_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    cache = {}

    def get(name: str, target: str = "ort"):
        if (name, target) not in cache:
            tp, ep = CONFIGS[name]
            out = root / f"{name}_{target.replace(':', '_')}"
            optimize_partitioned(demo_onnx, out, OptimizeConfig(target=target), ParallelConfig(tp, ep))
            cache[(name, target)] = out
        return cache[(name, target)]

    return get


def lockstep(graphs, feeds_per_rank):
    """Run every rank's SegmentedGraph on its own thread; a collective sums its group's inputs."""
    world = len(graphs)
    barrier, lock, board, results = threading.Barrier(world, timeout=60), threading.Lock(), {}, [None] * world

    def collective(rank):
        def reduce(c, x):
            with lock:
                board.setdefault(c.name, {})[rank] = x
            barrier.wait()
            out = sum(board[c.name][g] for g in (c.group or range(world)))
            barrier.wait()
            with lock:
                board.pop(c.name, None)
            return out
        return reduce

    def work(rank):
        results[rank] = graphs[rank].run(feeds_per_rank[rank], collective(rank))

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results)
    return results


def _empty_caches(graph_path, batch: int, kv_heads: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """An empty cache per layer as the graph declares it: a full cache [B, K, 0, D], a chunked
    layer's ring [B, K, R, D] of zeros (its slot axis R is fixed in the graph)."""
    inputs = {i.name: i.type.tensor_type.shape.dim for i in onnx.load(str(graph_path), load_external_data=False).graph.input}
    out = []
    for layer in range(len([n for n in inputs if n.startswith("past_key.")])):
        dims = inputs[contract.past_key(layer)]
        slots = dims[2].dim_value if dims[2].HasField("dim_value") else 0
        empty = np.zeros((batch, kv_heads, slots, dims[3].dim_value), np.float32)
        out.append((empty, empty.copy()))
    return out


def _feeds(ids, pos, caches):
    f = {contract.INPUT_IDS: ids, contract.POSITION_IDS: pos}
    for i, (k, v) in enumerate(caches):
        f[contract.past_key(i)], f[contract.past_value(i)] = k, v
    return f


@pytest.mark.parametrize("name,target", [*((n, "ort") for n in CONFIGS), ("tp2xep2", "trt-rtx:sm89")])
def test_ranks_match_the_single_graph(name, target, parts, single):
    """Prefill over a chunk boundary, then 12 greedy decode steps: every rank's logits within
    1e-5 of the unsplit graph, the same greedy tokens, the KV cache split by kv head. The
    trt-rtx graph keeps attention unfused (GQA as Unsqueeze/Expand/Reshape): other head shapes."""
    import onnxruntime as ort

    folder = parts(name, target)
    manifest = json.loads((folder / contract.PARALLEL_MANIFEST).read_text())
    world, tp = manifest["world_size"], manifest["tp"]
    graphs = [SegmentedGraph(folder / contract.rank_onnx(r)) for r in range(world)]
    ref = ort.InferenceSession(str(single), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in ref.get_outputs()]
    B, L, K = 2, 4, 2
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (B, 11)).astype(np.int64)
    pos = np.tile(np.arange(11), (B, 1)).astype(np.int64)
    ref_cache = _empty_caches(single, B, K)
    rank_caches = [_empty_caches(folder / contract.rank_onnx(r), B, K // tp) for r in range(world)]
    # Layers 0-2 are chunked: a ring of one chunk (8 slots) on every rank; layer 3 grows.
    assert [c[0].shape[2] for c in rank_caches[0]] == [8, 8, 8, 0]
    mapping = Mapping(manifest["tp"], manifest["ep"])
    worst = 0.0
    for step in range(13):
        want = dict(zip(out_names, ref.run(None, _feeds(ids, pos, ref_cache))))
        got = lockstep(graphs, [_feeds(ids, pos, c) for c in rank_caches])
        for r in range(world):
            worst = max(worst, float(np.abs(got[r]["logits"] - want["logits"]).max()))
            assert got[r][contract.present_key(0)].shape[1] == K // tp
            # Each rank's caches (the rings too) are its kv heads' slice of the unsplit graph's.
            lo, hi = mapping.kv_heads(r, K)
            for i in (0, L - 1):
                np.testing.assert_allclose(got[r][contract.present_key(i)], want[contract.present_key(i)][:, lo:hi],
                                           rtol=0, atol=1e-5)
            rank_caches[r] = [(got[r][contract.present_key(i)], got[r][contract.present_value(i)]) for i in range(L)]
            np.testing.assert_array_equal(got[r]["logits"][:, -1].argmax(-1), want["logits"][:, -1].argmax(-1))
        ref_cache = [(want[contract.present_key(i)], want[contract.present_value(i)]) for i in range(L)]
        nxt = want["logits"][:, -1].argmax(-1)
        pos = np.full((B, 1), pos[0, -1] + 1, np.int64)
        ids = nxt[:, None].astype(np.int64)
    assert worst <= 1e-5, worst


def test_collectives_in_the_rank_graphs(parts):
    """tp: one all-reduce after every o projection and dense down projection (tp group); every
    MoE layer: one world all-reduce of shared + routed experts; nothing else."""
    expected = {"tp2": 4 + 2 + 2, "ep2": 2, "tp2xep2": 4 + 2 + 2, "ep4": 2}
    for name, n in expected.items():
        model = onnx.load(str(parts(name) / contract.rank_onnx(1)), load_external_data=False)
        nodes = [x for x in model.graph.node if x.op_type == contract.DIST_COLLECTIVE]
        assert len(nodes) == n, name
        world = CONFIGS[name][0] * CONFIGS[name][1]
        for node in nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["collective_operation"] == b"all_reduce" and attrs["reduce_op"] == b"sum"
            assert attrs["root"] == -1 and attrs["nb_rank"] == world
            if name == "tp2xep2" and "_tp_" in node.name:  # rank 1 is in tp group (0, 1)
                assert list(attrs["groups"]) == [0, 1] and attrs["group_size"] == 2
            else:
                assert "groups" not in attrs


def test_per_rank_weight_bytes(parts, demo_onnx):
    """Each rank holds 1/parts of every sharded tensor (parts = tp, ep, or tp x ep), whole
    replicated tensors (listed in parallel.json), and nothing else of the source's weights."""
    src = ir.load(demo_onnx).graph.initializers
    for name in CONFIGS:
        manifest = json.loads((parts(name) / contract.PARALLEL_MANIFEST).read_text())
        mapping = Mapping(manifest["tp"], manifest["ep"])
        sharded = manifest["plan"]["sharded"]
        assert sharded and "model.embed_tokens.weight" in manifest["plan"]["replicated"]
        assert "lm_head.weight.T" in manifest["plan"]["replicated"] and manifest["plan"]["vocab_projection"] == "replicated"
        def full(n):  # the fusion/cleanup may transpose a source weight (.T): same bytes
            v = src.get(n) or src.get(n.removesuffix(".T"))
            return v.const_value.nbytes
        want = sum(full(n) // int(np.prod([mapping.parts(s["by"]) for s in shards])) for n, shards in sharded.items())
        for r in manifest["ranks"]:
            assert r["sharded_bytes"] == want, (name, r)
            assert r["replicated_bytes"] > 0
        if name == "ep4":  # attention and dense MLPs stay whole under pure ep
            assert not any("self_attn" in n or ".feed_forward.gate_proj" in n for n in sharded)


@pytest.mark.parametrize("tp,ep,what", [(4, 1, "2 kv heads"), (3, 1, "4 attention heads"), (1, 3, "4 experts")])
def test_indivisible_split_refused_before_any_work(demo_onnx, tmp_path, tp, ep, what):
    out = tmp_path / "out"
    with pytest.raises(MoecError, match=what):
        optimize_partitioned(demo_onnx, out, OptimizeConfig(target="ort"), ParallelConfig(tp, ep))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_folder_of_the_users_refused(demo_onnx, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(MoecError, match="not an earlier output"):
        optimize_partitioned(demo_onnx, out, OptimizeConfig(target="ort"), ParallelConfig(2, 1))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_rank_files_and_manifest(parts, demo_onnx):
    from moec.common.artifacts import sha256_file

    folder = parts("tp2xep2")
    manifest = json.loads((folder / contract.PARALLEL_MANIFEST).read_text())
    assert manifest["world_size"] == 4 and manifest["source"]["sha256"] == sha256_file(demo_onnx)
    assert [r["experts"] for r in manifest["plan"]["ranks"]] == [[0, 2], [0, 2], [2, 4], [2, 4]]
    assert [r["kv_heads"] for r in manifest["plan"]["ranks"]] == [[0, 1], [1, 2], [0, 1], [1, 2]]
    for r in manifest["ranks"]:
        assert sha256_file(folder / r["file"]) == r["sha256"]
        side = json.loads(contract.sidecar_path(folder / r["file"]).read_text())
        assert side["parallel"]["rank"] == r["rank"] and side["parallel"]["partition_id"] == manifest["partition_id"]
    assert (folder / contract.TOKENIZER_FILE).is_file()


def test_moec_optimize_cli(demo_onnx, tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from moec_cli import run_cli

    out = tmp_path / "ranks"
    code, stdout, err = run_cli(["optimize", demo_onnx, "-o", out, "--target", "ort", "--tp", "3"], capsys)
    assert code == 2 and "4 attention heads (num_attention_heads) over tp 3" in err and "Traceback" not in err
    assert not out.exists()
    code, stdout, err = run_cli(["optimize", demo_onnx, "-o", out, "--target", "ort", "--ep", "2"], capsys)
    assert code in (0, None), err
    assert sorted(p.name for p in out.iterdir()) == [".moec-output.json", "parallel.json", "rank0.moec.json", "rank0.onnx",
                                                     "rank1.moec.json", "rank1.onnx", "tokenizer.json"]
    code, stdout, err = run_cli(["optimize", demo_onnx, "-o", out, "--target", "ort"], capsys)
    assert code == 2 and "is a folder" in err


def test_external_data_rank_files(demo_onnx, single, tmp_path):
    """An export with external weights: rank files keep theirs external, and the segments read
    them in place (no copy, no file written at run time)."""
    import shutil

    import onnxruntime as ort

    src = tmp_path / "exp"
    src.mkdir()
    model = onnx.load(str(demo_onnx))
    onnx.save(model, str(src / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    for f in (contract.sidecar_path(demo_onnx), demo_onnx.parent / contract.TOKENIZER_FILE):
        shutil.copyfile(f, src / f.name)
    out = tmp_path / "ranks"
    optimize_partitioned(src / "model.onnx", out, OptimizeConfig(target="ort"), ParallelConfig(2, 1))
    assert (out / "rank0.onnx.data").is_file() and (out / "rank1.onnx.data").is_file()
    before = sorted(p.name for p in out.iterdir())
    graphs = [SegmentedGraph(out / contract.rank_onnx(r)) for r in range(2)]
    ids = np.array([[1, 2, 3, 4]], np.int64)
    pos = np.arange(4, dtype=np.int64)[None]
    want = ort.InferenceSession(str(single), providers=["CPUExecutionProvider"]).run(
        ["logits"], _feeds(ids, pos, _empty_caches(single, 1, 2)))[0]
    got = lockstep(graphs, [_feeds(ids, pos, _empty_caches(out / contract.rank_onnx(0), 1, 1))] * 2)
    assert float(np.abs(got[0]["logits"] - want).max()) <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == before
