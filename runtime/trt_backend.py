"""TensorRT runtime backend: run a moec engine directory (manifest.json + one engine per arch).

Two halves, deliberately apart:

* The checks that decide whether an engine may be deserialized here (manifest present, TensorRT
  flavour and version, the local GPU's arch among the engine's targets, the engine file's sha256,
  the plugins it needs) are plain functions over a ``HostTrt`` description of this machine; they
  live in ``moec.runtime.trt_engines``, run, and are tested, without a GPU. Their names are
  importable from here too.
* ``TrtBackend`` itself is thin: deserialize, pick the optimization profile for the step
  (``select_profile``: prefill or decode, from the manifest's ranges), bind torch CUDA tensors,
  set shapes, enqueue on one stream. Sampling, stopping and timing live in the shared generation loop
  (``moec.runtime.generate``), which the CPU backends exercise.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path
from typing import Any

import numpy as np
from moec.common import contract
from moec.common.errors import MoecError
from moec.common.sidecar import read_sidecar_file
from moec.runtime.trt_buffers import other_buffer, view_of
from moec.runtime.trt_engines import (  # noqa: F401 - the engine-folder checks, re-exported
    EngineProfile,
    FLAVOUR_INSTALL_HINT,
    FLAVOUR_MODULES,
    FLAVOUR_PREFERENCE,
    HostTrt,
    MANIFEST_FORMAT,
    TrtFlavour,
    _ARCH_RE,
    _RTX_CC_BITS,
    _count_layers,
    _engine_for_arch,
    _rebuild_hint,
    _version_tuple,
    arch_name,
    check_engine_files,
    engine_problems,
    engine_profiles,
    import_trt,
    load_manifest,
    local_gpu_arch,
    manifest_io_shape,
    manifest_problems,
    max_prompt_tokens,
    parse_arch,
    read_engine_header,
    ring_inputs,
    select_engine,
    select_profile,
)


# --- The backend (needs a GPU) -------------------------------------------------------------------
class TrtKVCache:
    """Past keys/values as flat torch CUDA buffers viewed [B, KVH, P, D].

    Two buffers per tensor ping-pong: a step reads past from one and TensorRT writes present
    (past + new) into the other, so no copy is made. A cache is valid until the next step that
    extends it (the generation loop only moves forward).
    """

    def __init__(self, buffers, views, batch: int, past_len: int):
        self.buffers = buffers  # {name: (buf_a, buf_b)} flat, max-sized
        self.views = views  # {past name: tensor [B, KVH, P, D]}, the current past
        self.batch = batch
        self._past_len = past_len

    @property
    def past_len(self) -> int:
        return self._past_len


class TrtBackend:
    """Runs one engine step per ``forward``: selects the step's optimization profile (switching
    the context only when it changes), binds torch tensors, sets shapes, enqueues, syncs.

    ``__init__`` only wires parts together (an engine, its execution context, a torch device and
    stream), so the binding logic can be exercised with stand-ins on a CPU; ``from_engine_dir``
    is the real entry point.
    """

    name = "trt"

    def __init__(self, engine_dir: Path, manifest: dict[str, Any] | None = None, engine=None, context=None, device=None,
                 stream=None, flavour_name: str = "", flavour_version: str = "", **from_engine_dir_options):
        if manifest is None:
            # TrtBackend("engine_dir") is the call users try first: from_engine_dir's.
            self.__dict__.update(type(self).from_engine_dir(engine_dir, **from_engine_dir_options).__dict__)
            return
        import torch

        self.engine_dir = engine_dir
        self.manifest = manifest
        self.engine = engine
        self.context = context
        self.device = device
        self.stream = stream
        self.flavour_name = flavour_name
        self.flavour_version = flavour_version
        limits = manifest["limits"]
        self.profiles = engine_profiles(manifest)
        if engine.num_optimization_profiles != len(self.profiles):
            raise MoecError(f"{engine_dir}: the engine holds {engine.num_optimization_profiles} optimization profile(s), "
                            f"the manifest lists {len(self.profiles)}: the manifest does not belong to this engine; "
                            "rebuild the directory with `moec build`")
        # A new execution context runs profile 0 until told otherwise; forward switches only when
        # a step needs another one.
        self._active_profile = int(context.active_optimization_profile)
        self.max_batch = limits["max_batch"]
        self.max_new_tokens = limits["max_new_tokens"]
        # The generation loop feeds a longer prompt in chunks of this many tokens (a default
        # prefill profile takes half the positions; the second chunk runs with the first as past).
        self.max_new_tokens_per_step = max(p.ranges[contract.INPUT_IDS][1][1] for p in self.profiles)
        self._rings = ring_inputs(manifest)
        self.max_past = limits["max_past"]
        # The loop checks prompt + generated <= max_positions; a step's past is at most max_past
        # (the decode profile's).
        self.max_positions = min(limits["max_positions"], self.max_past + 1)
        if not manifest.get("sidecar"):
            raise MoecError(f"{engine_dir}: its manifest names no moec metadata file; rebuild with `moec build`")
        sidecar = read_sidecar_file(engine_dir / manifest["sidecar"])
        self.eos_token_ids = _eos_ids(sidecar)
        self.image_token_id = sidecar.get("image_token_id")  # an engine of a graph exported with --vision
        self.num_layers = int(sidecar.get("num_layers") or _count_layers(manifest))
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self._vocab = manifest_io_shape(manifest, contract.LOGITS)[-1]
        self._logits = torch.empty(self.max_batch * self.max_new_tokens * self._vocab,
                                   dtype=self._dtypes[contract.LOGITS], device=self.device)

    @classmethod
    def from_engine_dir(cls, path: str | Path, flavour: str | None = None) -> TrtBackend:
        import torch

        path = Path(path)
        manifest = load_manifest(path)
        # The integrity checks need no GPU and no TensorRT, so a tampered or mismatched directory is
        # reported as such everywhere: with a GPU, the engine for it; without, every engine.
        arch = local_gpu_arch()
        entry = _engine_for_arch(manifest, arch) if arch else None
        check_engine_files(manifest, path, [entry] if entry else None)
        trt_flavour = import_trt(flavour or manifest["trt"]["flavour"])
        _register_plugins(manifest, trt_flavour)
        engine_path = select_engine(manifest, path, HostTrt.detect(trt_flavour), check_integrity=False)
        trt = trt_flavour.trt
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if manifest.get("build_options", {}).get("version_compatible"):
            # A version-compatible engine carries its own lean runtime, which TensorRT only loads
            # when host code is allowed; the manifest's sha256 check has vouched for the file.
            runtime.engine_host_code_allowed = True
        blob = engine_path.read_bytes()
        _check_validity(trt, runtime, blob, engine_path)
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise MoecError(f"{engine_path}: {trt_flavour.name} could not deserialize the engine (see its log above); rebuild it")
        device = torch.device("cuda", torch.cuda.current_device())
        backend = cls(path, manifest, engine, engine.create_execution_context(), device, torch.cuda.Stream(device),
                      trt_flavour.name, trt_flavour.version)
        backend._keep = (runtime, logger)  # the engine must not outlive its runtime
        return backend

    def init_cache(self, batch_size: int) -> TrtKVCache:
        import torch

        if batch_size > self.max_batch:
            raise MoecError(f"batch {batch_size} exceeds the engine's profile max batch {self.max_batch}: "
                            "rebuild with a larger --max-batch (or --shapes)")
        buffers, views = {}, {}
        for layer in range(self.num_layers):
            for past, present in ((contract.past_key(layer), contract.present_key(layer)),
                                  (contract.past_value(layer), contract.present_value(layer))):
                _, kvh, slots, d = manifest_io_shape(self.manifest, past)
                if past in self._rings:
                    # A chunked layer's ring: fixed slots, zeros until written (the graph masks
                    # unwritten slots, but NaN in uninitialised memory would survive a mask).
                    n = self.max_batch * kvh * slots * d
                    a = torch.zeros(n, dtype=self._dtypes[past], device=self.device)
                    b = torch.empty(n, dtype=self._dtypes[past], device=self.device)
                    buffers[past] = (a, b)
                    views[past] = a[: batch_size * kvh * slots * d].view(batch_size, kvh, slots, d)
                    continue
                # Room for the longest present any profile allows (past + new tokens).
                length = max(p.ranges[past][1][2] + p.ranges[contract.INPUT_IDS][1][1] for p in self.profiles)
                n = self.max_batch * kvh * length * d
                a = torch.empty(n, dtype=self._dtypes[past], device=self.device)
                b = torch.empty(n, dtype=self._dtypes[past], device=self.device)
                buffers[past] = (a, b)
                views[past] = a[:0].view(batch_size, kvh, 0, d)
        return TrtKVCache(buffers, views, batch_size, 0)

    def forward(self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: TrtKVCache,
                image_features_NH: np.ndarray | None = None):
        """``image_features_NH``: as OrtBackend.forward's (an engine built from a graph exported with --vision)."""
        import torch

        batch, new = input_ids_BS.shape
        if batch != cache.batch:
            raise MoecError(f"input batch {batch} does not match the cache's batch {cache.batch}")
        if position_ids_BS.shape != input_ids_BS.shape:
            raise MoecError(f"position_ids shape {list(position_ids_BS.shape)} differs from input_ids shape "
                            f"{list(input_ids_BS.shape)}: give one position per token")
        shapes = {contract.INPUT_IDS: (batch, new), contract.POSITION_IDS: (batch, new)}
        shapes.update((past, tuple(view.shape)) for past, view in cache.views.items())
        takes_images = contract.IMAGE_FEATURES in self._dtypes
        if image_features_NH is not None and not takes_images:
            raise MoecError(f"{self.engine_dir} was built from a text-only export; export with --vision for images")
        if takes_images:
            width = manifest_io_shape(self.manifest, contract.IMAGE_FEATURES)[-1]
            rows_NH = np.zeros((0, width)) if image_features_NH is None else np.asarray(image_features_NH)
            shapes[contract.IMAGE_FEATURES] = tuple(rows_NH.shape)
        profile = select_profile(self.profiles, shapes, str(self.engine_dir))
        self._use_profile(profile)
        ctx = self.context
        # Copies and the engine run on one stream, so they are ordered without extra syncs.
        on_stream = torch.cuda.stream(self.stream) if self.device.type == "cuda" else contextlib.nullcontext()
        with on_stream:
            ids = torch.from_numpy(np.ascontiguousarray(input_ids_BS)).to(self.device, self._dtypes[contract.INPUT_IDS])
            pos = torch.from_numpy(np.ascontiguousarray(position_ids_BS)).to(self.device, self._dtypes[contract.POSITION_IDS])
        for name, t in ((contract.INPUT_IDS, ids), (contract.POSITION_IDS, pos)):
            self._set_input_shape(name, tuple(t.shape), profile)
            ctx.set_tensor_address(name, t.data_ptr())
        if takes_images:
            dtype = self._dtypes[contract.IMAGE_FEATURES]
            with on_stream:
                # An empty tensor still needs a valid address: one element backs it.
                rows = torch.from_numpy(np.ascontiguousarray(rows_NH)).to(self.device, dtype) if rows_NH.size else \
                    torch.zeros(1, dtype=dtype, device=self.device)
            self._set_input_shape(contract.IMAGE_FEATURES, tuple(rows_NH.shape), profile)
            ctx.set_tensor_address(contract.IMAGE_FEATURES, rows.data_ptr())
        logits = view_of(self._logits, (batch, new, self._vocab))
        ctx.set_tensor_address(contract.LOGITS, logits.data_ptr())
        new_views = {}
        for layer in range(self.num_layers):
            for past, present in ((contract.past_key(layer), contract.present_key(layer)),
                                  (contract.past_value(layer), contract.present_value(layer))):
                view = cache.views[past]
                a, b = cache.buffers[past]
                # Present goes into whichever buffer the past does not occupy.
                target = other_buffer((a, b), view)
                _, kvh, p, d = view.shape
                slots = p if past in self._rings else p + new  # a ring keeps its size
                out = view_of(target, (batch, kvh, slots, d))
                self._set_input_shape(past, tuple(view.shape), profile)
                ctx.set_tensor_address(past, view.data_ptr() if view.numel() else a.data_ptr())
                ctx.set_tensor_address(present, out.data_ptr())
                new_views[past] = out
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise MoecError(f"{self.engine_dir}: TensorRT failed to enqueue the step (see its log above)")
        self.stream.synchronize()
        logits_BSV = logits.float().cpu().numpy()
        return logits_BSV, TrtKVCache(cache.buffers, new_views, batch, cache.past_len + new)

    def _use_profile(self, profile: EngineProfile) -> None:
        if profile.index == self._active_profile:
            return
        # On the step's stream, so the switch is ordered with the input copies and the enqueue.
        if not self.context.set_optimization_profile_async(profile.index, self.stream.cuda_stream):
            raise MoecError(f"{self.engine_dir}: TensorRT refused to switch to optimization profile {profile.name} "
                            f"(#{profile.index}); the manifest does not match the engine: rebuild it with `moec build`")
        self._active_profile = profile.index

    def _set_input_shape(self, name: str, shape: tuple[int, ...], profile: EngineProfile) -> None:
        if not self.context.set_input_shape(name, shape):
            lo, hi = profile.ranges.get(name, ((), ()))
            raise MoecError(f"{self.engine_dir}: TensorRT refused input {name} shape {list(shape)} in profile "
                            f"{profile.name} (#{profile.index}), which the manifest records as min {list(lo)} max "
                            f"{list(hi)}: the manifest does not match the engine; rebuild it with `moec build`")

    def describe(self) -> dict[str, str]:
        import torch

        on_gpu = self.device.type == "cuda"
        return {
            "backend": "trt",
            "device": torch.cuda.get_device_name(self.device) if on_gpu else str(self.device),
            "arch": (local_gpu_arch() or "") if on_gpu else "",
            "trt_flavour": self.flavour_name,
            "trt_version": self.flavour_version,
            "torch_version": torch.__version__,
            "cuda_version": str(torch.version.cuda),
        }


