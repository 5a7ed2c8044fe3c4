"""The Triton MoE kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1), or on the
GPU where one is present and triton was imported without the interpreter.

Each case draws fresh random inputs, hands the kernels NaN-filled buffers for everything they must
overwrite, and compares against the fp32 reference of the same semantics (reference.py).

The interpreter is a numpy emulation: shapes are tiny (H=64, I=32) so that the token counts of the
issue (up to 4096) stay within seconds. Two interpreter defects shape the bf16 cases (see
moe_triton.py): tl.dot mis-computes bf16 operands, so interpreter mode widens them to fp32 before
the dot, and fp32 -> bf16 casts truncate, which roughly doubles the bf16 error (measured up to
about 6e-3 here; the GPU rounds to nearest). fp16 runs the GPU's code path unchanged.
"""

from __future__ import annotations

import os

# Before triton is imported: triton.language's own helpers (tl.cdiv, tl.sigmoid, ...) are jitted
# when triton is first imported, and only the interpreted kind can be called from the interpreter.
# tests/conftest.py sets it for the whole session on machines without a GPU (transformers imports
# triton during collection); this line covers running this file on its own there.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from moec.runtime.kernels.reference import grouped_experts_reference, random_inputs  # noqa: E402
from moec.runtime.kernels.reference import relative_error as rel_err  # noqa: E402

triton = pytest.importorskip("triton")

H, I = 64, 32
TOL = 1e-2


@pytest.fixture(scope="module")
def mt():
    from triton.runtime.interpreter import InterpretedFunction

    from moec.runtime.kernels import moe_triton

    interpreted = moe_triton.INTERPRETED and isinstance(moe_triton._mm, InterpretedFunction)
    if not interpreted and not torch.cuda.is_available():
        pytest.fail("no GPU and triton was imported before TRITON_INTERPRET=1 was set; run this file on its own")
    return moe_triton


@pytest.fixture(scope="module")
def device(mt):
    return "cpu" if mt.INTERPRETED else "cuda"


