"""Memory plan of a deployment, from config.json alone: what each rank's engine holds, and whether
it fits a GPU.

``plan(config, PlanConfig)`` counts, per rank (one engine per rank):

- weights: every tensor of ``moec.models.Llama4ForCausalLM`` at the precision's bytes. ``fp8`` and
  ``int4`` apply to the routed experts only (the quantizer's default scope, issue 15: the router,
  attention, shared expert, dense MLPs, embeddings and norms stay bf16); fp8 carries one fp32 scale
  per output row, int4 one fp16 scale per group of 128 weights.
- KV cache at the context, for ``batch`` sequences in the activation dtype (2 bytes): NoPE
  (full-attention) layers hold every position; chunked-attention layers hold a ring of
  ``attention_chunk_size`` slots (a token never attends past its own chunk; this is the cache the
  long-context work, issue 14, builds; today's export still keeps the full context on every layer).
- activations: an estimate of the largest step the engine's default profiles admit (``moec build``
  gives prefill up to half the context at the max batch): fp32 logits, a few hidden-sized buffers,
  q/k/v, one layer's attention scores in fp32 (unfused attention) and the MoE intermediate (the
  ``dense`` branch of the hybrid lowering runs every expert once tokens x k exceeds the experts).
  TensorRT reuses activation memory across layers, so one layer's worth counts.
- a fixed reserve for the CUDA context and TensorRT's own buffers.

Layouts: tensor parallel ``tp`` splits attention by heads (kv heads too, so GQA stays whole), the
shared expert and dense MLPs by their intermediate size; expert parallel ``ep`` splits the routed
experts into groups, each expert's intermediate split ``tp`` ways inside its group; the embedding,
lm_head, router and norms are replicated. That is the partition of the multi-GPU work (issue 16);
today moec builds single-rank engines (tp 1, ep 1), and a layout is listed only when the heads, kv
heads, experts and intermediate sizes divide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moec.common.errors import MoecError

# The engine context ``moec build`` / ``moec compile`` use when none is given: Llama 4's own limit
# (10 M positions for Scout) has a KV cache no GPU holds; 8192 is one attention chunk.
DEFAULT_CONTEXT = 8192
GIB = 1 << 30
# CUDA context, TensorRT's runtime buffers and the allocator's slack.
RESERVE_BYTES = 2 * GIB
ACT_BYTES = 2  # bf16/fp16 activations and KV cache
INT4_GROUP = 128
# Host memory of a TensorRT-RTX build: peak RSS over the weights it compiles, measured with the
# weight pager at Scout's layer size (benchmarks/results/memory_scale_paged.md), plus the libraries.
BUILD_RSS_RATIO = 1.8
BUILD_RSS_BASE = 300 << 20


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # nominal size; nvidia-smi shows a little less, which RESERVE_BYTES covers
    sm: int
    note: str = ""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def has_fp8(self) -> bool:
        return self.sm >= 89


GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100-40", 40, 80), Gpu("a100-80", 80, 80), Gpu("h100", 80, 90), Gpu("h200", 141, 90),
    Gpu("l4", 24, 89), Gpu("b200", 180, 100), Gpu("rtx4090", 24, 89), Gpu("rtx5090", 32, 120),
    Gpu("orin", 64, 87, "memory shared with the CPU"), Gpu("thor", 128, 110, "memory shared with the CPU"),
)}
GPU_ALIASES = {"a100": "a100-80"}
# Of the routed experts' weights; fp16 has bf16's bytes, so one row ("bf16") serves both.
PRECISIONS = ("bf16", "fp8", "int4")
WORLD_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class PlanConfig:
    gpu: str = "h100"
    gpus: int | None = None  # None: every world size in WORLD_SIZES
    context: int | None = None  # None: min(model's positions, DEFAULT_CONTEXT)
    batch: int = 1
    # Largest tokens of one prefill step; None: half the context (moec build's default profile).
    prefill_tokens: int | None = None

    def __post_init__(self) -> None:
        if gpu_spec(self.gpu) is None:
            raise MoecError(f"unknown GPU {self.gpu!r}; choose one of {', '.join(GPUS)}")
        if self.gpus is not None and self.gpus < 1:
            raise MoecError(f"--gpus {self.gpus}: give at least 1")
        if self.batch < 1 or (self.context is not None and self.context < 2):
            raise MoecError("--batch must be >= 1 and --context >= 2")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise MoecError("prefill_tokens must be >= 1")


def gpu_spec(name: str) -> Gpu | None:
    key = name.lower().replace(" ", "").replace("_", "-")
    return GPUS.get(GPU_ALIASES.get(key, key))


@dataclass(frozen=True)
class Layout:
    tp: int
    ep: int

    @property
    def ranks(self) -> int:
        return self.tp * self.ep

    def __str__(self) -> str:
        return f"tp{self.tp} ep{self.ep}"


@dataclass
class RankMemory:
    """One rank's engine: bytes of each part, and whether it fits the GPU."""

    layout: Layout
    precision: str
    weight_bytes: int
    replicated_bytes: int  # part of weight_bytes every rank holds whole
    kv_bytes: int
    kv_full_bytes: int  # the NoPE layers' share of kv_bytes
    kv_chunked_bytes: int  # the chunked layers' ring share
    activation_bytes: int
    reserve_bytes: int
    gpu_bytes: int
    supported: bool = True
    reason: str = ""

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.supported and self.total_bytes <= self.gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"tp": self.layout.tp, "ep": self.layout.ep, "ranks": self.layout.ranks, "precision": self.precision,
                "weight_bytes": self.weight_bytes, "replicated_bytes": self.replicated_bytes,
                "kv_bytes": self.kv_bytes, "kv_full_bytes": self.kv_full_bytes,
                "kv_chunked_bytes": self.kv_chunked_bytes, "activation_bytes": self.activation_bytes,
                "reserve_bytes": self.reserve_bytes, "total_bytes": self.total_bytes, "gpu_bytes": self.gpu_bytes,
                "fits": self.fits, "reason": self.reason}


