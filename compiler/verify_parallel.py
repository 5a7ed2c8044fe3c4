"""Verify a partition folder (``moec compile --tp/--ep``): its ranks against the PyTorch model.

A rank graph holds only its share of heads, experts and KV cache, so the single-graph comparison
(``verify_backends``, which compares caches too) does not apply. Instead the ranks generate
greedily, each in its own process with the collectives on torch.distributed (the same launcher as
``moec run OUT_DIR``), and rank 0 records every step's last-position logits; PyTorch is then fed
the same tokens (teacher forcing) and each step's logits are compared within the dtype's
tolerances. The greedy match per step says whether PyTorch's argmax equals the ranks' token.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import numpy as np

from moec.common import contract
from moec.common.sidecar import read_sidecar
from moec.compiler.verify import CompareRow, VerifyConfig, VerifyReport, _compare, default_prompt_len

LOGITS_FILE = "rank0_logits_TV.npy"


class _Recorder:
    """A rank backend that keeps each step's last-position logits (batch row 0)."""

    def __init__(self, inner):
        self.inner, self.seen_V = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids, pos, cache):
        logits, cache = self.inner.forward(ids, pos, cache)
        self.seen_V.append(np.asarray(logits[0, -1], dtype=np.float32).copy())
        return logits, cache


def rank_logits_job(prompt_ids: list[int], steps: int, out_dir: str, backend) -> dict:
    """Every rank: greedy generation of ``steps`` tokens; rank 0 saves its logits to ``out_dir``
    (a top-level function: the spawned ranks unpickle it by name)."""
    from moec.runtime.generate import GenerationConfig, generate

    rec = _Recorder(backend)
    result = generate(rec, prompt_ids, GenerationConfig(max_new_tokens=steps, stop_on_eos=False, temperature=0.0))
    if backend.rank == 0:
        np.save(Path(out_dir) / LOGITS_FILE, np.stack(rec.seen_V))
    return {"new_tokens": result.new_tokens}


def verify_rank_set(folder: Path, checkpoint: Path, config: VerifyConfig, launch=None, torch_dtype: str | None = None,
                    dequantize=None, allow_nonfinite: bool = False) -> VerifyReport:
    """Compare the ranks of ``folder`` (rank0.onnx ... and parallel.json) with ``checkpoint`` in
    PyTorch. ``dequantize(model)`` (optional) makes the reference use a quantized graph's weights."""
    from moec.models import Llama4Config
    from moec.models.torch_backend import TorchBackend
    from moec.runtime.parallel.launch import LaunchConfig, run_parallel
    from moec.runtime.parallel.rankset import read_parallel_manifest

    atol, rtol = config.tolerances
    llama = Llama4Config.from_pretrained(checkpoint)
    manifest = read_parallel_manifest(Path(folder))
    steps = config.decode_steps + 1  # tokens: the prefill's, then one per decode step
    max_pos = int(read_sidecar(Path(folder) / contract.rank_onnx(0))["max_positions"])
    if config.prompt_len is not None:
        prompt_len, rule = config.prompt_len, f"{config.prompt_len} tokens: given"
    else:
        prompt_len, rule = default_prompt_len(1, llama.num_attention_heads, llama.vocab_size,
                                              llama.attention_chunk_size, max_pos - steps)
    rng = np.random.default_rng(config.seed)
    prompt = rng.integers(0, llama.vocab_size, size=prompt_len).tolist()
    work = tempfile.mkdtemp(prefix="moec-verify-ranks-")
    try:
        out = run_parallel(folder, None, None, launch or LaunchConfig(),
                           job=functools.partial(rank_logits_job, prompt, steps, work))
        got_TV = np.load(Path(work) / LOGITS_FILE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokens = out["new_tokens"][0]

    torch_backend = TorchBackend.from_checkpoint(checkpoint, dtype=torch_dtype or config.dtype,
                                                 allow_nonfinite=allow_nonfinite)
    if dequantize is not None:
        dequantize(torch_backend.model)
    report = VerifyReport(dtype=config.dtype, atol=atol, rtol=rtol, prompt_len=prompt_len, batch=1, prompt_rule=rule,
                          torch_describe=torch_backend.describe(),
                          ort_describe={**out.get("describe", {}), "tp": str(manifest["tp"]), "ep": str(manifest["ep"])})
    cache = torch_backend.init_cache(1)
    feed = [prompt] + [[t] for t in tokens[:-1]]
    pos = 0
    for step, ids in enumerate(feed):
        ids_BS = np.asarray([ids], dtype=np.int64)
        pos_BS = np.arange(pos, pos + len(ids), dtype=np.int64)[None]
        logits, cache = torch_backend.forward(ids_BS, pos_BS, cache)
        pos += len(ids)
        ref_V, got_V = np.asarray(logits[0, -1], dtype=np.float32), got_TV[step]
        # The check verify_backends makes; a non-finite logit on either side is a failure, never "equal".
        r = _compare({contract.LOGITS: got_V}, {contract.LOGITS: ref_V}, atol, rtol)[contract.LOGITS]
        finite = bool(np.isfinite(ref_V).all() and np.isfinite(got_V).all())
        max_abs = float(r.max_absdiff) if finite else float("nan")
        max_rel = float(r.max_reldiff)
        ok = bool(r) and finite and bool(np.isfinite(max_abs))
        name = "prefill" if step == 0 else f"decode {step}"
        report.rows.append(CompareRow(name, contract.LOGITS, max_abs, max_rel, ok))
        report.greedy_match.append(finite and int(ref_V.argmax()) == int(tokens[step]))
    return report
