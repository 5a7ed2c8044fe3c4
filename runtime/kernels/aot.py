"""Ahead-of-time compilation of moec's MoE kernels for a target GPU, on a machine without one.

The Triton kernels are JIT-compiled on the GPU at their first call, so a launch configuration that
does not fit a card (too much shared memory for an L4, register spills) would otherwise surface
only on that card, in production. Triton can compile for any NVIDIA target without a driver (its
wheel ships ptxas and cuobjdump), so this module compiles exactly what a call would launch and
reads back what each kernel needs:

1. ``launches_for``: the real host code (moe_triton.grouped_experts_triton) runs on meta tensors
   of the requested shapes with launches recorded instead of run, so the kernels, grids and
   argument values (which Triton specializes on: a stride of 1, 16-divisible sizes) are the ones
   of a real call.
2. ``compile_launch``: each recorded launch is bound and specialized the way Triton's JIT would do
   it on the device, then compiled for the target (PTX and cubin).
3. ``check_fits``: the shared memory, registers and local memory (spills) read from the cubin are
   checked against the target's limits.

Why Triton's private binder (``create_function_from_signature``/``_pack_args``): the public
``JITFunction.warmup`` compiles without launching but asks the active driver for the target, which
a machine without a GPU does not have. The binder is what warmup itself uses, so the
specialization matches a JIT compile on the device. A Triton without it gets a MoecError naming
the version (verified with Triton 3.6, the device image's, and 3.9).

The interpreter (TRITON_INTERPRET=1, the CPU tests) replaces kernels with objects that cannot be
compiled: run this in a process where it is unset (the tests use a subprocess).
"""

from __future__ import annotations

import itertools
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moec.common.errors import MoecError

# Limits per compute capability (CUDA C++ Programming Guide, "Technical Specifications per Compute
# Capability"): the most shared memory one block can opt in to, and the register file of an SM.
# The cards moec targets: sm80 A100, sm86 A10/A40, sm87 Jetson Orin, sm89 L4/L40S, sm90 H100/H200.
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 64 * 1024
MAX_REGISTERS_PER_THREAD = 255
ARCHS = tuple(sorted(MAX_SHARED_BYTES))


def parse_arch(arch: str | int) -> int:
    """``"sm89"``, ``"89"`` or ``89`` -> 89, for the archs whose limits are known."""
    text = str(arch).lower().removeprefix("sm").removeprefix("_")
    if not text.isdigit() or int(text) not in MAX_SHARED_BYTES:
        known = ", ".join(f"sm{a}" for a in ARCHS)
        raise MoecError(f"unknown kernel target arch {arch!r}: moec's MoE kernels are checked for {known}")
    return int(text)


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel needs from an SM, read from its cubin."""

    kernel: str
    arch: int
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic (Triton's metadata) plus static (the cubin's SHARED)
    registers: int  # per thread
    local_bytes: int  # per-thread local memory: register spills or a stack
    async_copies: int  # cp.async / TMA loads in the TTGIR: 0 means the K loop is not pipelined
    constexprs: dict

    def to_json(self) -> dict:
        d = asdict(self)
        d["grid"] = list(self.grid)
        return d


def launches_for(
    E: int, H: int, I: int, T: int, K: int = 1, dtype: torch.dtype = torch.bfloat16,
    score_on_input: bool = True, config=None, device_name: str | None = None, ids_dtype: torch.dtype = torch.int32,
):
    """The launches one ``grouped_experts_triton`` call of these shapes makes (see module doc).

    ``device_name`` picks that device's tuned table entries (e.g. "NVIDIA H100 80GB HBM3"), as a
    call on that device would; ``config`` overrides the table."""
    from moec.runtime.kernels import moe_triton

    meta = torch.device("meta")
    hidden_TH = torch.empty(T, H, dtype=dtype, device=meta)
    ids_TK = torch.empty(T, K, dtype=ids_dtype, device=meta)  # int32 from TensorRT, int64 from torch.topk
    scores_TK = torch.empty(T, K, dtype=torch.float32, device=meta)
    w_gate_up_EHI2 = torch.empty(E, H, 2 * I, dtype=dtype, device=meta)
    w_down_EIH = torch.empty(E, I, H, dtype=dtype, device=meta)
    if config is None:
        config = moe_triton.select_config(E, H, I, T, K, device_name)
    with moe_triton.recording_launches() as launches:
        moe_triton.grouped_experts_triton(
            hidden_TH, ids_TK, scores_TK, w_gate_up_EHI2, w_down_EIH, score_on_input, config=config
        )
    return list(launches)


class _TensorArg:
    """A tensor argument as Triton's specializer sees it: its dtype and its address modulo 16.
    Allocations are at least 256-byte aligned, so a meta tensor's byte offset into its storage
    gives the alignment a real call would have (a row of a [3, G] table starts G * 4 bytes in)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._byte_offset = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._byte_offset


