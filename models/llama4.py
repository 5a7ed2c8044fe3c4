"""The Llama 4 text model in plain PyTorch, written to be exported.

Same numbers as transformers' ``Llama4ForCausalLM`` (tests/models checks it to 1e-4 in fp32) but
shaped for ``torch.onnx.export(dynamo=True)``:

- RoPE is real arithmetic on (even, odd) pairs; transformers uses complex tensors, which the
  exporter cannot decompose.
- The KV cache is plain tensors in and out: one ``(key, value)`` pair per layer, of one of two
  kinds (``cache_kinds``). A full cache (NoPE layers) is [B, K, P, D]: slot j holds position j.
  A chunked layer's cache is a ring [B, K, R, D] of R = ``ring_slots`` slots (the attention chunk,
  or the context when that is shorter): position p sits at slot p mod R, and slots holding no
  position of the query's chunk are masked out, so the cache, the masks and the scores of 3 layers
  in 4 stay the size of one chunk whatever the context. Masks come from the positions alone, so
  one graph serves prefill (P = 0), decode (S = 1) and chunked prefill continuing from a cache.
  ``ring_slots = None`` gives chunked layers a full cache too (the layout before rings; tests
  compare the two).
- Eager evaluation of a long prompt runs in query blocks (``query_block``), so no [B, N, S, T]
  score tensor past a fixed budget exists; a traced graph (symbolic S) is one block.
- No Python branch depends on tensor values; branches on the config are fixed at trace time.

Parameter names match the Hugging Face checkpoint keys (``model.layers.N.feed_forward.experts.
gate_up_proj`` ...), so a state dict loads without renaming.

Shape letters: B batch, S new tokens, P past tokens, T = P + S keys (or B*S tokens in the MoE
block), H hidden, N query heads, K kv heads, D head dim, E experts, I expert intermediate, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moec.models.config import Llama4Config, RopeParameters

KVCache = list[tuple[torch.Tensor, torch.Tensor]]

CACHE_FULL = "full"
CACHE_CHUNKED = "chunked"
# Score elements (B x N x queries x keys) one eager attention block may hold: 2^26 fp32 scores are
# 256 MiB, and softmax keeps about three such tensors alive at once.
SCORE_BUDGET = 1 << 26


def rope_inv_freq(rope: RopeParameters, head_dim: int) -> torch.Tensor:
    """Inverse RoPE frequencies [D/2], float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (rope.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "default":
        return inv_freq
    # Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth blend in
    # between. torch.where keeps the blend's inf/nan (when low == high freq factor, as in Scout)
    # out of the result, as in transformers.
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps) * self.weight


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last axis, in fp32, returned in x's dtype (weightless: also the QK norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def apply_rope(x_BSND: torch.Tensor, cos_BSF: torch.Tensor, sin_BSF: torch.Tensor) -> torch.Tensor:
    """Rotate (even, odd) pairs of the last axis; F = D/2 frequencies. Computed in fp32."""
    B, S, N, D = x_BSND.shape
    pairs = x_BSND.float().reshape(B, S, N, D // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos_BSF[:, :, None, :], sin_BSF[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.reshape(B, S, N, D).type_as(x_BSND)


class SwiGLU(nn.Module):
    """Dense layers' MLP and the MoE block's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All routed experts as two stacked weights (the checkpoint's own layout)."""

    def __init__(self, config: Llama4Config):
        super().__init__()
        E, H, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, H, 2 * I))  # w_gate_up_EHI2, gate first half
        self.down_proj = nn.Parameter(torch.zeros(E, I, H))  # w_down_EIH


