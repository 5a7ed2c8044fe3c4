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
