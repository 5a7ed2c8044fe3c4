"""Starting the ranks of a partition folder: ``moec run OUT_DIR`` spawns them itself (one process
per rank, torch.multiprocessing with the spawn method), or each rank is a process ``torchrun``
started (``torchrun --nproc-per-node N $(which moec) run OUT_DIR ...``; RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT come from its environment).

Every rank runs the shared generation loop (runtime/generate.py) on its ``OrtRankBackend``;
rank 0 samples and broadcasts, and only rank 0's result is returned (and printed).

No hang: the process group has a timeout (``timeout_s``), a collective whose peer died fails at
once on gloo (connection closed) or at the timeout; ``run_parallel`` also waits at most
``timeout_s`` beyond the ranks' own limit, then stops them. A failed rank is reported by rank and
with its own error line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from moec.common.errors import BAD_JSON, MoecError

DEFAULT_TIMEOUT_S = 120.0


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How to start the ranks; ``moec run`` fills it."""

    timeout_s: float = DEFAULT_TIMEOUT_S  # process-group timeout: a silent peer fails a collective after this
    intra_op_threads: int | None = 1  # ORT threads per rank (1: ranks do not compete for cores)

    @classmethod
    def with_timeout(cls, timeout_s: float | None) -> LaunchConfig:
        """The defaults, with ``timeout_s`` when given (``--rank-timeout``; None keeps the default)."""
        return cls() if timeout_s is None else cls(timeout_s=timeout_s)


def is_engine_set(folder: Path) -> bool:
    """A folder of per-rank TensorRT engines (``moec build`` of a partition folder), not rank graphs."""
    path = Path(folder) / "parallel.json"
    try:
        return json.loads(path.read_text()).get("format") == _engines_format()
    except (OSError, AttributeError, *BAD_JSON):
        return False  # not an engine set; the partition reader names what is wrong with the file


def _engines_format() -> str:
    from moec.common import contract

    return contract.PARALLEL_ENGINES_FORMAT


def _check_set(folder: Path, world_size: int | None, hash_files: bool) -> dict:
    """The rank set's manifest after its checks: rank graphs (ONNX Runtime, gloo) or per-rank
    engines (TensorRT, NCCL: refused at once on a host without CUDA GPUs and NCCL)."""
    from moec.runtime.parallel.rankset import check_rank_set

    if is_engine_set(folder):
        from moec.compiler.build.parallel import load_rank_engines
        from moec.runtime.parallel.trt_rank import check_nccl_host

        check_nccl_host(folder)
        load_rank_engines(folder, world_size)
        return json.loads((Path(folder) / "parallel.json").read_text())
    return check_rank_set(folder, world_size, hash_files=hash_files)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_rank(folder: Path, rank: int, world_size: int, init_method: str, prompt_ids, gen_config,
             launch: LaunchConfig, wrap_backend=None, job=None) -> dict:
    """Rank ``rank``'s whole job: join the process group, open its graph, generate (or run
    ``job(backend) -> dict`` instead, e.g. a benchmark), leave. ``wrap_backend`` (tests) may wrap
    the backend, e.g. to stop a rank mid-generation."""
    import torch.distributed as dist

    from moec.runtime.generate import generate
    from moec.runtime.parallel.ort_rank import OrtRankBackend, make_groups
    from moec.runtime.parallel.rankset import check_rank_set

    engines = is_engine_set(folder)
    manifest = None if engines else check_rank_set(folder, world_size, hash_files=False)
    if launch.intra_op_threads:
        import torch

        torch.set_num_threads(launch.intra_op_threads)
    if engines:
        import torch

        # One GPU per rank on this host (LOCAL_RANK under torchrun), before NCCL starts.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group("nccl" if engines else "gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=launch.timeout_s))
    try:
        if engines:
            from moec.runtime.parallel.trt_rank import TrtRankBackend

            backend = TrtRankBackend.open(folder, rank, world_size)
        else:
            backend = OrtRankBackend(folder, rank, world_size, make_groups(manifest), launch.intra_op_threads)
        if wrap_backend is not None:
            backend = wrap_backend(backend)
        if job is not None:
            return {**job(backend), "describe": backend.describe(), "collective_s": backend.collective_s,
                    "collective_calls": backend.collective_calls}
        result = generate(backend, prompt_ids, gen_config)
        out = {**result.to_dict(), "describe": backend.describe(),
               "collective_s": backend.collective_s, "collective_calls": backend.collective_calls}
        return out
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peer died may fail to tear down; the error that matters is raised above
            pass


def _spawned(rank: int, folder: str, world_size: int, init_method: str, prompt_ids, gen_config, launch, result_dir: str,
             job=None):
    """A spawned rank: its result (rank 0) or its error line go to files the parent reads."""
    from moec.common.errors import MoecError as _MoecError

    os.environ.setdefault("OMP_NUM_THREADS", str(launch.intra_op_threads or 1))
    try:
        out = run_rank(Path(folder), rank, world_size, init_method, prompt_ids, gen_config, launch, job=job)
    except _MoecError as e:
        Path(result_dir, f"rank{rank}.error").write_text(str(e))
        raise SystemExit(2)
    if rank == 0:
        Path(result_dir, "rank0.json").write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_job(bench_config, backend) -> dict:
    """``moec bench`` on one rank (a top-level function: spawn pickles it by name)."""
    from moec.runtime.bench import run_bench

    return {"metrics": run_bench(backend, bench_config)}


def bench_parallel(folder: str | os.PathLike, bench_config, launch: LaunchConfig = LaunchConfig()) -> dict:
    """``run_bench`` on every rank of ``folder`` at once; rank 0's metrics and description."""
    import functools

    return run_parallel(folder, None, None, launch, job=functools.partial(bench_job, bench_config))


def run_parallel(folder: str | os.PathLike, prompt_ids, gen_config, launch: LaunchConfig = LaunchConfig(), job=None) -> dict:
    """Generate with every rank of ``folder`` (or run ``job(backend)`` on each); rank 0's result
    dict (under torchrun: this rank's, None on ranks other than 0)."""
    folder = Path(folder)
    if under_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _check_set(folder, world, hash_files=rank == 0)
        out = run_rank(folder, rank, world, "env://", prompt_ids, gen_config, launch, job=job)
        return out if rank == 0 else None
    manifest = _check_set(folder, None, hash_files=True)
    world = int(manifest["world_size"])
    import torch.multiprocessing as mp

    result_dir = tempfile.mkdtemp(prefix="moec-ranks-")
    try:
        ctx = mp.start_processes(
            _spawned, args=(str(folder), world, f"tcp://127.0.0.1:{_free_port()}", prompt_ids, gen_config, launch, result_dir, job),
            nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + launch.timeout_s * 2 + 60
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.terminate()
                    raise MoecError(f"the {world} ranks of {folder} did not finish within {deadline:.0f} s; stopped them")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            errors = sorted(Path(result_dir).glob("rank*.error"))
            if errors:
                raise MoecError(errors[0].read_text()) from None
            raise MoecError(f"rank {e.error_index} of {folder} failed: {str(e).strip().splitlines()[-1]}") from None
        result = Path(result_dir, "rank0.json")
        if not result.is_file():
            raise MoecError(f"rank 0 of {folder} finished without a result")
        return json.loads(result.read_text())
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