class MoE(nn.Module):
    """Llama 4's MoE block, in the reference's dense-over-experts formulation.

    Every expert runs on every token, with the token pre-multiplied by its router score (0 for
    unselected experts), so the result is exact for any k but costs E times the needed compute.
    The graph passes (moec.passes) recognise exactly this pattern and replace it with a grouped
    kernel, so keep it in this shape. torch.onnx.export(dynamo=True), fp32, exports it as (checked
    on torch 2.13): Gemm (router), TopK, Expand (the -inf fill), ScatterElements, Sigmoid, Tile
    (repeat over experts), Transpose + Reshape of the scores, Mul (score x input), Reshape to
    [E, T, H], MatMul (gate_up), Split, Sigmoid + Mul (SiLU), Mul (x up), MatMul (down),
    ReduceSum over E, Add (+ the shared expert's Gemms). In fp16/bf16 Casts surround the routing.
    """

    def __init__(self, config: Llama4Config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = Experts(config)
        self.shared_expert = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        E, H = self.num_experts, self.hidden_size
        x_TH = x_BSH.reshape(-1, H)
        # Routing in fp32 whatever the model dtype: top-k on the raw logits, sigmoid of the
        # selected ones, 0 (= sigmoid(-inf)) for the rest. For fp32 the casts vanish.
        logits_TE = self.router(x_TH).float()
        top_TK, experts_TK = torch.topk(logits_TE, self.top_k, dim=1)
        scores_TE = torch.full_like(logits_TE, float("-inf")).scatter(1, experts_TK, top_TK)
        scores_TE = torch.sigmoid(scores_TE).to(x_TH.dtype)
        # The score multiplies the expert INPUT (not its output, unlike Mixtral).
        routed_in_ET_H = x_TH.repeat(E, 1) * scores_TE.transpose(0, 1).reshape(-1, 1)
        routed_in_ETH = routed_in_ET_H.view(E, -1, H)
        gate_up_ETI2 = torch.bmm(routed_in_ETH, self.experts.gate_up_proj)
        gate_ETI, up_ETI = gate_up_ETI2.chunk(2, dim=-1)
        routed_out_ETH = torch.bmm(up_ETI * F.silu(gate_ETI), self.experts.down_proj)
        out_TH = self.shared_expert(x_TH) + routed_out_ETH.sum(dim=0)
        return out_TH.view(x_BSH.shape)


class Attention(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        H, N, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, D
        self.scaling = D**-0.5
        self.use_rope = config.uses_rope(layer)
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        self.floor_scale = float(config.floor_scale)
        self.attn_scale = config.attn_scale
        self.norm_eps = config.rms_norm_eps
        bias = config.attention_bias
        self.q_proj = nn.Linear(H, N * D, bias=bias)
        self.k_proj = nn.Linear(H, K * D, bias=bias)
        self.v_proj = nn.Linear(H, K * D, bias=bias)
        self.o_proj = nn.Linear(N * D, H, bias=bias)

    def forward(
        self,
        x_BSH: torch.Tensor,
        position_ids_BS: torch.Tensor,
        cos_BSF: torch.Tensor,
        sin_BSF: torch.Tensor,
        mask_B1ST: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        ring_index_R: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``ring_index_R``: for a ring cache, which of the R + S keys (ring, then new) each of the
        R slots keeps (``ring_update_index``); None for a full cache (present = past + new)."""
        B, S, _ = x_BSH.shape
        N, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        q_BSND = self.q_proj(x_BSH).view(B, S, N, D)
        k_BSKD = self.k_proj(x_BSH).view(B, S, K, D)
        v_BKSD = self.v_proj(x_BSH).view(B, S, K, D).transpose(1, 2)

        if self.use_rope:
            q_BSND = apply_rope(q_BSND, cos_BSF, sin_BSF)
            k_BSKD = apply_rope(k_BSKD, cos_BSF, sin_BSF)
        if self.use_qk_norm:  # after RoPE, RoPE layers only, no weight
            q_BSND = rms_normalize(q_BSND, self.norm_eps)
            k_BSKD = rms_normalize(k_BSKD, self.norm_eps)
        if self.temperature_tuning:
            # NoPE layers sharpen attention at long range: scale q by 1 + attn_scale * log1p(floor((pos + 1) / floor_scale)).
            scale_BS = torch.log1p(torch.floor((position_ids_BS.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q_BSND = (q_BSND * scale_BS[:, :, None, None]).to(x_BSH.dtype)

        q_BNSD = q_BSND.transpose(1, 2)
        k_BKSD = k_BSKD.transpose(1, 2)
        if past is not None:
            k_BKTD = torch.cat((past[0], k_BKSD), dim=2)
            v_BKTD = torch.cat((past[1], v_BKSD), dim=2)
        else:
            k_BKTD, v_BKTD = k_BKSD, v_BKSD

        # Grouped-query attention: each kv head serves N / K query heads.
        groups = N // K
        T = k_BKTD.shape[2]
        k_BNTD = k_BKTD[:, :, None].expand(B, K, groups, T, D).reshape(B, N, T, D)
        v_BNTD = v_BKTD[:, :, None].expand(B, K, groups, T, D).reshape(B, N, T, D)
        scores_BNST = torch.matmul(q_BNSD, k_BNTD.transpose(2, 3)) * self.scaling
        scores_BNST = scores_BNST + mask_B1ST.to(scores_BNST.dtype)
        # Softmax in fp32 so fp16 graphs do not overflow; a no-op in fp32.
        probs_BNST = torch.softmax(scores_BNST.float(), dim=-1).to(v_BNTD.dtype)
        out_BSND = torch.matmul(probs_BNST, v_BNTD).transpose(1, 2)
        out_BSH = self.o_proj(out_BSND.reshape(B, S, N * D))
        if ring_index_R is not None:
            return out_BSH, (k_BKTD.index_select(2, ring_index_R), v_BKTD.index_select(2, ring_index_R))
        return out_BSH, (k_BKTD, v_BKTD)


class DecoderLayer(nn.Module):
    def __init__(self, config: Llama4Config, layer: int):
        super().__init__()
        self.chunked = config.uses_chunked_attention(layer)
        self.self_attn = Attention(config, layer)
        self.feed_forward = (
            MoE(config) if config.is_moe_layer(layer) else SwiGLU(config.hidden_size, config.intermediate_size_mlp)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_BSH, position_ids_BS, cos_BSF, sin_BSF, masks, past, ring_index_R=None):
        """``masks``: (causal, chunked) from ``attention_masks``; ``ring_index_R`` only on a
        chunked layer with a ring cache (then ``masks[1]`` is the ring's mask)."""
        mask_B1ST = masks[1] if self.chunked else masks[0]
        attn_BSH, present = self.self_attn(
            self.input_layernorm(x_BSH), position_ids_BS, cos_BSF, sin_BSF, mask_B1ST, past, ring_index_R
        )
        h_BSH = x_BSH + attn_BSH
        return h_BSH + self.feed_forward(self.post_attention_layernorm(h_BSH)), present


class RotaryEmbedding(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.rope = config.rope_parameters
        self.head_dim = config.head_dim
        # Not persistent: derived from the config, never in a checkpoint.
        self.register_buffer("inv_freq", rope_inv_freq(self.rope, self.head_dim), persistent=False)

    def reset_inv_freq(self, device: torch.device | str) -> None:
        """Recompute the buffer (after the module was built on the meta device)."""
        self.inv_freq = rope_inv_freq(self.rope, self.head_dim).to(device)

    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSF = position_ids_BS[..., None].float() * self.inv_freq.float()
        return torch.cos(freqs_BSF), torch.sin(freqs_BSF)


class Llama4TextModel(nn.Module):
    def __init__(self, config: Llama4Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def attention_masks(
    position_ids_BS: torch.Tensor,
    past_len: torch.Tensor | int,
    chunk_size: int | None,
    dtype: torch.dtype,
    chunked: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive masks [B, 1, S, P + S] over a full cache: (causal, chunked causal).

    Key slot j is at absolute position j. Chunked attention (RoPE layers) lets a query at position
    p see keys at positions in [chunk_start(p), p]; NoPE layers see all of [0, p]. ``chunked``
    False: the second mask is not needed (ring caches have their own) and is the causal one.
    """
    S = position_ids_BS.shape[1]
    key_pos_T = torch.arange(past_len + S, device=position_ids_BS.device)
    q_BS1 = position_ids_BS[:, :, None]
    causal_BST = key_pos_T[None, None, :] <= q_BS1
    # finfo.min rather than -inf: adding two of them stays finite-negative, never NaN.
    neg = torch.finfo(dtype).min
    zero = torch.zeros((), dtype=dtype, device=position_ids_BS.device)
    causal = torch.where(causal_BST, zero, neg)[:, None]
    if chunk_size is None or not chunked:
        return causal, causal
    same_chunk_BST = torch.div(key_pos_T, chunk_size, rounding_mode="floor")[None, None, :] == torch.div(
        q_BS1, chunk_size, rounding_mode="floor"
    )
    chunked = torch.where(causal_BST & same_chunk_BST, zero, neg)[:, None]
    return causal, chunked


def ring_slot_positions(start_B1: torch.Tensor, ring_slots: int) -> torch.Tensor:
    """[B, R] absolute position held by each ring slot before a step that starts at ``start_B1``
    (the step's first position = the number of past tokens): the latest p < start with
    p mod R == slot; negative where no position has reached the slot yet."""
    slots_R = torch.arange(ring_slots, device=start_B1.device)
    last_B1 = start_B1 - 1
    return last_B1 - torch.remainder(last_B1 - slots_R[None, :], ring_slots)


def ring_attention_mask(
    position_ids_BS: torch.Tensor, ring_slots: int, chunk_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, S, R + S] of a chunked layer with a ring cache: keys are the R ring
    slots, then the S new tokens. A query at position q sees a key at position k when k <= q, k is
    in q's chunk and (for a slot) the slot holds a position at all."""
    start_B1 = position_ids_BS[:, :1]
    slot_pos_BR = ring_slot_positions(start_B1, ring_slots)
    key_pos_BT = torch.cat((slot_pos_BR, position_ids_BS), dim=1)
    q_BS1 = position_ids_BS[:, :, None]
    key_B1T = key_pos_BT[:, None, :]
    same_chunk_BST = torch.div(key_B1T, chunk_size, rounding_mode="floor") == torch.div(
        q_BS1, chunk_size, rounding_mode="floor"
    )
    visible_BST = (key_B1T >= 0) & (key_B1T <= q_BS1) & same_chunk_BST
    zero = torch.zeros((), dtype=dtype, device=position_ids_BS.device)
    return torch.where(visible_BST, zero, torch.finfo(dtype).min)[:, None]


def ring_update_index(position_ids_BS: torch.Tensor, ring_slots: int) -> torch.Tensor:
    """int64 [R]: for each ring slot, its index in (ring, new keys) after a step: the newest
    position p of this step with p mod R == slot (at R + p - start), else the slot itself.

    Read from the first row's positions: rows of a batch share positions (the generation loop's
    rectangular batches), as the full cache's slot = position rule already assumes."""
    start = position_ids_BS[0, 0]
    S = position_ids_BS.shape[1]
    slots_R = torch.arange(ring_slots, device=position_ids_BS.device)
    last = start + S - 1
    newest_R = last - torch.remainder(last - slots_R, ring_slots)
    return torch.where(newest_R >= start, ring_slots + newest_R - start, slots_R)


def query_block(batch: int, heads: int, keys: int, new_tokens: int) -> int:
    """Queries per eager attention block: as many as keep B x N x block x keys within
    SCORE_BUDGET (at least 1, at most all of them)."""
    return max(1, min(new_tokens, SCORE_BUDGET // max(1, batch * heads * keys)))


class Llama4ForCausalLM(nn.Module):
    """``model(input_ids_BS, position_ids_BS=None, past_key_values=None) -> (logits_BSV, present)``.

    ``past_key_values``: None (P = 0) or one ``(key, value)`` pair per layer in the layout of
    ``cache_kinds`` (a full cache [B, K, P, D], a ring [B, K, R, D]). ``present`` is the cache
    after the S new tokens. ``position_ids_BS`` defaults to P .. P+S-1, which needs a full cache
    layer to read P from; positions must run P .. P+S-1 in every row.
    """

    def __init__(self, config: Llama4Config, ring_slots: int | None = -1):
        """``ring_slots``: slots of the chunked layers' ring caches; -1: ``default_ring_slots``
        at the model's max positions; None: full caches on every layer."""
        super().__init__()
        self.config = config
        self.model = Llama4TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.ring_slots = default_ring_slots(config, config.max_position_embeddings) if ring_slots == -1 else ring_slots
        self.tie_weights()

    def cache_kinds(self) -> list[tuple[str, int | None]]:
        """(kind, slots) per layer: ("chunked", R) for a ring, ("full", None) for a cache that
        grows with the context."""
        return [
            (CACHE_CHUNKED, self.ring_slots) if layer.chunked and self.ring_slots is not None else (CACHE_FULL, None)
            for layer in self.model.layers
        ]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def empty_cache(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        """A cache with P = 0: [B, K, 0, D] per full layer, an all-masked ring [B, K, R, D] per
        chunked layer (zeros: the masks keep them out, and zeros cannot turn into NaN)."""
        c = self.config
        ref = self.model.embed_tokens.weight
        cache = []
        for _, slots in self.cache_kinds():
            shape = (batch_size, c.num_key_value_heads, slots or 0, c.head_dim)
            cache.append(
                (
                    torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device),
                    torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device),
                )
            )
        return cache

    def forward(
        self,
        input_ids_BS: torch.Tensor,
        position_ids_BS: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds_BSH: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """``inputs_embeds_BSH``: the prompt's embeddings with image features merged in (models/image_prompt.py),
        used instead of looking ``input_ids_BS`` up."""
        B, S = input_ids_BS.shape
        kinds = self.cache_kinds()
        if past_key_values is None:
            past_key_values = self.empty_cache(B)
        full_layers = [i for i, (kind, _) in enumerate(kinds) if kind == CACHE_FULL]
        if full_layers:
            past_len = past_key_values[full_layers[0]][0].shape[2]
        elif position_ids_BS is not None:
            past_len = position_ids_BS[0, 0]
            if not torch.compiler.is_compiling():
                past_len = int(past_len)
        else:
            raise ValueError("every layer has a ring cache, so the past length is not in the cache: pass position_ids_BS")
        if position_ids_BS is None:
            position_ids_BS = (torch.arange(S, device=input_ids_BS.device) + past_len)[None].expand(B, S)
        # Eager (S a Python int): a long prompt runs as consecutive query blocks over the cache,
        # which is chunked prefill, so no score tensor outgrows SCORE_BUDGET. A traced graph has a
        # symbolic S and is one block; the runtime bounds its S with the prefill chunk instead.
        if isinstance(S, int) and isinstance(past_len, int) and not torch.compiler.is_compiling():
            block = query_block(B, self.config.num_attention_heads, past_len + S, S)
            if block < S:
                pieces = []
                for start in range(0, S, block):
                    embeds = None if inputs_embeds_BSH is None else inputs_embeds_BSH[:, start : start + block]
                    logits, past_key_values = self._forward_block(
                        input_ids_BS[:, start : start + block], position_ids_BS[:, start : start + block],
                        past_key_values, past_len + start, embeds,
                    )
                    pieces.append(logits)
                return torch.cat(pieces, dim=1), past_key_values
        return self._forward_block(input_ids_BS, position_ids_BS, past_key_values, past_len, inputs_embeds_BSH)

    def _forward_block(self, input_ids_BS, position_ids_BS, past_key_values, past_len, inputs_embeds_BSH=None):
        h_BSH = self.model.embed_tokens(input_ids_BS) if inputs_embeds_BSH is None else inputs_embeds_BSH
        cos_BSF, sin_BSF = self.model.rotary_emb(position_ids_BS)
        chunk = self.config.attention_chunk_size
        kinds = self.cache_kinds()
        causal = chunked = ring_index_R = None
        if any(kind == CACHE_FULL for kind, _ in kinds):
            causal, chunked = attention_masks(
                position_ids_BS, past_len, chunk, h_BSH.dtype, chunked=self.ring_slots is None
            )
        if self.ring_slots is not None and chunk is not None:
            chunked = ring_attention_mask(position_ids_BS, self.ring_slots, chunk, h_BSH.dtype)
            ring_index_R = ring_update_index(position_ids_BS, self.ring_slots)
        present: KVCache = []
        for (kind, _), layer, past in zip(kinds, self.model.layers, past_key_values):
            index = ring_index_R if kind == CACHE_CHUNKED else None
            h_BSH, kv = layer(h_BSH, position_ids_BS, cos_BSF, sin_BSF, (causal, chunked), past, index)
            present.append(kv)
        logits_BSV = self.lm_head(self.model.norm(h_BSH))
        return logits_BSV, present


def default_ring_slots(config: Llama4Config, max_positions: int) -> int | None:
    """Ring slots of the chunked layers for a context of ``max_positions``: the attention chunk,
    or the whole context when that is shorter; None when the model has no chunked layer."""
    if config.attention_chunk_size is None or not any(
        config.uses_chunked_attention(i) for i in range(config.num_hidden_layers)
    ):
        return None
    return min(config.attention_chunk_size, max_positions)