@dataclass
class Plan:
    gpu: Gpu
    context: int
    batch: int
    prefill_tokens: int
    rows: list[RankMemory] = field(default_factory=list)
    # Host memory to build the recommended engine: as one engine, and one layer per engine
    # (moec build --layers-per-engine 1: the largest range is a layer plus the embedding or lm_head).
    build_host_bytes: dict[str, int] = field(default_factory=dict)

    def recommended(self) -> RankMemory | None:
        """Fewest GPUs first (what a deployment pays for), then the most precise weights, then the
        layout with the most memory left for batch and context."""
        fitting = [r for r in self.rows if r.fits]
        order = {p: i for i, p in enumerate(PRECISIONS)}
        return min(fitting, key=lambda r: (r.layout.ranks, order[r.precision], r.total_bytes), default=None)

    def to_dict(self) -> dict[str, Any]:
        rec = self.recommended()
        return {"gpu": self.gpu.name, "gpu_memory_gib": self.gpu.memory_gib, "context": self.context,
                "batch": self.batch, "prefill_tokens": self.prefill_tokens,
                "rows": [r.to_dict() for r in self.rows], "build_host_bytes": self.build_host_bytes,
                "recommended": None if rec is None else {"tp": rec.layout.tp, "ep": rec.layout.ep,
                                                         "precision": rec.precision}}