@pytest.fixture
def poisoned(mt, monkeypatch):
    """Every buffer the kernels must overwrite starts as NaN."""

    def nan_filled(*shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1  # -1: no count, no valid index
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(mt, "_alloc_uninitialized", nan_filled)
    return mt


def check(mt, T, E, K, dtype, score_on_input, config=None, h=H, i=I):
    device = "cpu" if mt.INTERPRETED else "cuda"
    x, ids, scores, w1, w2 = random_inputs(T, E, K, h, i, dtype, device=device)
    out = mt.grouped_experts_triton(x, ids, scores, w1, w2, score_on_input, config=config)
    assert out.shape == (T, h) and out.dtype == dtype
    assert not torch.isnan(out).any(), "an output element was never written"
    # The op casts scores to the hidden dtype before use (passes/ops.py); the rest is fp32.
    ref = grouped_experts_reference(x.float(), ids, scores.to(dtype).float(), w1.float(), w2.float(), score_on_input)
    err = rel_err(out, ref)
    assert err <= TOL, f"relative error {err:.3e} > {TOL} (T={T}, E={E}, k={K}, {dtype}, path={config and config.path})"
    return err


# The grid: every (T, E, k). Each case alternates dtype and score placement so both are
# covered across the grid without doubling the interpreter's time. E=128 with T=1..16 leaves most
# experts without tokens; T=3 and T=1000 are multiples of no tile.
GRID = [(T, E, K) for T in (1, 3, 16, 128, 1000, 4096) for E in (16, 128) for K in (1, 2)]


@pytest.mark.parametrize("T, E, K", [pytest.param(*g, marks=pytest.mark.slow) if g[0] == 4096 else g for g in GRID])
def test_grid_against_fp32_reference(poisoned, T, E, K):
    dtype = torch.bfloat16 if (T + E + K) % 2 else torch.float16
    score_on_input = (T // 2 + K) % 2 == 0
    check(poisoned, T, E, K, dtype, score_on_input)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score_on_input", [True, False])
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_both_paths_dtypes_and_score_placements(poisoned, path, score_on_input, dtype):
    # Small tiles so each program loops over several K blocks and the grid has several column
    # blocks; H and I are not multiples of the tiles, so every mask is exercised.
    T = 5 if path == "decode" else 77
    cfg = poisoned.select_config(16, 72, 40, T, 2)
    assert cfg.path == path
    cfg = replace(cfg, block_k=32, block_n_gate_up=16, block_n_down=32)
    check(poisoned, T, 16, 2, dtype, score_on_input, config=cfg, h=72, i=40)


@pytest.mark.parametrize("block_m", [1, 2, 4, 16])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("K", [1, 2])
def test_decode_row_tiles_and_split_k(poisoned, block_m, split_k, K):
    """Broadcast-FMA rows (1, 2, 4) and tensor-core rows (16); split-K 1 stores, 3 adds atomically
    over uneven chunks; 9 tokens on 4 experts make an expert need several row passes. k = 1 with
    split-K 1 writes the output directly (DIRECT_OUT), in the output dtype."""
    cfg = replace(
        poisoned.select_config(4, 80, 48, 9, K),
        block_m=block_m, block_k=16, block_n_gate_up=16, block_n_down=32,
        split_k_gate_up=split_k, split_k_down=split_k,
    )
    check(poisoned, 9, 4, K, torch.float16, (block_m + K) % 2 == 0, config=cfg, h=80, i=48)


@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_prefill_row_tiles(poisoned, block_m):
    cfg = replace(poisoned.select_config(16, H, I, 300, 1), block_m=block_m)
    check(poisoned, 300, 16, 1, torch.bfloat16, False, config=cfg)


def test_all_tokens_on_one_expert(poisoned, device):
    x, _, scores, w1, w2 = random_inputs(100, 16, 1, H, I, torch.float16, device=device)
    ids = torch.full((100, 1), 7, device=device)
    out = poisoned.grouped_experts_triton(x, ids, scores, w1, w2, True)
    ref = grouped_experts_reference(x.float(), ids, scores.half().float(), w1.float(), w2.float(), True)
    assert rel_err(out, ref) <= TOL


GUARD = 64  # elements; 64 of any dtype keep the buffer's 16-byte alignment


@pytest.fixture
def guarded(poisoned, monkeypatch):
    """``poisoned``, and every buffer the kernels write sits between two runs of GUARD sentinel
    elements that must survive the call (an out-of-bounds write lands there in the interpreter's
    numpy memory). The sentinel is a value no kernel writes (not a pair index, count or expert)."""
    guards = []
    nan_filled = poisoned._alloc_uninitialized

    def with_guards(*shape, dtype, device):
        n = 1
        for d in shape:
            n *= d
        base = nan_filled(n + 2 * GUARD, dtype=dtype, device=device)
        sentinel = -(2**31) + 7 if not dtype.is_floating_point else -12288.0
        for part in (base[:GUARD], base[GUARD + n:]):
            part.fill_(sentinel)
            guards.append((part, part.clone()))
        return base[GUARD:GUARD + n].view(*shape)

    monkeypatch.setattr(poisoned, "_alloc_uninitialized", with_guards)
    monkeypatch.setattr(
        poisoned, "guards_intact", lambda: all(torch.equal(part, saved) for part, saved in guards), raising=False
    )
    return poisoned


@pytest.mark.parametrize("T", [3, 40])  # decode, prefill
@pytest.mark.parametrize("E, bad_id", [(8, -1), (8, 11), (5, 6), (5, 2**40)])
def test_an_out_of_range_id_is_skipped_not_read_past_the_weights(guarded, device, T, E, bad_id):
    """A broken router's id outside [0, E) must not make a kernel read weights past the last expert
    or write past a buffer (E=5 with id 6: inside the power-of-two lanes the alignment kernels
    compare against; 2**40: an int64 id that a narrowing cast would wrap to 0). The pair is skipped:
    its token's other choice still counts on the decode path (the accumulator is zeroed), and
    every other token is exact on both paths."""
    K = 2
    x, ids, scores, w1, w2 = random_inputs(T, E, K, H, I, torch.float16, device=device)
    bad_ids = ids.clone().long()
    bad_ids[0, 0] = bad_id
    out = guarded.grouped_experts_triton(x, bad_ids, scores, w1, w2, True)
    assert guarded.guards_intact(), "a kernel wrote outside a buffer"
    no_contribution = scores.clone()
    no_contribution[0, 0] = 0.0  # SiLU(0 * g) * (0 * u) = 0: the pair adds nothing
    ref = grouped_experts_reference(x.float(), ids, no_contribution.to(x.dtype).float(), w1.float(), w2.float(), True)
    first = 0 if T <= 32 else 1  # prefill leaves the skipped pair's row unwritten
    assert rel_err(out[first:], ref[first:]) <= TOL


def test_alignment_pads_each_expert_to_the_tile(mt):
    ids = torch.tensor([3, 0, 3, 3, 1, 0, 3])
    sorted_pair, block_expert = mt.align_by_expert(ids, 5, 2)
    P = ids.numel()
    # Each row tile holds pairs of one expert only, padding is P, every pair appears once.
    tiles = sorted_pair.view(-1, 2)
    for b, e in enumerate(block_expert.tolist()):
        real = [p for p in tiles[b].tolist() if p < P]
        assert (e == -1) == (not real)
        assert all(ids[p].item() == e for p in real)
    assert sorted(p for p in sorted_pair.tolist() if p < P) == list(range(P))
    # Static bound: cdiv(7, 2) + min(7, 5) = 9 tiles; experts 0, 1 and 3 need 1, 1 and 2.
    assert block_expert.tolist() == [0, 1, 3, 3, -1, -1, -1, -1, -1]


@pytest.mark.parametrize(
    "P, E, block_m",
    [(1, 16, 16), (7, 5, 2), (129, 3, 4), (300, 16, 16), (1000, 128, 16), (4096, 16, 64), (5000, 128, 32)],
)
def test_two_launch_alignment_equals_the_torch_formulation(mt, device, P, E, block_m):
    """The Triton alignment gives align_by_expert's stable order and tile table exactly, over one
    and many chunks, with experts that get no pairs and E not a power of two. Slots past the last
    used tile are not the kernels' to write (no tile reads them)."""
    ids = torch.randint(0, E, (P,), device=device, dtype=torch.int32)
    sorted_pair, block_expert = mt.align_by_expert_triton(ids, E, block_m)
    ref_pair, ref_expert = mt.align_by_expert(ids.long(), E, block_m)
    assert torch.equal(block_expert, ref_expert)
    used = int((ref_expert >= 0).sum()) * block_m
    assert torch.equal(sorted_pair[:used], ref_pair[:used])


@pytest.mark.parametrize("path, T, E", [("decode", 70, 8), ("prefill", 40, 260)])
def test_an_out_of_range_id_in_the_torch_fallbacks(guarded, device, path, T, E):
    """The torch formulations behind the kernels (decode grouping past 128 pairs, prefill
    alignment past 256 experts) skip such a pair too, instead of failing index_add_'s bounds check
    (a device-side assert on a GPU, which poisons the process's CUDA context)."""
    K = 2
    x, ids, scores, w1, w2 = random_inputs(T, E, K, H, I, torch.float16, device=device)
    bad_ids = ids.clone()
    bad_ids[0, 0], bad_ids[1, 1] = -1, E + 5
    config = guarded.default_config(path, E, T, K)
    assert (path == "decode" and T * K > guarded.DECODE_GROUP_MAX_PAIRS) or E > guarded.ALIGN_MAX_EXPERTS
    out = guarded.grouped_experts_triton(x, bad_ids, scores, w1, w2, True, config=config)
    assert guarded.guards_intact()
    ref = grouped_experts_reference(x.float(), ids, scores.to(x.dtype).float(), w1.float(), w2.float(), True)
    assert rel_err(out[2:], ref[2:]) <= TOL


@pytest.mark.parametrize("P", [8, 200])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_alignment_with_many_out_of_range_ids_stays_in_its_buffers(guarded, device, ids_dtype, P):
    """Ids in [E, next_pow2(E)) are inside the lanes the alignment kernels compare against: they
    must get no padded run of their own (their padding would be written past sorted_pair, which
    is sized for E runs: with ids 0..7 once each, 8 runs of 16 against room for 6). Every in-range
    pair is placed in its expert's tiles, nothing else."""
    E, block_m = 5, 16
    ids = torch.randperm(P, device=device).remainder(8).to(ids_dtype)  # 3/8 out of range
    sorted_pair, block_expert = guarded.align_by_expert_triton(ids, E, block_m)
    assert guarded.guards_intact(), "an alignment kernel wrote outside a buffer"
    tiles = sorted_pair.view(-1, block_m)
    placed = []
    for b, e in enumerate(block_expert.tolist()):
        if e >= 0:
            real = [p for p in tiles[b].tolist() if 0 <= p < P]
            assert all(p == P or 0 <= p < P for p in tiles[b].tolist())  # a pair or padding, nothing unwritten
            assert all(ids[p].item() == e for p in real)
            placed += real
    assert sorted(placed) == [p for p in range(P) if ids[p].item() < E]


@pytest.mark.parametrize("P, E", [(1, 16), (3, 128), (6, 8), (7, 4), (32, 16), (100, 8), (128, 128)])
def test_one_program_grouping_equals_the_torch_formulation(guarded, device, P, E):
    """Also: nothing is written outside the buffers, nor into the padding that aligns the table's
    rows (it keeps its poison, -1, which the grouping never writes)."""
    ids = torch.randint(0, E, (P,), device=device)
    order, expert, start, count = guarded.decode_groups(ids, E)
    assert guarded.guards_intact()
    storage = torch.empty(0, dtype=torch.int32, device=device).set_(expert.untyped_storage())
    first, G = expert.storage_offset(), expert.numel()
    row = start.storage_offset() - first  # G rounded up to 4
    assert row == -(-G // 4) * 4 and count.storage_offset() - first == 2 * row
    for r in range(3):
        assert (storage[first + r * row + G:first + (r + 1) * row] == -1).all(), "a write into a row's padding"
    ref_order, ref_expert, ref_start, ref_count = guarded.expert_groups(ids, E)
    assert torch.equal(order, ref_order) and torch.equal(count, ref_count)
    present = ref_count > 0
    assert torch.equal(expert[present], ref_expert[present]) and torch.equal(start[present], ref_start[present])


@pytest.mark.parametrize("P, E", [(1, 16), (5, 8), (64, 128)])
def test_grouping_launch_zeroes_the_accumulators(poisoned, device, P, E):
    """The grouping launch's extra programs clear both fp32 accumulators, whatever their sizes
    (one smaller than a zeroing block, one spanning several)."""
    ids = torch.randint(0, E, (P,), device=device, dtype=torch.int32)
    a = torch.full((P, 2 * 4096 + 5), float("nan"), device=device)
    b = torch.full((3, 7), float("nan"), device=device)
    order, *_ = poisoned.decode_groups(ids, E, (a, b))
    assert torch.equal(a, torch.zeros_like(a)) and torch.equal(b, torch.zeros_like(b))
    assert torch.equal(order, poisoned.expert_groups(ids.long(), E)[0])


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _launching(ops) -> list[str]:
    """The ops that launch a kernel on a GPU: not views, not uninitialized allocations."""
    return [str(f) for f in ops if not f.is_view and not str(f).startswith("aten.empty.")]


def _count_call(mt, monkeypatch, T, K, ids_dtype=torch.int32, config=None, E=16, H=5120, I=8192):
    """One call on meta tensors of Llama 4 expert shapes: (its Triton launches, the torch ops
    among it that launch, its output). The launches are recorded, not run, so the GPU's host path
    is what is counted (the interpreter adds a bf16 score cast of its own)."""
    monkeypatch.setattr(mt, "INTERPRETED", False)
    meta = torch.device("meta")
    args = (
        torch.empty(T, H, dtype=torch.bfloat16, device=meta), torch.empty(T, K, dtype=ids_dtype, device=meta),
        torch.empty(T, K, dtype=torch.float32, device=meta), torch.empty(E, H, 2 * I, dtype=torch.bfloat16, device=meta),
        torch.empty(E, I, H, dtype=torch.bfloat16, device=meta),
    )
    with mt.recording_launches() as launches, _CountOps() as counted:
        out = mt.grouped_experts_triton(*args, True, config=config)
    return launches, _launching(counted.ops), out


@pytest.mark.parametrize("T, K, ids_dtype", [(1, 1, torch.int32), (1, 1, torch.int64), (16, 2, torch.int32)])
def test_a_decode_call_is_four_launches(mt, monkeypatch, T, K, ids_dtype):
    """Inside a CUDA graph each launch still costs 2-3% of the T=1 floor, so a decode call is the
    grouping launch (which also zeroes the accumulators), the two GEMMs and the final cast: no
    memsets, no id or score casts. Counted on meta tensors: torch ops that launch plus Triton
    launches."""
    E, H, I = 16, 5120, 8192
    config = mt.select_config(E, H, I, T, K)
    config = replace(config, split_k_gate_up=max(2, config.split_k_gate_up))  # both accumulators need zeroing
    launches, torch_launches, _ = _count_call(mt, monkeypatch, T, K, ids_dtype, config)
    assert torch_launches == ["aten._to_copy.default"]  # the fp32 -> bf16 output cast
    assert [x.name for x in launches] == ["_decode_group_kernel", "_decode_gate_up_kernel", "_decode_down_kernel"]


def test_a_decode_call_without_split_down_is_three_launches(mt, monkeypatch):
    """k = 1 and an unsplit down GEMM: it writes the bf16 output itself, so no cast launch."""
    config = replace(mt.select_config(16, 5120, 8192, 1, 1), split_k_down=1)
    launches, torch_launches, out = _count_call(mt, monkeypatch, 1, 1, config=config)
    assert torch_launches == [] and out.dtype == torch.bfloat16
    assert len(launches) == 3 and launches[2].kwargs["DIRECT_OUT"] is True


@pytest.mark.parametrize("K, torch_ops", [(1, []), (2, ["aten.sum.dim_IntList", "aten._to_copy.default"])])
def test_a_prefill_call_is_four_launches_plus_the_k_sum(mt, monkeypatch, K, torch_ops):
    """Prefill: the two alignment launches and the two GEMMs; k > 1 adds the deterministic sum of
    the k rows per token and its cast."""
    launches, torch_launches, _ = _count_call(mt, monkeypatch, 1024, K)
    assert torch_launches == torch_ops
    assert [x.name for x in launches] == [
        "_align_count_kernel", "_align_place_kernel", "_prefill_gate_up_kernel", "_prefill_down_kernel",
    ]


def test_decode_groups_list_present_experts_first(mt):
    ids = torch.tensor([5, 2, 5])
    order, group_expert, group_start, group_count = mt.expert_groups(ids, 8)
    assert group_expert.tolist() == [2, 5, 0]
    assert group_count.tolist() == [1, 2, 0]
    assert [order[s].item() for s in group_start[:2].tolist()] == [1, 0]


# --- the launch-config table ------------------------------------------------------------------


def test_default_config_picks_path_by_token_count(mt):
    table = mt.load_config_table()
    limit = table["default"]["decode_max_tokens"]
    assert mt.select_config(16, 5120, 8192, limit, 1).path == "decode"
    assert mt.select_config(16, 5120, 8192, limit + 1, 1).path == "prefill"
    assert mt.select_config(16, 5120, 8192, 1, 1, "NVIDIA H100 80GB HBM3").tuned is False


def test_shipped_table_claims_no_tuned_entries(mt):
    """Nothing was tuned on a GPU yet; an entry appearing here must come from a real sweep."""
    assert all(not entries for entries in mt.load_config_table()["tuned"].values())


def test_tuned_entry_is_used_for_its_device_and_bucket(mt, monkeypatch):
    table = {
        "default": mt.load_config_table()["default"],
        "tuned": {"H100": {"E=16,H=5120,I=8192,T=128": {"path": "prefill", "block_m": 32, "num_warps": 8}}},
    }
    from moec.runtime.kernels import moe_configs

    monkeypatch.setattr(moe_configs, "load_config_table", lambda: table)  # where select_config reads it
    cfg = mt.select_config(16, 5120, 8192, 100, 1, "NVIDIA H100 80GB HBM3")
    assert cfg.tuned and cfg.block_m == 32 and cfg.num_warps == 8
    assert not mt.select_config(16, 5120, 8192, 100, 1, "NVIDIA L4").tuned
    assert not mt.select_config(16, 5120, 8192, 300, 1, "NVIDIA H100 80GB HBM3").tuned
