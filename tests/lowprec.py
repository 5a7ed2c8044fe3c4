"""Checks of low-precision paths (fp16, bf16) that hold on any x86-64 CPU.

A low-precision path is never compared with another low-precision path under a fixed number:
torch's bf16/fp16 CPU kernels take other code paths on other CPUs (AVX512-BF16, AMX, AVX512-FP16),
so two low-precision results can differ by a CPU-dependent amount. Instead both are compared with
the fp32 reference on the same inputs, and the path under test may be at most ``FACTOR`` times as
far from it as torch's own low-precision run. Most of either error comes from the weights rounded
to the low-precision dtype, which both share, so the ratio stays near 1 whatever the CPU does; a
wrong rounding or a dropped upcast raises the path's error on every token and the ratio with it
(tests/compiler/test_export.py plants both and checks that the check then fails).

Routing makes one more allowance. Top-1 routing is discrete: a token whose two best router logits
are within the dtype's noise (measured on the demo model: the bf16 router logits move by up to
0.04, fp16 by 0.004, against fp32) takes another expert under either low-precision path, on some
CPUs and not others, and then differs from fp32 by a whole expert's output. So the statistic is the
median over tokens of each token's largest logit error (prefill positions and decode steps alike):
a handful of tokens at a routing near-tie cannot move it, a precision fault that touches every
token does. Positional or structural faults are caught by the fp32 tests, which compare every
token at 1e-4 or tighter.
"""

from __future__ import annotations

import numpy as np
import torch

# How far the path under test may be from fp32, as a multiple of torch's own low-precision error
# (medians over tokens). Measured on the demo model (AMD EPYC with AVX512-BF16): 1.06 for the bf16
# graph on onnx's reference evaluator and 0.65 for the fp16 graph on ONNX Runtime; the planted
# faults give 1.64 (bf16 with its fp32 upcasts dropped) and 30 (fp16 weights rounded to 4 mantissa
# bits). Torch's error is mostly the shared weight rounding, which no CPU changes; CPUs differ in
# the last bits of their bf16/fp16 accumulations, a few percent of it, well inside 1.06 -> 1.4.
FACTOR = 1.4


def decode_tokens(ckpt, ids, pos, steps: int) -> list[np.ndarray]:
    """The fp32 reference's greedy tokens after the prompt, which every path is then fed
    (teacher forcing), so that all paths see the same inputs at every step."""
    from moec.models import load_pretrained

    model = load_pretrained(ckpt, dtype=torch.float32)
    tokens, past = [], None
    x, p = torch.from_numpy(ids), torch.from_numpy(pos)
    with torch.no_grad():
        for _ in range(steps):
            logits, past = model(x, p, past)
            end = int(p[0, -1]) + 1  # a chunked layer's ring length is not the past length
            x = logits[:, -1:].argmax(-1)
            tokens.append(x.numpy())
            p = torch.full_like(x, end)
    return tokens


def torch_logits(ckpt, dtype, ids, pos, tokens) -> list[np.ndarray]:
    """Logits (fp32 numpy) of the prompt and of each fed token, from moec's torch model in ``dtype``."""
    from moec.models import load_pretrained

    model = load_pretrained(ckpt, dtype=dtype)
    out, past = [], None
    x, p = torch.from_numpy(ids), torch.from_numpy(pos)
    with torch.no_grad():
        for step in range(len(tokens) + 1):
            logits, past = model(x, p, past)
            out.append(logits.float().numpy())
            if step < len(tokens):
                end = int(p[0, -1]) + 1  # a chunked layer's ring length is not the past length
                x = torch.from_numpy(tokens[step])
                p = torch.full_like(x, end)
    return out


def ort_logits(path, ids, pos, tokens, **backend_options) -> list[np.ndarray]:
    """Logits of the prompt and of each fed token from ONNX Runtime on the graph at ``path``."""
    from moec.runtime.ort_backend import OrtBackend

    be = OrtBackend.from_onnx(path, **backend_options)
    cache, out = be.init_cache(ids.shape[0]), []
    for step in range(len(tokens) + 1):
        got, cache = be.forward(ids, pos, cache)
        out.append(got)
        if step < len(tokens):
            ids, pos = tokens[step], np.full((ids.shape[0], 1), cache.past_len)
    return out


def token_errors(got: list[np.ndarray], ref: list[np.ndarray]) -> np.ndarray:
    """Each token's largest absolute logit error, over every step: shape [tokens]."""
    return np.concatenate([np.abs(g.astype(np.float32) - r).max(-1).reshape(-1) for g, r in zip(got, ref)])


def ratio_to_torch(got, torch_low, fp32) -> tuple[float, float, float]:
    """(ratio, path's median token error, torch's median token error), all against ``fp32``."""
    path_err = float(np.median(token_errors(got, fp32)))
    torch_err = float(np.median(token_errors(torch_low, fp32)))
    assert torch_err > 0, "torch's low-precision run equals fp32: the model did not run in low precision"
    return path_err / torch_err, path_err, torch_err


def assert_as_close_as_torch(got, torch_low, fp32, what: str) -> float:
    ratio, path_err, torch_err = ratio_to_torch(got, torch_low, fp32)
    assert ratio <= FACTOR, (
        f"{what}: median token error {path_err:.3e} against fp32 is {ratio:.2f}x torch's own "
        f"({torch_err:.3e}); at most {FACTOR}x is allowed")
    return ratio
