"""A TensorRT rank's execution context gets the NCCL communicator of torch.distributed's group.

Thin on purpose and NOT tested here: no machine of this project can run a TensorRT engine, and
torch's CPU build has no NCCL (see README's "What is verified where"). The per-rank engines are
built and checked on the CPU (tests/compiler/test_build_parallel.py); this is the one call that
joins them to the ranks on a GPU host: after ``torch.distributed.init_process_group("nccl")``,
each rank deserializes its own engine (``load_rank_engines``), creates its context and calls
``attach_communicator(context)`` before its first ``execute_async_v3``.
"""

from __future__ import annotations

from moec.common.errors import MoecError


def nccl_comm_pointer(group=None) -> int:
    """The raw ncclComm_t of ``group`` (default: the world) as an int, from torch's NCCL backend."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_backend(group) != "nccl":
        raise MoecError("the TensorRT ranks need torch.distributed initialised with the nccl backend "
                        "(init_process_group('nccl')) before their contexts are created")
    backend = dist.distributed_c10d._get_default_group() if group is None else group
    nccl = backend._get_backend(torch.device("cuda"))
    comm_ptr = getattr(nccl, "_comm_ptr", None)
    if comm_ptr is None:
        raise MoecError(f"this torch ({torch.__version__}) does not expose its NCCL communicator (_comm_ptr); "
                        "use torch >= 2.3")
    return int(comm_ptr())


def attach_communicator(context, group=None) -> None:
    """``IExecutionContext.set_communicator`` with the group's NCCL communicator."""
    if not hasattr(context, "set_communicator"):
        raise MoecError("this TensorRT has no IExecutionContext.set_communicator (DistCollective needs TensorRT 11 "
                        "or TensorRT-RTX 1.7+)")
    if not context.set_communicator(nccl_comm_pointer(group)):
        raise MoecError("TensorRT refused the NCCL communicator (set_communicator returned False)")


class TrtRankBackend:
    """One TensorRT rank: the single-engine ``TrtBackend`` on this rank's engine folder, with the
    NCCL communicator attached to its context; tokens shared from rank 0 like the ONNX Runtime
    ranks (``OrtRankBackend.share_tokens``), so the shared generation loop runs unchanged."""

    name = "trt"

    def __init__(self, inner, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size
        self.collective_s = 0.0  # TensorRT's collectives run inside the engine; not timed apart
        self.collective_calls = 0

    @classmethod
    def open(cls, eng_dir, rank: int, world_size: int) -> TrtRankBackend:
        from pathlib import Path

        from moec.compiler.build.parallel import load_rank_engines, rank_dir
        from moec.runtime.trt_backend import TrtBackend

        load_rank_engines(eng_dir, world_size)  # incomplete or mixed sets: named errors
        inner = TrtBackend.from_engine_dir(Path(eng_dir) / rank_dir(rank))
        attach_communicator(inner.context)
        return cls(inner, rank, world_size)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def share_tokens(self, next_B):
        import numpy as np
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(next_B, dtype=np.int64).copy()).to(self.inner.device)
        dist.broadcast(t, src=0)  # NCCL: the tensor lives on this rank's GPU
        return t.cpu().numpy()

    def describe(self) -> dict[str, str]:
        return {**self.inner.describe(), "backend": "trt-parallel", "world_size": str(self.world_size),
                "rank": str(self.rank), "process_group": "nccl"}


def check_nccl_host(eng_dir) -> None:
    """Per-rank engines run only where torch has CUDA GPUs and NCCL: a named error otherwise."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        raise MoecError(f"{eng_dir} holds per-rank TensorRT engines, which run on CUDA GPUs with NCCL; this host's torch "
                        f"{torch.__version__} has {'no CUDA' if not torch.cuda.is_available() else 'no NCCL'}. "
                        "Run the partition folder (compile's onnx/ranks) on ONNX Runtime here instead")