def _check_validity(trt, runtime, blob: bytes, engine_path: Path) -> None:
    """TensorRT's own header check (IRuntime.get_engine_validity, TensorRT-RTX 1.1+ and recent
    TensorRT), after the manifest's: it also knows driver and CUDA runtime requirements."""
    if not hasattr(runtime, "get_engine_validity"):
        return
    validity, diagnostics = runtime.get_engine_validity(blob)
    if validity != trt.EngineValidity.INVALID:
        return
    reasons = [name.lower() for name, flag in trt.EngineInvalidityDiagnostics.__members__.items()
               if int(diagnostics) & int(flag)] or [f"diagnostics {int(diagnostics):#x}"]
    raise MoecError(f"{engine_path}: TensorRT reports the engine cannot run here ({', '.join(reasons)}): "
                    "update the driver if it says old_cuda_driver, else rebuild on this host with `moec build`")


def _eos_ids(sidecar: dict[str, Any]) -> tuple[int, ...]:
    for source in (sidecar.get("generation", {}), sidecar.get("model_config", {})):
        for key in ("eos_token_ids", "eos_token_id"):
            value = source.get(key)
            if value is not None:
                return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)
    return ()


def _torch_dtype(trt_dtype) -> Any:
    import torch

    name = str(trt_dtype).rsplit(".", 1)[-1].upper()
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "INT8": torch.int8, "BOOL": torch.bool, "UINT8": torch.uint8}
    if name not in table:
        raise MoecError(f"engine I/O dtype {trt_dtype} is not supported by moec's TensorRT backend")
    return table[name]


def _register_plugins(manifest: dict[str, Any], flavour: TrtFlavour) -> None:
    """Register moec's own plugin when the engine needs it; where the module cannot load,
    select_engine reports the plugin as missing."""
    if any(p["name"] == contract.PLUGIN_NAME for p in manifest.get("plugins", [])):
        try:
            module = importlib.import_module("moec.runtime.trt_plugin")
        except ImportError:
            return
        module.register_plugin(flavour.trt)
