"""moec plan: byte counts on the real Scout and Maverick config.json, checked against counts done
by hand from the configs' sizes, and against the torch model's own parameters."""

from __future__ import annotations

import json
import math

import pytest
from real_configs import real_config_path, shrunk_config_dict

from moec.compiler.cli import main
from moec.common.errors import MoecError
from moec.compiler.plan import GIB, Layout, PlanConfig, engine_memory, kv_bytes, plan, weight_bytes
from moec.models import Llama4Config

H, V, HEADS, KV, D, I, I_MLP = 5120, 202048, 40, 8, 128, 8192, 16384
ATTN = H * (HEADS + 2 * KV) * D + HEADS * D * H  # q, k, v, o
NORMS = 2 * H
EMBED = 2 * V * H + H  # embed_tokens, lm_head, final norm


def real(name):
    return Llama4Config.from_pretrained(real_config_path(name))


def test_scout_weights_by_hand():
    E = 16
    routed = E * 3 * H * I
    layer = NORMS + ATTN + H * E + 3 * H * I + routed  # every Scout layer is MoE
    params = 48 * layer + EMBED
    assert params == 107_769_861_120  # the "109B" of the model card, less the vision tower
    assert weight_bytes(real("scout"), Layout(1, 1), "bf16") == (2 * params, 2 * (EMBED + 48 * (NORMS + H * E)))
    # int4, group 128: half a byte per routed weight plus one fp16 scale per 128 of them.
    int4 = 2 * (params - 48 * routed) + 48 * (routed // 2 + 2 * (routed // 128))
    assert weight_bytes(real("scout"), Layout(1, 1), "int4")[0] == int4
    # fp8: one byte per routed weight plus one fp32 scale per output row (2I of gate_up, H of down).
    fp8 = 2 * (params - 48 * routed) + 48 * (routed + 4 * E * (2 * I + H))
    assert weight_bytes(real("scout"), Layout(1, 1), "fp8")[0] == fp8


def test_maverick_weights_by_hand():
    E = 128
    dense_layer = NORMS + ATTN + 3 * H * I_MLP
    moe_layer = NORMS + ATTN + H * E + 3 * H * I + E * 3 * H * I
    params = 24 * dense_layer + 24 * moe_layer + EMBED
    assert params == 400_711_848_960  # "400B"
    assert weight_bytes(real("maverick"), Layout(1, 1), "bf16")[0] == 2 * params
    # ep 8: each rank holds 16 of the 128 experts; everything else whole.
    per_rank = 2 * (params - 24 * E * 3 * H * I) + 2 * 24 * 16 * 3 * H * I
    assert weight_bytes(real("maverick"), Layout(1, 8), "bf16")[0] == per_rank


def test_kv_ring_on_chunked_layers_by_hand():
    per_position_layer = 2 * KV * D * 2  # k and v, bf16
    cfg = real("scout")
    # 8192 = one chunk: every layer holds 8192 positions.
    assert sum(kv_bytes(cfg, Layout(1, 1), 8192, 1)) == 48 * per_position_layer * 8192
    # 128 K: the 12 NoPE layers (every fourth) hold it all, the 36 chunked ones a ring of 8192.
    full, chunked = kv_bytes(cfg, Layout(1, 1), 131072, 2)
    assert (full, chunked) == (12 * per_position_layer * 131072 * 2, 36 * per_position_layer * 8192 * 2)
    # tp 2 halves the kv heads per rank; without the ring (today's export) every layer holds it all.
    assert sum(kv_bytes(cfg, Layout(2, 1), 131072, 2)) == (full + chunked) // 2
    assert sum(kv_bytes(cfg, Layout(1, 1), 131072, 2, ring=False)) == 48 * per_position_layer * 131072 * 2


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_weights_equal_the_model_parameters(name):
    """The count by formula equals the torch model's tensors (shrunk config, every field kept)."""
    import torch

    from moec.models.llama4 import Llama4ForCausalLM

    cfg = Llama4Config.from_hf_dict(shrunk_config_dict(name))
    with torch.device("meta"):
        numel = sum(math.prod(t.shape) for t in Llama4ForCausalLM(cfg).state_dict().values())
    assert weight_bytes(cfg, Layout(1, 1), "bf16")[0] == 2 * numel
    # Tensor parallel splits every tensor it does not replicate: tp x sharded + replicated = the whole.
    w, rep = weight_bytes(cfg, Layout(4, 1), "bf16")
    assert 4 * (w - rep) + rep == 2 * numel


def test_recommendations_on_the_real_configs():
    scout = plan(real("scout"), PlanConfig(gpu="h100"))
    rec = scout.recommended()
    assert (rec.layout.ranks, rec.fits) == (2, True)
    assert not any(r.fits for r in scout.rows if r.layout.ranks == 1 and r.precision == "bf16")
    maverick = plan(real("maverick"), PlanConfig(gpu="h200", gpus=8))
    assert maverick.recommended().precision == "bf16"
    # No fp8 on the A100 (sm80): listed, never fitting.
    a100 = plan(real("scout"), PlanConfig(gpu="a100-80", gpus=4))
    assert all(not r.fits and "fp8" in r.reason for r in a100.rows if r.precision == "fp8")


def test_engine_memory_fits_list():
    cfg = Llama4Config.from_hf_dict(shrunk_config_dict("scout"))
    m = engine_memory(cfg, 10 * GIB, "bf16", max_batch=1, max_new_tokens=64, max_positions=128, ring=False)
    assert m["total_bytes"] == m["weight_bytes"] + m["kv_bytes"] + m["activation_bytes"] + m["reserve_bytes"]
    assert "h100" in m["fits"] and "l4" in m["fits"]
    big = engine_memory(cfg, 100 * GIB, "bf16", max_batch=1, max_new_tokens=64, max_positions=128, ring=False)
    assert "h100" not in big["fits"] and "h200" in big["fits"]


def test_cli_plan(capsys):
    main(["plan", str(real_config_path("scout")), "--gpu", "h100", "--gpus", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["context"] == 8192 and {(r["tp"], r["ep"]) for r in out["rows"]} == {(1, 2), (2, 1)}
    main(["plan", str(real_config_path("maverick")), "--gpu", "h200"])
    assert "recommended:" in capsys.readouterr().out


def test_cli_plan_bad_input(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plan", str(real_config_path("scout")), "--gpus", "3"])
    assert e.value.code == 2 and "experts (16) do not divide by 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", str(real_config_path("maverick")), "--context", str(2 * 1048576)])
    assert e.value.code == 2 and "exceeds the model's max_position_embeddings" in capsys.readouterr().err
    with pytest.raises(MoecError, match="unknown GPU"):
        PlanConfig(gpu="v100")
