"""Weight bytes per rank of a tp x ep split, from a config.json, with the split rules of
passes/partition (Mapping's slices; the plan's sharded and replicated tensors).

    python benchmarks/parallel_bytes.py            # Maverick at ep 8 (bf16, fp8), results/parallel_bytes.{json,md}

The same count is checked against a real partition first: the demo model split tp 2 x ep 2 by
``moec optimize`` records each rank's sharded and replicated bytes in parallel.json; the count
here must give exactly those numbers, or the script stops.

fp8 has two readings (the FP8 Maverick release's quantization_config was not found; see
../shared/llama4-configs/README.md): "fp8 experts" = routed experts in F8_E4M3 (1 byte), all else
bf16, as third-party loaders read that release; "fp8 matrices" = every decoder-layer matrix in
fp8, embedding, vocab projection and norms bf16. Scales (one per row) are counted as bf16 rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAVERICK = ROOT.parent.parent / "shared" / "llama4-configs" / "Llama-4-Maverick-17B-128E-Instruct.config.json"


def rank_bytes(c: dict, tp: int, ep: int, rank: int, *, expert_bytes: float = 2, matrix_bytes: float = 2,
               other_bytes: float = 2) -> dict:
    """{"sharded": ..., "replicated": ...} bytes of rank ``rank``; ``*_bytes`` per element."""
    from moec.passes.partition.mapping import Mapping

    m = Mapping(tp, ep)
    H, N, K, D = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    E, I, I_mlp, V, L = c["num_local_experts"], c["intermediate_size"], c["intermediate_size_mlp"], c["vocab_size"], c["num_hidden_layers"]
    moe = set(c["moe_layers"])
    part = lambda by: m.parts(by)
    # scales: one bf16 per output row of every fp8 matrix
    scaled = lambda rows, b: 2 * rows if b < 2 else 0
    sharded = replicated = 0.0
    for layer in range(L):
        attn = H * N * D + 2 * H * K * D + N * D * H
        attn_b = attn * matrix_bytes + scaled(N * D + 2 * K * D + H, matrix_bytes)
        if tp > 1:
            sharded += attn_b / tp
        else:
            replicated += attn_b
        replicated += 2 * H * other_bytes  # the layer's two norms
        if layer in moe:
            routed = E * (H * 2 * I + I * H) * expert_bytes + scaled(E * (2 * I + H), expert_bytes)
            shared = 3 * H * I * matrix_bytes + scaled(2 * I + H, matrix_bytes)
            sharded += routed / (part("ep") * part("tp")) + shared / part("world")
            replicated += E * H * other_bytes  # router
        else:
            dense = 3 * H * I_mlp * matrix_bytes + scaled(2 * I_mlp + H, matrix_bytes)
            if tp > 1:
                sharded += dense / tp
            else:
                replicated += dense
    replicated += (2 * V * H + H) * other_bytes  # embedding, vocab projection, final norm
    return {"sharded": sharded, "replicated": replicated, "total": sharded + replicated}


def check_against_a_partition() -> dict:
    """The count above, fp32, against what ``moec optimize --tp 2 --ep 2`` records for the demo."""
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.partition import ParallelConfig, optimize_partitioned
    from moec.compiler.pipeline import OptimizeConfig
    from moec.models.demo import write_demo_checkpoint

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_demo_checkpoint(d / "ckpt")
        export_onnx(d / "ckpt", d / "exp" / "model.onnx", ExportConfig(dtype="fp32"))
        optimize_partitioned(d / "exp" / "model.onnx", d / "part", OptimizeConfig(target="ort"), ParallelConfig(2, 2))
        manifest = json.loads((d / "part" / "parallel.json").read_text())
        config = json.loads((d / "exp" / "model.moec.json").read_text())["model_config"]
    got = []
    for r in manifest["ranks"]:
        want = rank_bytes(config, 2, 2, r["rank"], expert_bytes=4, matrix_bytes=4, other_bytes=4)
        # the partition also keeps RoPE's inverse frequencies (D/2 fp32), which the count leaves out
        extra = r["replicated_bytes"] - want["replicated"]
        if r["sharded_bytes"] != want["sharded"] or extra != config["head_dim"] // 2 * 4:
            sys.exit(f"count differs from the partition: rank {r['rank']} {r} vs {want}")
        got.append({"rank": r["rank"], "sharded": r["sharded_bytes"], "replicated": r["replicated_bytes"]})
    return {"demo_tp2_ep2": got, "agrees": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=MAVERICK)
    ap.add_argument("--ep", type=int, default=8)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parallel_bytes")
    args = ap.parse_args()
    from moec.models.config import Llama4Config

    check = check_against_a_partition()
    cfg = Llama4Config.from_pretrained(args.config).to_dict()
    rows = []
    for label, kw in [("bf16", {}), ("fp8 experts", {"expert_bytes": 1}),
                      ("fp8 matrices", {"expert_bytes": 1, "matrix_bytes": 1})]:
        whole = rank_bytes(cfg, 1, 1, 0, **kw)["total"]
        per = rank_bytes(cfg, args.tp, args.ep, 0, **kw)
        rows.append({"precision": label, "whole_model_GB": whole / 1e9, "per_rank_GB": per["total"] / 1e9,
                     "sharded_GB": per["sharded"] / 1e9, "replicated_GB": per["replicated"] / 1e9})
    result = {"config": str(args.config.name), "tp": args.tp, "ep": args.ep, "rows": rows, "check": check}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Weight bytes per rank: {args.config.name}, tp {args.tp} x ep {args.ep}", "",
             "Counted with the partition's split rules (benchmarks/parallel_bytes.py; the count equals what `moec optimize "
             "--tp 2 --ep 2` records for the demo model). Under pure ep, attention, dense MLPs, router, norms, embedding "
             "and vocab projection are replicated; routed experts split E/ep, the shared expert's intermediate split over "
             "the ranks. GB = 1e9 bytes; fp8 adds one bf16 scale per output row.", "",
             "| precision | whole model GB | per rank GB | of which sharded | of which replicated |", "|---|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['whole_model_GB']:.1f} | {r['per_rank_GB']:.1f} | {r['sharded_GB']:.1f} | "
              f"{r['replicated_GB']:.1f} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