# --- Byte counts -------------------------------------------------------------------------------
def _expert_bytes(n_weights: int, rows: int, precision: str) -> int:
    """Bytes of routed-expert weights: ``n_weights`` values in ``rows`` output rows."""
    if precision in ("bf16", "fp16"):
        return 2 * n_weights
    if precision == "fp8":
        return n_weights + 4 * rows  # one fp32 scale per output row
    if precision == "int4":
        return n_weights // 2 + 2 * (n_weights // INT4_GROUP)  # one fp16 scale per group
    raise MoecError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def layout_problem(cfg, layout: Layout) -> str | None:
    """Why ``layout`` cannot split ``cfg`` (None when it can)."""
    tp, ep = layout.tp, layout.ep
    for what, n, by in (("attention heads", cfg.num_attention_heads, tp), ("kv heads", cfg.num_key_value_heads, tp),
                        ("intermediate_size", cfg.intermediate_size, tp),
                        ("intermediate_size_mlp", cfg.intermediate_size_mlp, tp),
                        ("experts", cfg.num_local_experts, ep)):
        if n % by:
            return f"{what} ({n}) do not divide by {by}"
    if ep > 1 and not cfg.moe_layer_indices():
        return "no MoE layers to split over experts"
    return None


def weight_bytes(cfg, layout: Layout, precision: str) -> tuple[int, int]:
    """(bytes one rank holds, of which replicated) for ``cfg`` split by ``layout``."""
    tp, ep = layout.tp, layout.ep
    dense = 2  # bytes of every weight outside the routed experts (bf16 or fp16)
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    embed = V * H * (1 if cfg.tie_word_embeddings else 2)
    replicated = dense * (embed + H)  # embeddings, lm_head, final norm
    sharded = 0
    attn = H * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + cfg.num_attention_heads * D * H
    if cfg.attention_bias:
        attn += (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + H
    for layer in range(cfg.num_hidden_layers):
        replicated += dense * 2 * H  # the two RMSNorm weights
        sharded += dense * attn // tp
        if cfg.is_moe_layer(layer):
            E, I = cfg.num_local_experts, cfg.intermediate_size
            replicated += dense * H * E  # router
            sharded += dense * 3 * H * I // tp  # shared expert
            per_rank_experts = E // ep
            n = per_rank_experts * 3 * H * I // tp  # gate_up [E, H, 2I] + down [E, I, H]
            rows = per_rank_experts * (2 * I // tp + H)
            sharded += _expert_bytes(n, rows, precision)
        else:
            sharded += dense * 3 * H * cfg.intermediate_size_mlp // tp
    return replicated + sharded, replicated


def kv_bytes(cfg, layout: Layout, context: int, batch: int, dtype_bytes: int = ACT_BYTES,
             ring: bool = True) -> tuple[int, int]:
    """(NoPE layers' KV bytes, chunked layers' KV bytes) of one rank at ``context`` positions; with
    ``ring`` the chunked layers hold one chunk of slots, else (today's export) the whole context."""
    per_position = 2 * (cfg.num_key_value_heads // layout.tp) * cfg.head_dim * dtype_bytes * batch
    full = chunked = 0
    for layer in range(cfg.num_hidden_layers):
        if cfg.uses_chunked_attention(layer):
            slots = min(context, cfg.attention_chunk_size) if ring and cfg.attention_chunk_size else context
            chunked += per_position * slots
        else:
            full += per_position * context
    return full, chunked


def activation_bytes(cfg, layout: Layout, tokens: int, kv_len: int, dtype_bytes: int = ACT_BYTES) -> int:
    """Estimate of one step's live activations (see the module doc) for ``tokens`` tokens reading
    ``kv_len`` positions."""
    tp = layout.tp
    H, heads, kv_heads, D = cfg.hidden_size, cfg.num_attention_heads // tp, cfg.num_key_value_heads // tp, cfg.head_dim
    logits = 4 * tokens * cfg.vocab_size
    hidden = dtype_bytes * tokens * H * 6  # residual, normed input, attention out, MoE in/out, shared out
    qkv = dtype_bytes * tokens * (heads + 2 * kv_heads) * D
    scores = 4 * heads * tokens * kv_len
    k = cfg.num_experts_per_tok
    experts_run = cfg.num_local_experts // layout.ep if tokens * k > cfg.num_local_experts else k
    # gate and up outputs [T, 2I]: per routed expert run, plus the shared expert; or a dense MLP's.
    moe = dtype_bytes * tokens * 2 * (cfg.intermediate_size // tp) * (experts_run + 1) if cfg.moe_layer_indices() else 0
    mlp_dense = dtype_bytes * tokens * 2 * (cfg.intermediate_size_mlp // tp)
    has_dense = len(cfg.moe_layer_indices()) < cfg.num_hidden_layers
    mlp = max(moe, mlp_dense if has_dense else 0)
    return logits + hidden + qkv + scores + mlp


def rank_memory(cfg, layout: Layout, precision: str, gpu: Gpu, context: int, batch: int,
                prefill_tokens: int) -> RankMemory:
    w, rep = weight_bytes(cfg, layout, precision)
    full, chunked = kv_bytes(cfg, layout, context, batch)
    prefill = activation_bytes(cfg, layout, batch * prefill_tokens, context)
    decode = activation_bytes(cfg, layout, batch, context)
    row = RankMemory(layout, precision, w, rep, full + chunked, full, chunked, max(prefill, decode), RESERVE_BYTES,
                     gpu.memory_bytes)
    if precision == "fp8" and not gpu.has_fp8:
        row.supported, row.reason = False, f"sm{gpu.sm} has no fp8"
    return row


def context_of(cfg, context: int | None) -> int:
    if context is None:
        return min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    if context > cfg.max_position_embeddings:
        raise MoecError(f"--context {context} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings}): lower it")
    return context


def plan(cfg, config: PlanConfig = PlanConfig()) -> Plan:
    """Every (layout, precision) row for ``cfg`` (a ``Llama4Config``) on ``config.gpu``."""
    gpu = gpu_spec(config.gpu)
    context = context_of(cfg, config.context)
    prefill = config.prefill_tokens or max(1, context // 2)
    result = Plan(gpu, context, config.batch, prefill)
    sizes = (config.gpus,) if config.gpus is not None else WORLD_SIZES
    for ranks in sizes:
        for tp in (t for t in range(1, ranks + 1) if ranks % t == 0):
            layout = Layout(tp, ranks // tp)
            if layout_problem(cfg, layout) is not None:
                continue
            for precision in PRECISIONS:
                result.rows.append(rank_memory(cfg, layout, precision, gpu, context, config.batch, prefill))
    if not result.rows:
        problem = layout_problem(cfg, Layout(1, config.gpus or 1)) or layout_problem(cfg, Layout(config.gpus or 1, 1))
        raise MoecError(f"no tp x ep layout splits this model over {config.gpus} GPUs ({problem}); choose another --gpus")
    rec = result.recommended()
    if rec is not None:
        result.build_host_bytes = build_host_estimate(cfg, rec.weight_bytes)
    return result


def build_host_bytes(weight_bytes: int) -> int:
    """Estimated peak host memory of building ``weight_bytes`` of weights as one engine."""
    return int(BUILD_RSS_RATIO * weight_bytes) + BUILD_RSS_BASE


def build_host_estimate(cfg, weight_bytes: int) -> dict[str, int]:
    """An engine of ``weight_bytes`` built whole and one layer per engine: the embedding (or the
    lm_head) joins the first (last) layer's range."""
    edge = cfg.vocab_size * cfg.hidden_size * ACT_BYTES
    per_layer = max(0, weight_bytes - 2 * edge) // max(1, cfg.num_hidden_layers) + edge
    return {"one_engine": build_host_bytes(weight_bytes),
            "layers_per_engine_1": build_host_bytes(min(weight_bytes, per_layer))}


def engine_memory(cfg, weight_bytes: int, dtype: str, max_batch: int, max_new_tokens: int, max_positions: int,
                  ring: bool) -> dict[str, Any]:
    """What one built engine needs on its GPU (``moec build``'s output and manifest): its weights as
    built, the KV cache of ``max_batch`` sequences at ``max_positions``, the activation estimate of
    its largest profile step, and the GPUs of the table it fits."""
    dtype_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}.get(dtype, 2)
    one = Layout(1, 1)
    full, chunked = kv_bytes(cfg, one, max_positions, max_batch, dtype_bytes, ring)
    act = max(activation_bytes(cfg, one, max_batch * max_new_tokens, max_positions, dtype_bytes),
              activation_bytes(cfg, one, max_batch, max_positions, dtype_bytes))
    total = weight_bytes + full + chunked + act + RESERVE_BYTES
    return {"weight_bytes": weight_bytes, "kv_bytes": full + chunked, "kv_full_bytes": full,
            "kv_chunked_bytes": chunked, "kv_chunked_ring": ring, "activation_bytes": act,
            "reserve_bytes": RESERVE_BYTES, "total_bytes": total,
            "fits": [g.name for g in GPUS.values() if total <= g.memory_bytes]}


def onnx_weight_bytes(model) -> int:
    """Bytes of an ONNX ModelProto's initializers, inline or external (read from the proto only)."""
    import onnx

    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
    return total


def format_engine_memory(m: dict[str, Any]) -> str:
    kv = (f"KV {gib(m['kv_bytes'])} (NoPE {gib(m['kv_full_bytes'])}, chunked "
          f"{gib(m['kv_chunked_bytes'])}{' as a ring' if m['kv_chunked_ring'] else ''})")
    fits = ", ".join(m["fits"]) or "none of the GPUs moec plan knows"
    return (f"memory: weights {gib(m['weight_bytes'])} GiB, {kv}, activations ~{gib(m['activation_bytes'])}, "
            f"+{gib(m['reserve_bytes'])} reserve = {gib(m['total_bytes'])} GiB; fits {fits}")


# --- Text --------------------------------------------------------------------------------------
def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def format_plan(p: Plan, title: str = "") -> str:
    lines = [f"{title}memory per rank on {p.gpu.name} ({p.gpu.memory_gib:g} GiB{', ' + p.gpu.note if p.gpu.note else ''})"
             f", context {p.context}, batch {p.batch}, prefill up to {p.prefill_tokens} tokens; GiB; "
             f"fp16 = bf16 bytes; fp8/int4 on routed experts only; KV: NoPE layers full, chunked layers a ring of the chunk",
             f"{'layout':<10} {'experts':<7} {'weights':>8} {'KV':>7} {'act':>7} {'total':>8} {'x ranks':>8}  fits"]
    for r in p.rows:
        fits = "yes" if r.fits else (r.reason or "no")
        lines.append(f"{str(r.layout):<10} {r.precision:<7} {gib(r.weight_bytes):>8} {gib(r.kv_bytes):>7} "
                     f"{gib(r.activation_bytes):>7} {gib(r.total_bytes):>8} {gib(r.total_bytes * r.layout.ranks):>8}  {fits}")
    rec = p.recommended()
    if rec is None:
        lines.append(f"recommended: none fits {p.gpu.name}; more GPUs (--gpus), a shorter --context or a larger GPU")
    else:
        lines.append(f"recommended: {rec.precision} experts on {rec.layout.ranks} x {p.gpu.name} ({rec.layout}): "
                     f"{gib(rec.total_bytes)} of {p.gpu.memory_gib:g} GiB per rank")
        if p.build_host_bytes:
            b = p.build_host_bytes
            lines.append(f"build host memory per rank (TensorRT-RTX, ~{BUILD_RSS_RATIO}x the weights it compiles): "
                         f"{gib(b['one_engine'])} GiB as one engine, {gib(b['layers_per_engine_1'])} GiB with "
                         "--layers-per-engine 1")
    return "\n".join(lines)
