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

Under TRITON_INTERPRET=1 (the CPU tests) ``tl.dot`` mis-computes bf16 operands (a 16x16 product
came out 2.6e10 off), so in interpreter mode bf16 operands are widened to fp32 just before the
dot (``DOT_UPCAST``); fp16 and all indexing run exactly the GPU code. The interpreter also
truncates fp32 -> bf16 casts where the GPU rounds to nearest even (501 of 1024 random values
differed), which doubles the bf16 rounding error seen on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
import triton
import triton.language as tl

from moec.common.errors import MoecError
from moec.runtime.kernels.reference import check_inputs

CONFIG_FILE = "moe_configs.json"
T_BUCKET_MAX = 8192


# --- launch parameters ------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    path: str  # "decode" | "prefill"
    block_m: int
    block_n_gate_up: int
    block_n_down: int
    block_k: int
    split_k_gate_up: int = 1  # decode only
    split_k_down: int = 1  # decode only
    num_warps: int = 4
    num_stages: int = 3
    tuned: bool = False  # True only when an entry of the tuned table supplied it


CONFIG_ENV = "MOEC_MOE_CONFIGS"  # a JSON file of tuned entries, e.g. from kernel_bench.py --tune
_ENTRY_FIELDS = {f for f in LaunchConfig.__dataclass_fields__ if f != "tuned"}
_KEY = re.compile(r"E=\d+,H=\d+,I=\d+,T=(?P<T>\d+)")


def validate_config_table(table: dict, source: str) -> dict:
    """Raise MoecError naming ``source`` and the entry when the table is not one the kernels can
    use: a wrong key, an unknown field, a path other than decode/prefill, a tile that is not a
    positive power of two, or a count that is not a positive integer."""

    def fail(where: str, what: str):
        raise MoecError(f"{source}: {where}: {what}")

    if not isinstance(table, dict) or not isinstance(table.get("tuned", {}), dict):
        fail("top level", 'expected an object with "tuned": {device: {key: entry}}')
    for device, entries in table.get("tuned", {}).items():
        if not isinstance(entries, dict):
            fail(f"tuned.{device}", "expected an object of entries keyed 'E=<E>,H=<H>,I=<I>,T=<bucket>'")
        for key, entry in entries.items():
            where = f"tuned.{device}[{key}]"
            m = _KEY.fullmatch(key)
            if not m or int(m["T"]) & (int(m["T"]) - 1) or int(m["T"]) == 0:
                fail(where, "keys are 'E=<E>,H=<H>,I=<I>,T=<bucket>', T a power of two")
            if not isinstance(entry, dict):
                fail(where, "an entry is an object of launch parameters")
            unknown = set(entry) - _ENTRY_FIELDS
            if unknown:
                fail(where, f"unknown field(s) {sorted(unknown)}; known: {sorted(_ENTRY_FIELDS)}")
            for name, value in entry.items():
                if name == "path":
                    if value not in ("decode", "prefill"):
                        fail(where, f"path must be 'decode' or 'prefill', got {value!r}")
                elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    fail(where, f"{name} must be a positive integer, got {value!r}")
                elif (name.startswith("block_") or name == "num_warps") and value & (value - 1):
                    fail(where, f"{name} must be a power of two, got {value}")
                elif name == "block_k" and value < 16:
                    fail(where, f"block_k must be at least 16 (tl.dot's K), got {value}")
                elif name == "num_warps" and value > 16:
                    fail(where, f"num_warps must be at most 16, got {value}")
    return table


@functools.lru_cache(maxsize=1)
def load_config_table() -> dict:
    """The shipped table, with the tuned entries of the file named by $MOEC_MOE_CONFIGS (if set)
    laid over it, device by device and key by key."""
    shipped = json.loads(resources.files("moec.runtime.kernels").joinpath(CONFIG_FILE).read_text())
    table = validate_config_table(shipped, f"moec/runtime/kernels/{CONFIG_FILE}")
    override_path = os.environ.get(CONFIG_ENV)
    if override_path:
        source = f"${CONFIG_ENV}={override_path}"
        try:
            override = json.loads(Path(override_path).read_text())
        except OSError as exc:
            raise MoecError(f"{source}: cannot read it ({exc.strerror}); point {CONFIG_ENV} at a tuned-configs JSON file or unset it") from exc
        except json.JSONDecodeError as exc:
            raise MoecError(f"{source}: not valid JSON ({exc}); it may be truncated: regenerate it with kernel_bench.py --tune") from exc
        validate_config_table(override, source)
        for device, entries in override.get("tuned", {}).items():
            table["tuned"].setdefault(device, {}).update(entries)
    return table


