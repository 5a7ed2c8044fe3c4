"""The build stage's configuration and result."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moec.common.errors import MoecError

HARDWARE_COMPAT = ("none", "ampere+", "same-cc")


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    archs: tuple[str, ...] = ("sm89",)
    backend: str | None = None  # "tensorrt" | "tensorrt-rtx"; None: whichever imports, full TensorRT first
    # trtexec-style profile overrides, one per tensor: "name:1x1,1x128,4x512" (min, opt, max).
    # "prefill:name:..." / "decode:name:..." adjust one of the two default profiles; specs
    # without a prefix build one custom profile instead (see "Profiles" below).
    shapes: tuple[str, ...] = ()
    # Profile limits; None takes them from the sidecar (the export's max_batch and max_positions):
    # a prompt (one prefill step) up to half the positions, decode up to the last position.
    max_batch: int | None = None
    max_new_tokens: int | None = None
    max_past: int | None = None
    # The engine's context (prompt + generated); None: the smaller of the export's positions and
    # moec.compiler.plan.DEFAULT_CONTEXT, since no GPU holds the KV cache of Llama 4's full 10 M.
    max_seq: int | None = None
    # Where TensorRT tunes each profile: prefill at a typical prompt length (capped at
    # max_new_tokens); decode at this batch (None: half of max_batch, since a server's decode batch
    # moves between 1 and the max as requests come and go).
    prefill_opt_tokens: int = 128
    decode_opt_batch: int | None = None
    timing_cache: Path | None = None
    opt_level: int = 3
    hardware_compat: str = "none"  # "none" | "ampere+" | "same-cc"
    version_compatible: bool = False
    workspace_mib: int | None = None
    progress: bool = True
    # Build the model as a chain of engines of this many layers each (compiler/build/chain.py), so
    # the build's host memory is one range's; "all": one engine; None: auto, one engine where its
    # build fits the host's memory, else a chain (compiler/build/split.py).
    layers_per_engine: int | str | None = None
    # Why one engine or a chain (compiler/build/split.py's EngineSplit.to_json()), recorded as the
    # manifest's / chain.json's engine_split; None: not recorded.
    engine_split: dict | None = None

    def __post_init__(self):
        if not self.archs:
            raise MoecError("no GPU arch given: pass --arch, e.g. --arch sm89")
        if not 0 <= self.opt_level <= 5:
            raise MoecError(f"--opt-level {self.opt_level} is out of range: use 0 to 5")
        if self.hardware_compat not in HARDWARE_COMPAT:
            raise MoecError(f"--hardware-compat {self.hardware_compat!r}: use one of {', '.join(HARDWARE_COMPAT)}")
        if self.prefill_opt_tokens < 1 or (self.decode_opt_batch is not None and self.decode_opt_batch < 1):
            raise MoecError("prefill_opt_tokens and decode_opt_batch must be at least 1")
        from moec.compiler.build.split import check_layers_per_engine

        check_layers_per_engine(self.layers_per_engine)
        if self.workspace_mib is not None and self.workspace_mib <= 0:
            raise MoecError(f"--workspace {self.workspace_mib} MiB: give a positive size")
        # None means "from the export"; 0 is not a way to say that, so it is refused, not defaulted.
        for option, value in (("--max-batch", self.max_batch), ("--max-new-tokens", self.max_new_tokens),
                              ("--max-past", self.max_past), ("--max-seq", self.max_seq)):
            if value is not None and value < 1:
                raise MoecError(f"{option} {value}: give at least 1 (or leave it out for the export's default)")
            from moec.compiler.dims import check_dim

            check_dim(option, value)


@dataclasses.dataclass
class BuildResult:
    out_dir: Path
    manifest: dict[str, Any]
    engines: dict[str, Path]  # arch -> engine file
    warnings: list[str]
    seconds: float
