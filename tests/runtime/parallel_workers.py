"""Rank functions the multi-process tests spawn (a module of their own: spawn imports it by name)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def record_logits(rank, folder, world, init_method, prompt, steps, out_dir):
    """Generate ``steps`` greedy tokens; rank 0 saves its tokens and every step's last logits."""
    from moec.runtime.generate import GenerationConfig
    from moec.runtime.parallel.launch import LaunchConfig, run_rank

    seen = []

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def forward(self, ids, pos, cache):
            logits, cache = self.inner.forward(ids, pos, cache)
            seen.append(logits[:, -1].copy())
            return logits, cache

    out = run_rank(Path(folder), rank, world, init_method, prompt,
                   GenerationConfig(max_new_tokens=steps, stop_on_eos=False), LaunchConfig(timeout_s=30),
                   wrap_backend=Recorder)
    if rank == 0:
        np.save(Path(out_dir) / "logits.npy", np.stack(seen))
        Path(out_dir, "tokens.json").write_text(json.dumps(out["new_tokens"]))


def die_mid_generation(rank, folder, world, init_method, out_dir, dying_rank, timeout_s):
    """``dying_rank`` exits hard on its 4th step; every other rank must stop with RankLost."""
    import time

    from moec.common.errors import MoecError
    from moec.runtime.generate import GenerationConfig
    from moec.runtime.parallel.launch import LaunchConfig, run_rank

    class Dies:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def forward(self, ids, pos, cache):
            self.calls += 1
            if rank == dying_rank and self.calls == 4:
                os._exit(17)
            return self.inner.forward(ids, pos, cache)

    t0 = time.monotonic()
    try:
        run_rank(Path(folder), rank, world, init_method, [1, 2, 3], GenerationConfig(max_new_tokens=20, stop_on_eos=False),
                 LaunchConfig(timeout_s=timeout_s), wrap_backend=Dies)
    except MoecError as e:
        Path(out_dir, f"rank{rank}.txt").write_text(json.dumps({"type": type(e).__name__, "message": str(e),
                                                                  "after_s": time.monotonic() - t0}))
        return
    Path(out_dir, f"rank{rank}.txt").write_text(json.dumps({"type": None}))
