"""One rank of a partitioned model on ONNX Runtime, its collectives run by torch.distributed.

``OrtRankBackend`` is a ``moec.runtime.backend.Backend``: the shared generation loop drives it
unchanged on every rank. Its ``share_tokens`` broadcasts rank 0's sampled tokens, so every rank
feeds the same ids (generate.py calls it after each pick); the logits are whole on every rank
(the vocab projection is replicated), but only rank 0's pick counts.

The graph runs as segments between its DistCollective nodes (segments.py); each collective is a
``torch.distributed.all_reduce`` on the group its ``groups`` attribute names (gloo on a CPU; the
process group is whatever the caller initialised). A failed collective (a peer that died, or one
that did not arrive within the process group's timeout) raises ``RankLost``, a MoecError naming
the collective and the rank, instead of hanging.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.common import contract
from moec.common.errors import MoecError
from moec.common.sidecar import read_sidecar
from moec.common.token_ids import bad_token_ids_message
from moec.runtime.parallel.segments import Collective, SegmentedGraph

_NUMPY_TYPES = {1: np.float32, 10: np.float16}


class RankLost(MoecError):
    """A collective failed: another rank stopped (died, or exceeded the timeout)."""


@dataclass
class RankCache:
    keys: list[np.ndarray]
    values: list[np.ndarray]
    batch_size: int
    past_len: int


class OrtRankBackend:
    name = "ort"

    def __init__(self, folder: Path, rank: int, world_size: int, groups: dict, intra_op_threads: int | None = None):
        import torch.distributed as dist

        self.dist = dist
        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.path = self.folder / contract.rank_onnx(rank)
        self.sidecar = read_sidecar(self.path)
        self.graph = SegmentedGraph(self.path, intra_op_threads)
        self.groups = groups  # tuple of ranks -> process group (None: the default, all ranks)
        self.num_layers = int(self.sidecar["num_layers"])
        self.max_positions = int(self.sidecar["max_positions"])
        self.vocab_size = int(self.sidecar["vocab_size"])
        self.eos_token_ids = tuple(int(t) for t in self.sidecar["generation"].get("eos_token_ids", []))
        k0 = next(i for i in self.graph.model.graph.input if i.name == contract.past_key(0))
        dims = k0.type.tensor_type.shape.dim
        self._kv_heads, self._head_dim = int(dims[1].dim_value), int(dims[3].dim_value)
        self._kv_dtype = _NUMPY_TYPES.get(k0.type.tensor_type.elem_type)
        # Per layer, a chunked layer's ring size (its fixed slot axis), or 0 for a full cache that
        # starts empty and grows.
        inputs = {i.name: i for i in self.graph.model.graph.input}
        self._ring_slots = [_fixed_slots(inputs[contract.past_key(i)]) for i in range(self.num_layers)]
        if self._kv_dtype is None:
            raise MoecError(f"{self.path}: its KV cache type is not one the ONNX Runtime CPU path runs (fp32, fp16)")
        self.collective_s = 0.0  # time spent inside collectives, for benchmarks
        self.collective_calls = 0

    # --- Backend protocol ---------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> RankCache:
        # A ring starts as zeros (its unwritten slots are masked out; zeros cannot turn into NaN).
        empty = lambda slots: np.zeros((batch_size, self._kv_heads, slots, self._head_dim), dtype=self._kv_dtype)
        return RankCache([empty(n) for n in self._ring_slots], [empty(n) for n in self._ring_slots], batch_size, 0)

    def forward(self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: RankCache):
        input_ids_BS = np.ascontiguousarray(input_ids_BS, dtype=np.int64)
        position_ids_BS = np.ascontiguousarray(position_ids_BS, dtype=np.int64)
        B, S = input_ids_BS.shape
        if cache.past_len + S > self.max_positions:
            raise MoecError(f"{cache.past_len + S} positions exceed the {self.max_positions} that {self.path} was exported for")
        if input_ids_BS.min() < 0 or input_ids_BS.max() >= self.vocab_size:
            raise MoecError(f"{bad_token_ids_message(input_ids_BS.tolist(), position_ids_BS.tolist(), self.vocab_size)}, for {self.path}")
        feeds = {contract.INPUT_IDS: input_ids_BS, contract.POSITION_IDS: position_ids_BS}
        for i in range(self.num_layers):
            feeds[contract.past_key(i)] = cache.keys[i]
            feeds[contract.past_value(i)] = cache.values[i]
        outs = self.graph.run(feeds, self._all_reduce)
        logits = outs[contract.LOGITS].astype(np.float32, copy=False)
        new = RankCache([outs[contract.present_key(i)] for i in range(self.num_layers)],
                        [outs[contract.present_value(i)] for i in range(self.num_layers)], B, cache.past_len + S)
        return logits, new

    def share_tokens(self, next_B: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(next_B, dtype=np.int64).copy())
        self._collective("the token broadcast from rank 0", lambda: self.dist.broadcast(t, src=0))
        return t.numpy()

    def describe(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"backend": "ort-parallel", "onnxruntime": ort.__version__, "provider": "CPUExecutionProvider",
                "world_size": str(self.world_size), "rank": str(self.rank), "model": str(self.folder),
                "collectives_per_step": str(self.graph.num_collectives), "segments": str(len(self.graph.sessions)),
                "process_group": self.dist.get_backend()}

    # --- collectives ---------------------------------------------------------------------------
    def _all_reduce(self, c: Collective, x: np.ndarray) -> np.ndarray:
        import torch

        t = torch.from_numpy(np.ascontiguousarray(x).copy())
        group = None if c.group is None or len(c.group) == self.world_size else self.groups[tuple(c.group)]
        self._collective(f"the all-reduce {c.name!r}", lambda: self.dist.all_reduce(t, group=group))
        return t.numpy()

    def _collective(self, what: str, call) -> None:
        t0 = time.perf_counter()
        try:
            call()
        except Exception as e:  # gloo raises RuntimeError / DistBackendError subclasses
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankLost(f"rank {self.rank}: {what} failed ({first}); another rank has stopped or timed out, "
                           "so this rank stops too") from e
        self.collective_s += time.perf_counter() - t0
        self.collective_calls += 1


def _fixed_slots(value_info) -> int:
    """The slot axis of a past input when the graph fixes it (a ring cache), else 0."""
    dim = value_info.type.tensor_type.shape.dim[2]
    return int(dim.dim_value) if dim.HasField("dim_value") else 0


def make_groups(manifest: dict) -> dict:
    """Every tp group's process group, created in the same order on every rank (new_group is
    collective); the world group is the default one."""
    import torch.distributed as dist

    groups = {}
    world = int(manifest["world_size"])
    for g in manifest["plan"]["mapping"]["tp_groups"]:
        if 1 < len(g) < world:
            groups[tuple(g)] = dist.new_group(ranks=list(g))
    return groups
