"""Triton kernels for the routed experts of a MoE layer (the ``moec.GroupedExperts`` op).

Two paths, picked by token count (``decode_max_tokens`` in moe_configs.json):

decode (few tokens; bandwidth-bound): token-expert pairs are grouped by expert and one program
    owns (expert present, column block, K split). It reads its weight tile once and applies it to
    every token of that expert (up to BLOCK_M rows per pass; a multi-row tile of x is cheap next to
    the weight tile). Rows are padded only to BLOCK_M <= 16, never to a prefill tile, and split-K
    spreads a single expert's weights over enough programs to fill the GPU. GEMM 1 (gate/up)
    accumulates raw fp32 partials; SiLU(gate) * up is applied in GEMM 2's prologue, where the
    partials are complete; GEMM 2 (down) adds its fp32 partials straight into the token's output
    row, which also combines the k choices.
prefill (many tokens): pairs are sorted by expert and each expert's run is padded to BLOCK_M, so a
    row tile never spans two experts (the alignment step: two small Triton launches, no host
    sync; ``align_by_expert`` is its torch formulation and the tests' reference). GEMM 1 is
    a grouped GEMM with SiLU(gate) * up fused into its epilogue (gate and up tiles share the x
    tile); GEMM 2 writes each pair's row; k > 1 rows are summed into token order afterwards.

The score multiplies either the expert input (Llama 4) or its output (Mixtral). On the input it is
applied to GEMM 1's fp32 accumulator ((s x) W == s (x W) for a per-row scalar), so the tensor-core
operands stay the original bf16/fp16 values. Accumulation is fp32 everywhere; the intermediate
activation is stored in the input dtype, as the second GEMM's operand must be.

Nothing here syncs with the host, so a call can be captured in a CUDA graph. Launches are few
because each costs 2-3 us even inside a graph, against an 83 us floor at T=1: a decode call is
four (grouping + accumulator zeroing, two GEMMs, the output cast; three when k = 1 and the down
GEMM does not split K, as it then writes the output itself), a prefill call four with k=1 (two
alignment launches, two GEMMs). All go through ``_launch``, which aot.py records to compile
them ahead of time for a target GPU.

This module is the host side (the alignment step's torch formulation, the two paths' launches,
``grouped_experts_triton``); the kernels are in moe_kernels.py, the launch parameters and their
table in moe_configs.py. Their public names are re-exported here.

Under TRITON_INTERPRET=1 (the CPU tests) ``tl.dot`` mis-computes bf16 operands (a 16x16 product
came out 2.6e10 off), so in interpreter mode bf16 operands are widened to fp32 just before the
dot (``DOT_UPCAST``); fp16 and all indexing run exactly the GPU code. The interpreter also
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (501 of 1024 random values
differed), which doubles the bf16 rounding error seen on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton

from moec.runtime.kernels.moe_configs import (  # noqa: F401 - re-exported: this module's public names
    CONFIG_ENV,
    CONFIG_FILE,
    T_BUCKET_MAX,
    LaunchConfig,
    config_key,
    default_config,
    default_path,
    load_config_table,
    select_config,
    t_bucket,
    validate_config_table,
)
from moec.runtime.kernels.moe_kernels import (  # noqa: F401 - _mm re-exported (the tests look at its kind)
    _align_count_kernel,
    _align_place_kernel,
    _decode_down_kernel,
    _decode_gate_up_kernel,
    _decode_group_kernel,
    _mm,
    _prefill_down_kernel,
    _prefill_gate_up_kernel,
)
from moec.runtime.kernels.reference import check_inputs

# triton.jit reads TRITON_INTERPRET when it decorates, i.e. when moe_kernels is imported (just above):
# read it at the same moment so DOT_UPCAST agrees with the kind of kernels that module holds.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class Launch:
    """One kernel launch as the host code makes it: what aot.py compiles for a target GPU."""

    kernel: object  # a triton JITFunction (or the interpreter's stand-in)
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        # The interpreter's stand-in has no __name__; both keep the Python function as .fn.
        return self.kernel.fn.__name__


# Set by ``recording_launches``: launches are collected instead of run.
_RECORDED: list[Launch] | None = None


@contextlib.contextmanager
def recording_launches():
    """Collect the launches of the calls made inside instead of running them. With meta tensors
    as inputs the host code runs shape-only, so this lists exactly the kernels (and the argument
    values Triton specializes on) that a real call of that shape would launch, on any machine."""
    global _RECORDED
    outer, _RECORDED = _RECORDED, []
    try:
        yield _RECORDED
    finally:
        _RECORDED = outer


def _launch(kernel, grid, *args, **kwargs) -> None:
    if _RECORDED is not None:
        _RECORDED.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def _alloc_uninitialized(*shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fully overwrite comes from here, so the tests can hand out
    NaN-filled memory instead and catch an element that no program wrote."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _dump_out_of_range(ids_P: torch.Tensor, E: int) -> torch.Tensor:
    """int64 ids with every id outside [0, E) replaced by E: a dump expert that sorts after all
    real ones and that nothing reads, so the torch formulations skip such a pair as the kernels
    do (an out-of-range index would otherwise trip index_add_'s device assert on a GPU)."""
    ids_P = ids_P.long()
    return torch.where((ids_P >= 0) & (ids_P < E), ids_P, E)


def _count_per_expert(ids_P: torch.Tensor, E: int) -> torch.Tensor:
    """Pairs per expert; ``ids_P`` from _dump_out_of_range (ids in [0, E], E not counted)."""
    # index_add_ rather than bincount: bincount's output length depends on the values, which
    # costs a host sync on a GPU (and breaks CUDA-graph capture).
    counts = torch.zeros(E + 1, dtype=torch.int32, device=ids_P.device)
    return counts.index_add_(0, ids_P, torch.ones_like(ids_P, dtype=torch.int32))[:E]


def expert_groups(ids_P: torch.Tensor, E: int):
    """Decode grouping: pairs sorted by expert, and for each of min(P, E) group slots the expert,
    its first sorted position and its row count (0 for the slots past the experts present).
    Pairs with an id outside [0, E) sort last and join no group."""
    ids_P = _dump_out_of_range(ids_P, E)
    order_P = torch.argsort(ids_P, stable=True).to(torch.int32)
    counts_E = _count_per_expert(ids_P, E)
    start_E = (torch.cumsum(counts_E, 0) - counts_E).to(torch.int32)
    # Present experts first, in ascending id order: a static-shape stand-in for unique().
    present_first = torch.argsort((counts_E == 0).to(torch.int8), stable=True)[: min(ids_P.numel(), E)]
    return order_P, present_first.to(torch.int32), start_E[present_first], counts_E[present_first]


DECODE_GROUP_MAX_PAIRS = 128  # the one-program grouping holds a [P, P] comparison in registers


ZERO_BLOCK = 4096  # fp32 elements each zeroing program of the grouping launch clears


def decode_groups(ids_P: torch.Tensor, E: int, zero: tuple[torch.Tensor, ...] = ()):
    """``expert_groups``'s result, and the (at most two, contiguous fp32) tensors in ``zero``
    zeroed: one Triton launch for up to DECODE_GROUP_MAX_PAIRS pairs (every decode call with the
    default table), the torch formulation beyond that. ``ids_P`` may be int32 or int64."""
    P = ids_P.numel()
    if P > DECODE_GROUP_MAX_PAIRS:
        for t in zero:
            t.zero_()
        return expert_groups(ids_P, E)
    if len(zero) > 2 or any(t.dtype != torch.float32 or not t.is_contiguous() for t in zero):
        raise ValueError("decode_groups zeroes at most two contiguous fp32 tensors")
    G = min(P, E)
    order_P = _alloc_uninitialized(P, dtype=torch.int32, device=ids_P.device)
    # Rows padded to 4 int32 (16 bytes) so each starts aligned: Triton specializes (and
    # vectorizes) on 16-byte alignment, and aot.py then compiles what the JIT runs.
    table = _alloc_uninitialized(3, -(-G // 4) * 4, dtype=torch.int32, device=ids_P.device)[:, :G]
    # Absent tensors get a stand-in pointer with 0 elements to clear: the first fp32 one, so the
    # kernel keeps one specialization whether the gate/up accumulator needs zeroing or not.
    stand_in = zero[0] if zero else torch.empty(1, dtype=torch.float32, device=ids_P.device)
    zero_a, zero_b = (list(zero) + [stand_in, stand_in])[:2]
    n_a = zero_a.numel() if len(zero) > 0 else 0
    n_b = zero_b.numel() if len(zero) > 1 else 0
    grid = (1 + triton.cdiv(max(n_a, n_b), ZERO_BLOCK),)
    PB = triton.next_power_of_2(P)
    _launch(_decode_group_kernel, grid,
        ids_P, order_P, table[0], table[1], table[2], zero_a, zero_b, P, G, E, n_a, n_b,
        PB=PB, ZERO_BLOCK=ZERO_BLOCK, num_warps=4 if PB <= 64 else 8,  # [PB, PB] masks spill at 128 with 4 warps
    )
    return order_P, table[0], table[1], table[2]


def align_by_expert(ids_P: torch.Tensor, E: int, block_m: int):
    """Prefill alignment: each expert's run of sorted pairs padded to a multiple of ``block_m``.

    Returns ``sorted_pair`` [num_blocks * block_m] (pair index, or P for padding) and
    ``block_expert`` [num_blocks] (the expert of each row tile, -1 past the last one). The block
    count is the static upper bound cdiv(P, block_m) + min(P, E), so nothing waits for the host.
    A pair with an id outside [0, E) is placed nowhere.
    """
    P = ids_P.numel()
    ids_P = _dump_out_of_range(ids_P, E)
    order_P = torch.argsort(ids_P, stable=True)
    counts_E = _count_per_expert(ids_P, E)
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    pad_end_E = torch.cumsum(padded_E, 0)
    pad_start_E = pad_end_E - padded_E
    start_E = torch.cumsum(counts_E, 0) - counts_E
    num_blocks = triton.cdiv(P, block_m) + min(P, E)
    # Out-of-range pairs (the dump expert E, sorted last) go to one extra slot, cut off below.
    dump = num_blocks * block_m
    # (torch.full, not a tensor from a Python list: that is a host copy, refused in graph capture)
    pad_start_E = torch.cat([pad_start_E, torch.full((1,), dump, dtype=pad_start_E.dtype, device=ids_P.device)])
    start_E = torch.cat([start_E, counts_E.sum().reshape(1).to(start_E.dtype)])
    ids_sorted = ids_P[order_P]
    rank = torch.arange(P, device=ids_P.device) - start_E[ids_sorted]
    slot = torch.where(ids_sorted < E, pad_start_E[ids_sorted] + rank, dump)
    sorted_pair = torch.full((dump + 1,), P, dtype=torch.int32, device=ids_P.device)
    sorted_pair[slot] = order_P.to(torch.int32)
    block_start = torch.arange(num_blocks, device=ids_P.device, dtype=pad_end_E.dtype) * block_m
    block_expert = torch.searchsorted(pad_end_E, block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return sorted_pair[:dump], block_expert


ALIGN_MAX_EXPERTS = 256  # the alignment kernels hold [SUB, next_pow2(E)] comparisons in registers


# 64-pair steps: with 128, the [SUB, EB] and [SUB, SUB] masks took 254 registers at E=128.
ALIGN_SUB = 64


ALIGN_MAX_CHUNKS = 32  # each placing program reads every chunk's counts: keep that loop short


def align_by_expert_triton(ids_P: torch.Tensor, E: int, block_m: int):
    """``align_by_expert``'s result in two launches instead of about twenty torch ops (argsort,
    counts, prefix sums, a scatter, searchsorted): at 2-4 us each those cost up to 5% of a prefill
    call's floor. ``ids_P`` may be int32 or int64. Entries of ``sorted_pair`` past the last
    expert's padded run are left unwritten: their row tiles have block_expert -1 and no kernel
    reads them."""
    P = ids_P.numel()
    if E > ALIGN_MAX_EXPERTS:
        return align_by_expert(ids_P, E, block_m)
    EB = triton.next_power_of_2(E)
    chunk = max(ALIGN_SUB, triton.next_power_of_2(triton.cdiv(P, ALIGN_MAX_CHUNKS)))
    n_chunks = triton.cdiv(P, chunk)
    num_blocks = triton.cdiv(P, block_m) + min(P, E)
    chunk_count = _alloc_uninitialized(n_chunks, EB, dtype=torch.int32, device=ids_P.device)
    sorted_pair = _alloc_uninitialized(num_blocks * block_m, dtype=torch.int32, device=ids_P.device)
    block_expert = _alloc_uninitialized(num_blocks, dtype=torch.int32, device=ids_P.device)
    _launch(_align_count_kernel, (n_chunks,), ids_P, chunk_count, P, E, EB=EB, CHUNK=chunk, SUB=ALIGN_SUB, num_warps=4)
    _launch(_align_place_kernel, (n_chunks,),
        ids_P, chunk_count, sorted_pair, block_expert, P, E, n_chunks, num_blocks,
        BLOCK_M=block_m, EB=EB, CHUNK=chunk, SUB=ALIGN_SUB, num_warps=4,
    )
    return sorted_pair, block_expert


def _run_decode(hidden_TH, ids_P, scores_P, w_gate_up_EHI2, w_down_EIH, K, score_on_input, cfg, dot_upcast):
    T, H = hidden_TH.shape
    E, _, I2 = w_gate_up_EHI2.shape
    I = I2 // 2
    P = ids_P.numel()
    # fp32 accumulators: the down GEMM adds its split-K partials (and the k choices) into out_TH,
    # unless k = 1 and it does not split K (then it writes the output directly, DIRECT_OUT); the
    # gate/up GEMM adds into gu_PI2 only when it splits K. The grouping launch zeroes them.
    direct_out = K == 1 and cfg.split_k_down == 1
    out_TH = _alloc_uninitialized(T, H, dtype=hidden_TH.dtype if direct_out else torch.float32, device=hidden_TH.device)
    gu_PI2 = _alloc_uninitialized(P, I2, dtype=torch.float32, device=hidden_TH.device)
    zero = (() if direct_out else (out_TH,)) + ((gu_PI2,) if cfg.split_k_gate_up > 1 else ())
    order_P, group_expert, group_start, group_count = decode_groups(ids_P, E, zero)
    G = group_expert.numel()
    use_dot = cfg.block_m >= 16
    _launch(_decode_gate_up_kernel, (G, triton.cdiv(I, cfg.block_n_gate_up), cfg.split_k_gate_up),
        hidden_TH, w_gate_up_EHI2, gu_PI2,
        order_P, group_expert, group_start, group_count,
        H, I, K,
        hidden_TH.stride(0), hidden_TH.stride(1),
        w_gate_up_EHI2.stride(0), w_gate_up_EHI2.stride(1), w_gate_up_EHI2.stride(2),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k_gate_up,
        USE_DOT=use_dot, DOT_UPCAST=dot_upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    _launch(_decode_down_kernel, (G, triton.cdiv(H, cfg.block_n_down), cfg.split_k_down),
        gu_PI2, w_down_EIH, out_TH, scores_P,
        order_P, group_expert, group_start, group_count,
        H, I, K,
        w_down_EIH.stride(0), w_down_EIH.stride(1), w_down_EIH.stride(2),
        SCORE_ON_INPUT=bool(score_on_input),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k_down,
        USE_DOT=use_dot, DOT_UPCAST=dot_upcast, DIRECT_OUT=direct_out,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out_TH if direct_out else out_TH.to(hidden_TH.dtype)


def _run_prefill(hidden_TH, ids_P, scores_P, w_gate_up_EHI2, w_down_EIH, K, score_on_input, cfg, dot_upcast):
    T, H = hidden_TH.shape
    E, _, I2 = w_gate_up_EHI2.shape
    I = I2 // 2
    P = ids_P.numel()
    sorted_pair, block_expert = align_by_expert_triton(ids_P, E, cfg.block_m)
    num_blocks = block_expert.numel()
    a_PI = _alloc_uninitialized(P, I, dtype=hidden_TH.dtype, device=hidden_TH.device)
    _launch(_prefill_gate_up_kernel, (num_blocks, triton.cdiv(I, cfg.block_n_gate_up)),
        hidden_TH, w_gate_up_EHI2, a_PI, scores_P,
        sorted_pair, block_expert,
        P, H, I, K,
        hidden_TH.stride(0), hidden_TH.stride(1),
        w_gate_up_EHI2.stride(0), w_gate_up_EHI2.stride(1), w_gate_up_EHI2.stride(2),
        SCORE_ON_INPUT=bool(score_on_input),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_gate_up, BLOCK_K=cfg.block_k,
        DOT_UPCAST=dot_upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    # k == 1: pair == token, so GEMM 2 writes the output directly. k > 1: fp32 rows per pair,
    # summed in token order (a deterministic combination, unlike atomics).
    y_PH = _alloc_uninitialized(P, H, dtype=hidden_TH.dtype if K == 1 else torch.float32, device=hidden_TH.device)
    _launch(_prefill_down_kernel, (num_blocks, triton.cdiv(H, cfg.block_n_down)),
        a_PI, w_down_EIH, y_PH, scores_P,
        sorted_pair, block_expert,
        P, H, I,
        w_down_EIH.stride(0), w_down_EIH.stride(1), w_down_EIH.stride(2),
        SCORE_ON_INPUT=bool(score_on_input),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n_down, BLOCK_K=cfg.block_k,
        DOT_UPCAST=dot_upcast, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if K == 1:
        return y_PH
    return y_PH.view(T, K, H).sum(dim=1).to(hidden_TH.dtype)


@functools.lru_cache(maxsize=None)
def _cuda_device_name(index: int) -> str:
    # Queried once per device: a properties query per call would add host time to every decode step.
    return torch.cuda.get_device_name(index)


def grouped_experts_triton(
    hidden_TH: torch.Tensor,
    expert_ids_TK: torch.Tensor,
    scores_TK: torch.Tensor,
    w_gate_up_EHI2: torch.Tensor,
    w_down_EIH: torch.Tensor,
    score_on_input: bool = True,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """The ``moec.GroupedExperts`` semantics (see reference.py) with the Triton kernels.

    ``config`` overrides the table lookup (the tests use it to force a path and small tiles).
    """
    check_inputs(hidden_TH, expert_ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH)
    T, H = hidden_TH.shape
    K = expert_ids_TK.shape[1]
    E, _, I2 = w_gate_up_EHI2.shape
    if T == 0:
        return hidden_TH.new_zeros(0, H)
    if config is None:
        device_name = _cuda_device_name(hidden_TH.device.index or 0) if hidden_TH.is_cuda else None
        config = select_config(E, H, I2 // 2, T, K, device_name)
    hidden_TH = hidden_TH.contiguous() if hidden_TH.stride(1) != 1 else hidden_TH
    # No dtype casts here: each would be one more launch around a decode step. The kernels round
    # the scores to the hidden dtype before use (passes/ops.py's semantics) and read int32 or int64
    # ids; only the prefill alignment, written with torch ops, wants int64.
    ids_P = expert_ids_TK.reshape(-1).contiguous()  # a [T, k] slice of a wider tensor is strided
    scores_P = scores_TK.reshape(-1).contiguous()
    dot_upcast = INTERPRETED and hidden_TH.dtype == torch.bfloat16
    if dot_upcast:
        # The interpreter truncates the kernels' in-register fp32 -> bf16 rounding of the scores
        # (see the module doc), so it gets them rounded to nearest here; fp16 and the GPU round
        # in the kernel.
        scores_P = scores_P.to(hidden_TH.dtype)
    run = _run_decode if config.path == "decode" else _run_prefill
    return run(hidden_TH, ids_P, scores_P, w_gate_up_EHI2, w_down_EIH, K, score_on_input, config, dot_upcast)
