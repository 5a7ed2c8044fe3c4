"""The Triton kernels of the routed experts (``moec.GroupedExperts``); the host code that sizes and
launches them, and the design of the two paths, are in moe_triton.py.

decode: ``_decode_group_kernel`` (grouping by expert + zeroing the accumulators), ``_decode_gate_up_kernel``
and ``_decode_down_kernel`` (split-K GEMMs over one expert's weight tile). prefill: ``_align_count_kernel`` and
``_align_place_kernel`` (each expert's run padded to BLOCK_M), ``_prefill_gate_up_kernel`` (grouped GEMM with
SiLU(gate) * up in its epilogue) and ``_prefill_down_kernel``. ``_mm`` is their shared tile product (``DOT_UPCAST``:
see moe_triton.py on the interpreter).
"""

from __future__ import annotations

import triton
import triton.language as tl

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
