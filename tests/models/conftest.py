"""Session fixtures of tests/models."""

from __future__ import annotations

import pytest
from hf_reference import LLAMA3_ROPE, make_hf_model, save_hf


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory):
    """Reference model A (llama3 RoPE, QK norm, NoPE layers, every layer MoE, k=1), saved unsharded."""
    model = make_hf_model(seed=1, rope_parameters=LLAMA3_ROPE)
    path = save_hf(model, tmp_path_factory.mktemp("hf_a"))
    return model, path