def t_bucket(num_tokens: int) -> int:
    return min(T_BUCKET_MAX, triton.next_power_of_2(max(1, num_tokens)))


def config_key(E: int, H: int, I: int, num_tokens: int) -> str:
    return f"E={E},H={H},I={I},T={t_bucket(num_tokens)}"


def _next_pow2_clamped(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def default_config(path: str, E: int, num_tokens: int, k: int) -> LaunchConfig:
    """The untuned launch parameters of ``path`` ("decode" or "prefill") for this call's shape."""
    default = load_config_table()["default"]
    if path == "decode":
        d = default["decode"]
        # Rows of one expert in a decode call are at most T; below 16 rows a broadcast-FMA GEMV
        # beats padding the row tile to the tensor-core minimum of 16.
        block_m = _next_pow2_clamped(num_tokens, 1, 16)
        block_m = 16 if block_m > 4 else block_m
        return LaunchConfig(
            path="decode",
            block_m=block_m,
            block_n_gate_up=d["block_n"],
            block_n_down=d["block_n"],
            block_k=d["block_k"],
            split_k_gate_up=d["split_k_gate_up"],
            split_k_down=d["split_k_down"],
            num_warps=d["num_warps"],
            num_stages=d["num_stages"],
        )
    p = default["prefill"]
    # The row tile follows the mean rows per expert, so small batches over many experts do not
    # pad every expert's run to 64.
    mean_rows = -(-num_tokens * k // E)
    return LaunchConfig(
        path="prefill",
        block_m=_next_pow2_clamped(mean_rows, 16, p["block_m_max"]),
        block_n_gate_up=p["block_n_gate_up"],
        block_n_down=p["block_n_down"],
        block_k=p["block_k"],
        num_warps=p["num_warps"],
        num_stages=p["num_stages"],
    )


def default_path(num_tokens: int) -> str:
    return "decode" if num_tokens <= load_config_table()["default"]["decode_max_tokens"] else "prefill"


def select_config(E: int, H: int, I: int, num_tokens: int, k: int, device_name: str | None = None) -> LaunchConfig:
    """Launch parameters for one call: a tuned entry for this device and shape if the table has
    one, else the defaults of moe_configs.json."""
    table = load_config_table()
    entry = None
    if device_name:
        # The longest key the device name contains: "L40S" must not read "L4"'s entries.
        keys = [key for key in table.get("tuned", {}) if key in device_name]
        if keys:
            entry = table["tuned"][max(keys, key=len)].get(config_key(E, H, I, num_tokens))
    cfg = default_config((entry or {}).get("path") or default_path(num_tokens), E, num_tokens, k)
    if entry:
        fields = {k2: v for k2, v in entry.items() if k2 != "path"}
        cfg = replace(cfg, tuned=True, **fields)
    return cfg


# triton.jit reads TRITON_INTERPRET when it decorates, i.e. when this module is imported: read it
# at the same moment so DOT_UPCAST agrees with the kind of kernels this module holds.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- kernels ----------------------------------------------------------------------------------


@triton.jit
def _mm(x, w, USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """[M, K] @ [K, N] -> fp32 [M, N]: tensor cores for M >= 16, a broadcast FMA below."""
    if USE_DOT:
        if DOT_UPCAST:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc = tl.dot(x, w)
    else:
        acc = tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
    return acc


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, w_ptr, gu_ptr,
    order_ptr, group_expert_ptr, group_start_ptr, group_count_ptr,
    H, I, K_TOP,
    stride_xt, stride_xh, stride_we, stride_wh, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """gu[pair, :] (fp32 [P, 2I]) = x[token(pair)] @ w_gate_up[expert]; raw, before SiLU."""
    group = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    count = tl.load(group_count_ptr + group)
    expert = tl.load(group_expert_ptr + group).to(tl.int64)
    start = tl.load(group_start_ptr + group)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    k_chunk = tl.cdiv(tl.cdiv(H, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(H, k_begin + k_chunk)
    w_base = w_ptr + expert * stride_we
    for m0 in range(0, count, BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        r_ok = r < count
        pair = tl.load(order_ptr + start + r, mask=r_ok, other=0).to(tl.int64)
        token = pair // K_TOP
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_end
            x = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xh,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = ks[:, None] * stride_wh + cols[None, :] * stride_wn
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
            wu = tl.load(w_base + w_off + I * stride_wn, mask=w_mask, other=0.0)
            acc_g += _mm(x, wg, USE_DOT, DOT_UPCAST)
            acc_u += _mm(x, wu, USE_DOT, DOT_UPCAST)
        out_off = pair[:, None] * (2 * I) + cols[None, :]
        out_mask = r_ok[:, None] & col_ok[None, :]
        if SPLIT_K == 1:
            tl.store(gu_ptr + out_off, acc_g, mask=out_mask)
            tl.store(gu_ptr + out_off + I, acc_u, mask=out_mask)
        else:
            tl.atomic_add(gu_ptr + out_off, acc_g, mask=out_mask)
            tl.atomic_add(gu_ptr + out_off + I, acc_u, mask=out_mask)


@triton.jit
def _decode_down_kernel(
    gu_ptr, w_ptr, out_ptr, score_ptr,
    order_ptr, group_expert_ptr, group_start_ptr, group_count_ptr,
    H, I, K_TOP,
    stride_we, stride_wi, stride_wh,
    SCORE_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr, DIRECT_OUT: tl.constexpr,
):
    """out[token] (fp32 [T, H], zeroed) += score-weighted (SiLU(g) * u) @ w_down[expert].

    DIRECT_OUT (k = 1 and no split of K): each (token, column block) has exactly one program, so
    it stores its rows straight into the output in the output's dtype: no fp32 accumulator to
    zero, no atomics, no cast launch afterwards."""
    group = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    count = tl.load(group_count_ptr + group)
    expert = tl.load(group_expert_ptr + group).to(tl.int64)
    start = tl.load(group_start_ptr + group)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    k_chunk = tl.cdiv(tl.cdiv(I, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_chunk
    k_end = tl.minimum(I, k_begin + k_chunk)
    w_base = w_ptr + expert * stride_we
    act_dtype = w_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        r = m0 + tl.arange(0, BLOCK_M)
        r_ok = r < count
        pair = tl.load(order_ptr + start + r, mask=r_ok, other=0).to(tl.int64)
        token = pair // K_TOP
        score = tl.load(score_ptr + pair, mask=r_ok, other=0.0).to(act_dtype).to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_end
            a_off = pair[:, None] * (2 * I) + ks[None, :]
            a_mask = r_ok[:, None] & k_ok[None, :]
            g = tl.load(gu_ptr + a_off, mask=a_mask, other=0.0)
            u = tl.load(gu_ptr + a_off + I, mask=a_mask, other=0.0)
            if SCORE_ON_INPUT:
                g = g * score[:, None]
                u = u * score[:, None]
            a = (g * tl.sigmoid(g) * u).to(act_dtype)
            w = tl.load(w_base + ks[:, None] * stride_wi + cols[None, :] * stride_wh,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _mm(a, w, USE_DOT, DOT_UPCAST)
        if not SCORE_ON_INPUT:
            acc = acc * score[:, None]
        out_mask = r_ok[:, None] & col_ok[None, :]
        if DIRECT_OUT:
            tl.store(out_ptr + token[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out_ptr + token[:, None] * H + cols[None, :], acc, mask=out_mask)


@triton.jit
def _load_expert_ids(ids_ptr, pair, P, E):
    """int32 expert ids of ``pair`` (int32 or int64 in memory), -1 past P and for any id outside
    [0, E): checked before the narrowing cast, so a huge int64 id cannot wrap into range. Such an
    id (a broken router; not checked on the host, which would be a sync) then matches no expert."""
    raw = tl.load(ids_ptr + pair, mask=pair < P, other=-1)
    return tl.where((raw >= 0) & (raw < E), raw, -1).to(tl.int32)


@triton.jit
def _decode_group_kernel(
    ids_ptr, order_ptr, group_expert_ptr, group_start_ptr, group_count_ptr,
    zero_a_ptr, zero_b_ptr,
    P, G, E, n_zero_a, n_zero_b,
    PB: tl.constexpr, ZERO_BLOCK: tl.constexpr,
):
    """Everything the decode GEMMs need before they start, in one launch (each small launch costs
    2-3% of the T=1 floor of 83 us, even inside a CUDA graph).

    Program 0: the grouping, replacing ~7 torch launches: a stable counting sort of the P <= PB
    pairs by expert, done as a [PB, PB] comparison in registers, and the table of experts present
    (ascending), their first sorted position and row count; slots past the experts present get
    count 0. Programs 1..: zero the two fp32 accumulators the GEMMs atomically add into (the
    first n_zero_a / n_zero_b elements), replacing two memset launches."""
    if tl.program_id(0) > 0:
        offs = (tl.program_id(0) - 1) * ZERO_BLOCK + tl.arange(0, ZERO_BLOCK)
        zeros = tl.zeros((ZERO_BLOCK,), dtype=tl.float32)
        tl.store(zero_a_ptr + offs, zeros, mask=offs < n_zero_a)
        tl.store(zero_b_ptr + offs, zeros, mask=offs < n_zero_b)
        return
    lane = tl.arange(0, PB)
    # int32 ids (half the registers of the [PB, PB] comparisons for int64 ids); one outside
    # [0, E) joins no group, so no GEMM reads weights past the last expert for it.
    ids = _load_expert_ids(ids_ptr, lane, P, E)
    valid = ids >= 0
    id_i = ids[:, None]
    id_j = ids[None, :]
    valid_j = valid[None, :]
    earlier_j = lane[None, :] < lane[:, None]
    lower = valid_j & (id_j < id_i)
    same = valid_j & (id_j == id_i)
    pos = tl.sum((lower | (same & earlier_j)).to(tl.int32), axis=1)
    is_first = valid & (tl.sum((same & earlier_j).to(tl.int32), axis=1) == 0)
    start = tl.sum(lower.to(tl.int32), axis=1)
    count = tl.sum(same.to(tl.int32), axis=1)
    group = tl.sum((is_first[None, :] & lower).to(tl.int32), axis=1)
    tl.store(order_ptr + pos, lane, mask=valid)
    tl.store(group_expert_ptr + group, ids.to(tl.int32), mask=is_first)
    tl.store(group_start_ptr + group, start, mask=is_first)
    tl.store(group_count_ptr + group, count, mask=is_first)
    n_groups = tl.sum(is_first.to(tl.int32), axis=0)
    empty = (lane >= n_groups) & (lane < G)
    zero = tl.zeros((PB,), dtype=tl.int32)
    tl.store(group_expert_ptr + lane, zero, mask=empty)
    tl.store(group_start_ptr + lane, zero, mask=empty)
    tl.store(group_count_ptr + lane, zero, mask=empty)


@triton.jit
def _align_count_kernel(
    ids_ptr, chunk_count_ptr, P, E,
    EB: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    """Prefill alignment, launch 1 of 2: chunk_count[c, e] = pairs of chunk c (CHUNK pairs, in
    SUB-sized steps of an [SUB, EB] comparison) routed to expert e (0 for the lanes e >= E)."""
    c = tl.program_id(0)
    experts = tl.arange(0, EB)
    counts = tl.zeros((EB,), dtype=tl.int32)
    for s0 in range(0, CHUNK, SUB):
        lane = c * CHUNK + s0 + tl.arange(0, SUB)
        ids = _load_expert_ids(ids_ptr, lane, P, E)
        counts += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(chunk_count_ptr + c * EB + experts, counts)


@triton.jit
def _align_place_kernel(
    ids_ptr, chunk_count_ptr, sorted_pair_ptr, block_expert_ptr,
    P, E, n_chunks, num_blocks,
    BLOCK_M: tl.constexpr, EB: tl.constexpr, CHUNK: tl.constexpr, SUB: tl.constexpr,
):
    """Prefill alignment, launch 2 of 2: the stable sort of the pairs by expert, each expert's run
    padded to BLOCK_M, as align_by_expert (the torch formulation) defines it.

    Program c places the pairs of its chunk: an expert's run starts at its padded offset (an
    exclusive prefix sum over experts of the padded totals); within it a pair's rank is the count
    of same-expert pairs in earlier chunks, earlier SUB-steps of this chunk and earlier lanes of
    this step. Program 0 also writes the padding slots (pair index P) and block_expert."""
    c = tl.program_id(0)
    experts = tl.arange(0, EB)
    total = tl.zeros((EB,), dtype=tl.int32)
    before = tl.zeros((EB,), dtype=tl.int32)  # same-expert pairs in chunks < c
    for c2 in range(0, n_chunks):
        row = tl.load(chunk_count_ptr + c2 * EB + experts)
        total += row
        before += tl.where(c2 < c, row, 0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    cursor = pad_start + before  # next free slot of each expert for this chunk
    lanes = tl.arange(0, SUB)
    earlier = lanes[None, :] < lanes[:, None]
    for s0 in range(0, CHUNK, SUB):
        pair = c * CHUNK + s0 + lanes
        ids = _load_expert_ids(ids_ptr, pair, P, E)
        placed = ids >= 0  # past P or out of range: dropped rather than written over another's slot
        onehot = ids[:, None] == experts[None, :]
        same = (ids[:, None] == ids[None, :]) & placed[None, :] & earlier
        slot = tl.sum(tl.where(onehot, cursor[None, :], 0), axis=1) + tl.sum(same.to(tl.int32), axis=1)
        tl.store(sorted_pair_ptr + slot, pair.to(tl.int32), mask=placed)
        cursor += tl.sum(onehot.to(tl.int32), axis=0)
    if c == 0:
        # Padding: slots total[e] .. padded[e] - 1 of each expert's run (at most BLOCK_M - 1),
        # one slot of every expert per step: an [EB, BLOCK_M] store would hold EB * BLOCK_M
        # pointers in registers (the ahead-of-time check saw 227 registers at EB=128).
        pad_value = tl.zeros((EB,), dtype=tl.int32) + P
        for j in range(0, BLOCK_M - 1):
            tl.store(sorted_pair_ptr + pad_start + total + j, pad_value, mask=(total + j) < padded)
        # block_expert[b]: the expert whose padded run holds row tile b (experts whose run ends at
        # or before the tile's first row come earlier), -1 past the last run.
        for b0 in range(0, num_blocks, SUB):
            b = b0 + lanes
            first_row = b * BLOCK_M
            owner = tl.sum(((pad_end[None, :] <= first_row[:, None]) & (experts[None, :] < E)).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + b, tl.where(owner < E, owner, -1), mask=b < num_blocks)


@triton.jit
def _prefill_gate_up_kernel(
    x_ptr, w_ptr, a_ptr, score_ptr,
    sorted_pair_ptr, block_expert_ptr,
    P, H, I, K_TOP,
    stride_xt, stride_xh, stride_we, stride_wh, stride_wn,
    SCORE_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """a[pair] ([P, I], input dtype) = SiLU(s? x W_gate) * (s? x W_up) for one expert's row tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + rows).to(tl.int64)
        r_ok = pair < P
        token = tl.where(r_ok, pair // K_TOP, 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        w_base = w_ptr + expert * stride_we
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = tl.load(x_ptr + token[:, None] * stride_xt + ks[None, :] * stride_xh,
                        mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w_off = ks[:, None] * stride_wh + cols[None, :] * stride_wn
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
            wu = tl.load(w_base + w_off + I * stride_wn, mask=w_mask, other=0.0)
            acc_g += _mm(x, wg, True, DOT_UPCAST)
            acc_u += _mm(x, wu, True, DOT_UPCAST)
        if SCORE_ON_INPUT:
            score = tl.load(score_ptr + pair, mask=r_ok, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc_g = acc_g * score[:, None]
            acc_u = acc_u * score[:, None]
        act = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(a_ptr + pair[:, None] * I + cols[None, :], act.to(a_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & col_ok[None, :])


@triton.jit
def _prefill_down_kernel(
    a_ptr, w_ptr, y_ptr, score_ptr,
    sorted_pair_ptr, block_expert_ptr,
    P, H, I,
    stride_we, stride_wi, stride_wh,
    SCORE_ON_INPUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """y[pair] ([P, H]) = a[pair] @ w_down[expert], times the score when it is on the output."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ptr + rows).to(tl.int64)
        r_ok = pair < P
        safe_pair = tl.where(r_ok, pair, 0)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        w_base = w_ptr + expert * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < I
            a = tl.load(a_ptr + safe_pair[:, None] * I + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_base + ks[:, None] * stride_wi + cols[None, :] * stride_wh,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc += _mm(a, w, True, DOT_UPCAST)
        if not SCORE_ON_INPUT:
            score = tl.load(score_ptr + safe_pair, mask=r_ok, other=0.0).to(w_ptr.dtype.element_ty).to(tl.float32)
            acc = acc * score[:, None]
        tl.store(y_ptr + safe_pair[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & col_ok[None, :])


# --- host side: the alignment step and the two paths ------------------------------------------


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