def _specialize(kernel, target, args, kwargs):
    import triton
    from triton.compiler import ASTSource, make_backend

    try:
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    except (ImportError, AttributeError, TypeError) as exc:
        raise MoecError(
            f"ahead-of-time kernel compilation needs Triton's JIT binder, which Triton {triton.__version__} does "
            f"not offer as moec expects ({exc}); it was verified with Triton 3.6 and 3.9"
        ) from exc
    return ASTSource(kernel, signature, constexprs, attrs), options, constexprs


def _resource_usage(cubin: bytes) -> dict[str, int]:
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise MoecError(f"cuobjdump printed no resource usage for the compiled kernel:\n{out}")
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"registers": reg, "static_shared": shared, "local_bytes": max(stack, local)}


def compile_launch(launch, arch: int) -> tuple[KernelResources, object]:
    """Compile one recorded launch for ``sm<arch>``; returns its resources and Triton's compiled
    kernel (``.asm`` holds "ptx" and "cubin", ``.metadata.name`` the entry point)."""
    import triton
    from triton.backends.compiler import GPUTarget

    kernel = launch.kernel
    if not hasattr(kernel, "params"):
        raise MoecError(
            "the MoE kernels were imported under TRITON_INTERPRET=1, which replaces them with interpreter "
            "objects; compile them ahead of time in a process without it"
        )
    target = GPUTarget("cuda", arch, 32)
    args = tuple(_TensorArg(a) if isinstance(a, torch.Tensor) else a for a in launch.args)
    src, options, constexprs = _specialize(kernel, target, args, dict(launch.kwargs))
    compiled = triton.compile(src, target=target, options=options.__dict__)
    usage = _resource_usage(compiled.asm["cubin"])
    ttgir = compiled.asm.get("ttgir", "")
    names = kernel.arg_names
    resources = KernelResources(
        kernel=compiled.metadata.name,
        arch=arch,
        grid=launch.grid,
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        shared_bytes=compiled.metadata.shared + usage["static_shared"],
        registers=usage["registers"],
        local_bytes=usage["local_bytes"],
        async_copies=ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy_global_to_local"),
        constexprs={names[path[0]]: _plain(v) for path, v in constexprs.items()},
    )
    return resources, compiled


def _plain(value):
    return value if isinstance(value, (bool, int, float, str)) or value is None else str(value)


def check_fits(res: KernelResources) -> list[str]:
    """What keeps this kernel from launching on its arch (empty: it fits). Local memory is
    reported as a problem too: a spilling inner loop is slow enough to count as a failed config."""
    problems = []
    limit = MAX_SHARED_BYTES[res.arch]
    if res.shared_bytes > limit:
        problems.append(f"{res.kernel} needs {res.shared_bytes} B of shared memory; sm{res.arch} allows {limit} B per block")
    threads = res.num_warps * 32
    if res.registers * threads > REGISTERS_PER_SM:
        problems.append(
            f"{res.kernel} needs {res.registers} registers x {threads} threads, more than sm{res.arch}'s {REGISTERS_PER_SM}"
        )
    if res.local_bytes:
        problems.append(f"{res.kernel} uses {res.local_bytes} B of local memory per thread (register spills) on sm{res.arch}")
    return problems


def survey(
    archs, points, dtypes=(torch.bfloat16,), H: int = 5120, I: int = 8192, score_on_input: bool = True,
    config=None, device_name: str | None = None, ids_dtypes=(torch.int32, torch.int64),
) -> list[dict]:
    """Compile every launch of every (E, T, k) point for every arch, dtype and expert-id dtype;
    one row per distinct compiled kernel with its resources and the problems ``check_fits``
    finds. The default shapes are Llama 4's experts (H=5120, I=8192)."""
    rows, seen = [], set()
    for arch in archs:
        arch = parse_arch(arch)
        for dtype, ids_dtype, (E, T, K) in itertools.product(dtypes, ids_dtypes, points):
            for launch in launches_for(E, H, I, T, K, dtype, score_on_input, config, device_name, ids_dtype):
                res, compiled = compile_launch(launch, arch)
                if compiled.metadata.hash in seen:  # the same binary from another point
                    continue
                seen.add(compiled.metadata.hash)
                rows.append({
                    **res.to_json(), "arch": f"sm{arch}", "dtype": str(dtype).removeprefix("torch."),
                    "ids_dtype": str(ids_dtype).removeprefix("torch."), "E": E, "T": T, "k": K,
                    "problems": check_fits(res),
                })
    return rows
