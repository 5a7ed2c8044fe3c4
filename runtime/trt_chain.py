"""TensorRT backend for a layer-chain folder (``moec build --layers-per-engine N``): each step runs
the ranges' engines in order through ``moec.runtime.layer_chain.run_chain``, the chaining logic
the ONNX Runtime path runs and tests on the CPU.

Two halves, as in ``moec.runtime.trt_backend``:

* ``TrtChainBackend`` holds the logic a step needs (which optimization profile, from the ranges'
  manifests merged; the KV cache as torch tensors per layer; the feeds; the presents that become
  the next cache) and calls one ``runner`` per range with {input name: tensor}.
* ``EngineRunner`` is the thin part that needs a GPU: set the profile and input shapes, bind
  addresses (the outputs into the tensors the backend hands it, checked against the shapes
  TensorRT infers), enqueue, sync. Tests put a runner of their own at this seam (the range's ONNX
  graph on ONNX Runtime, under the engine's I/O names).

A step allocates no output memory, as in ``TrtBackend`` (``moec.runtime.trt_buffers``): logits
and the residual stream between ranges are views of buffers allocated once at the profiles'
largest shapes, and each layer's present ping-pongs between two such buffers with its past.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from moec.common import contract
from moec.common.errors import MoecError
from moec.runtime.layer_chain import run_chain
from moec.runtime.trt_buffers import flat_buffer, other_buffer, view_of
from moec.runtime.trt_engines import EngineProfile, load_manifest, ring_inputs, select_profile


class ChainCache:
    """Past keys/values, one torch tensor per name ([B, KVH, P, D]; a ring has fixed slots), each a
    view of one of its two ``buffers``. Valid until the next step that extends it (the generation
    loop only moves forward)."""

    def __init__(self, pasts: dict[str, Any], batch: int, past_len: int, buffers: dict[str, tuple] | None = None):
        self.pasts = pasts
        self.batch = batch
        self.past_len = past_len
        self.buffers = buffers or {}


def merged_profiles(manifests: list[dict[str, Any]]) -> list[EngineProfile]:
    """The chain's profiles: every range is built with the same profiles (same names and
    indices), each range naming its own inputs; a step's profile is one index for all."""
    first = [(p["name"], p["index"]) for p in manifests[0]["profiles"]]
    ranges: list[dict] = [{} for _ in first]
    for m in manifests:
        if [(p["name"], p["index"]) for p in m["profiles"]] != first:
            raise MoecError("the chain's engines were built with different optimization profiles: rebuild the folder "
                            "with one `moec build --layers-per-engine` run")
        for i, p in enumerate(m["profiles"]):
            ranges[i].update({n: (tuple(r["min"]), tuple(r["max"])) for n, r in p["shapes"].items()})
    return [EngineProfile(name, index, r) for (name, index), r in zip(first, ranges)]


class TrtChainBackend:
    """``moec.runtime.backend.Backend`` over a layer chain; ``runners[k].run(inputs, profile)``
    runs range k's engine and returns its outputs by name."""

    name = "trt"

    def __init__(self, engine_dir: Path, chain: dict[str, Any], manifests: list[dict[str, Any]], runners, device="cpu"):
        import torch

        from moec.common.sidecar import read_sidecar_file
        from moec.runtime.trt_backend import _eos_ids, _torch_dtype

        self.engine_dir = Path(engine_dir)
        self.chain = chain
        self.manifests = manifests
        self.runners = runners
        self.device = torch.device(device)
        self.ranges = [_RangeView(r) for r in chain["ranges"]]
        self.profiles = merged_profiles(manifests)
        self.num_layers = int(chain["num_layers"])
        limits = chain["limits"]
        self.max_batch = limits["max_batch"]
        self.max_new_tokens_per_step = max(p.ranges[contract.INPUT_IDS][1][1] for p in self.profiles)
        self.max_positions = min(limits["max_positions"], limits["max_past"] + 1)
        sidecar = read_sidecar_file(self.engine_dir / chain["sidecar"])
        self.eos_token_ids = _eos_ids(sidecar)
        self.image_token_id = None
        self._io = {t["name"]: t for m in manifests for t in m["io"]["inputs"]}
        self._rings = frozenset(n for m in manifests for n in ring_inputs(m))
        # Logits and the residual stream: [B, S, width], one buffer each at the largest step.
        self._flat = {}
        for t in (t for m in manifests for t in m["io"]["outputs"]):
            if t["name"] == contract.LOGITS or t["name"].startswith("hidden."):
                width = t["shape"][-1]
                self._flat[t["name"]] = (flat_buffer(self.max_batch * self.max_new_tokens_per_step * width,
                                                     _torch_dtype(t["dtype"].upper()), self.device), width)

    @classmethod
    def from_engine_dir(cls, path: str | Path, arch: str | None = None) -> TrtChainBackend:
        """Deserialize every range's engine (a GPU of an arch the chain was built for)."""
        import torch

        from moec.compiler.build.chain import load_layer_chain
        from moec.runtime.trt_backend import import_trt, local_gpu_arch

        path = Path(path)
        local = local_gpu_arch()
        chain, engines = load_layer_chain(path, arch or local)  # integrity first, with or without a GPU
        if local is None:
            raise MoecError(f"{path}: no CUDA GPU is visible here, and TensorRT engines run on one; run the chain on a "
                            f"GPU of {', '.join(chain['archs'])}, or its graph on the CPU with `moec run MODEL.onnx`")
        if (arch or local) not in chain["archs"]:
            raise MoecError(f"{path}: this GPU is {local}; the chain was built for {', '.join(chain['archs'])}: "
                            f"rebuild with `moec build --arch {local} --layers-per-engine {chain['layers_per_engine']}`")
        manifests = [load_manifest(path / r["dir"]) for r in chain["ranges"]]
        flavour = import_trt(chain["trt"]["flavour"])
        trt = flavour.trt
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.Stream(device)
        runners = []
        for engine_path in engines:
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
            if engine is None:
                raise MoecError(f"{engine_path}: {flavour.name} could not deserialize the engine; rebuild the chain")
            runners.append(EngineRunner(engine, engine.create_execution_context(), stream, device, engine_path))
        backend = cls(path, chain, manifests, runners, device)
        backend._keep = (runtime, logger)  # the engines must not outlive their runtime
        return backend

    def init_cache(self, batch_size: int) -> ChainCache:
        from moec.runtime.trt_backend import _torch_dtype

        if batch_size > self.max_batch:
            raise MoecError(f"batch {batch_size} exceeds the chain's profile max batch {self.max_batch}: rebuild with a "
                            "larger --max-batch")
        pasts, buffers = {}, {}
        for layer in range(self.num_layers):
            for name in (contract.past_key(layer), contract.past_value(layer)):
                t = self._io[name]
                _, kvh, slots, d = t["shape"]
                dtype = _torch_dtype(t["dtype"].upper())
                ring = name in self._rings
                # Room for the longest present any profile allows (past + new tokens); a ring's is fixed.
                length = slots if ring else max(p.ranges[name][1][2] + p.ranges[contract.INPUT_IDS][1][1]
                                                for p in self.profiles)
                n = self.max_batch * kvh * length * d
                buffers[name] = (flat_buffer(n, dtype, self.device, zeros=ring), flat_buffer(n, dtype, self.device))
                pasts[name] = view_of(buffers[name][0], (batch_size, kvh, slots if ring else 0, d))
        return ChainCache(pasts, batch_size, 0, buffers)

    def forward(self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: ChainCache,
                image_features_NH: np.ndarray | None = None):
        import torch

        if image_features_NH is not None:
            raise MoecError(f"{self.engine_dir}: layer-range chains are text-only")
        batch, new = input_ids_BS.shape
        if batch != cache.batch or position_ids_BS.shape != input_ids_BS.shape:
            raise MoecError(f"input_ids {list(input_ids_BS.shape)} / position_ids {list(position_ids_BS.shape)} do not "
                            f"match each other or the cache's batch {cache.batch}")
        feeds = {contract.INPUT_IDS: torch.from_numpy(np.ascontiguousarray(input_ids_BS, dtype=np.int64)).to(self.device),
                 contract.POSITION_IDS: torch.from_numpy(np.ascontiguousarray(position_ids_BS, dtype=np.int64)).to(self.device),
                 **cache.pasts}
        shapes = {n: tuple(v.shape) for n, v in feeds.items()}
        profile = select_profile(self.profiles, shapes, str(self.engine_dir))
        outputs = [contract.LOGITS] + [n for i in range(self.num_layers)
                                       for n in (contract.present_key(i), contract.present_value(i))]
        run = lambda k, inputs: self.runners[k].run(inputs, self._outputs(self.ranges[k], cache, batch, new), profile)  # noqa: E731
        out = run_chain(self.ranges, feeds, run, outputs)
        pasts = {contract.past_key(i): out[contract.present_key(i)] for i in range(self.num_layers)}
        pasts.update({contract.past_value(i): out[contract.present_value(i)] for i in range(self.num_layers)})
        logits_BSV = out[contract.LOGITS].float().cpu().numpy()
        return logits_BSV, ChainCache(pasts, batch, cache.past_len + new, cache.buffers)

    def _outputs(self, r: _RangeView, cache: ChainCache, batch: int, new: int) -> dict[str, Any]:
        """Range ``r``'s outputs for this step, as views of the preallocated buffers."""
        out = {}
        for name in r.outputs:
            if name in self._flat:
                flat, width = self._flat[name]
                out[name] = view_of(flat, (batch, new, width))
                continue
            past = name.replace("present_", "past_", 1) if name.startswith("present_") else None
            if past not in cache.pasts:
                raise MoecError(f"{self.engine_dir}: range {r.first}-{r.end - 1} outputs {name}, which a layer chain "
                                "does not produce: rebuild the chain with `moec build --layers-per-engine`")
            view = cache.pasts[past]
            _, kvh, p, d = view.shape
            slots = p if past in self._rings else p + new  # a ring keeps its size
            out[name] = view_of(other_buffer(cache.buffers[past], view), (batch, kvh, slots, d))
        return out

    def describe(self) -> dict[str, str]:
        return {"backend": "trt", "engines": f"{len(self.ranges)} layer ranges", "trt_flavour": self.chain["trt"]["flavour"],
                "trt_version": self.chain["trt"]["version"]}


class _RangeView:
    """chain.json's range as run_chain reads it."""

    def __init__(self, r: dict[str, Any]):
        self.first, self.end = r["layers"]
        self.inputs = tuple(r["inputs"])
        self.outputs = tuple(r["outputs"])


class EngineRunner:
    """One range's engine on the GPU (thin: nothing here runs without one)."""

    def __init__(self, engine, context, stream, device, path: Path):
        from moec.runtime.trt_backend import _torch_dtype

        self.engine, self.context, self.stream, self.device, self.path = engine, context, stream, device, path
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        self.outputs = [n for n in names if str(engine.get_tensor_mode(n)).endswith("OUTPUT")]
        self.profile = int(context.active_optimization_profile)

    def run(self, inputs: dict[str, Any], outputs: dict[str, Any], profile: EngineProfile) -> dict[str, Any]:
        """Range's step: ``outputs`` are the tensors TensorRT writes into (returned by name)."""
        import torch

        ctx = self.context
        if profile.index != self.profile:
            if not ctx.set_optimization_profile_async(profile.index, self.stream.cuda_stream):
                raise MoecError(f"{self.path}: TensorRT refused optimization profile #{profile.index}; rebuild the chain")
            self.profile = profile.index
        keep = []
        for name, t in inputs.items():
            t = t.to(self.device, self.dtypes[name]).contiguous()
            # An empty past still needs a valid address: one element backs it.
            keep.append(t if t.numel() else torch.zeros(1, dtype=t.dtype, device=self.device))
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise MoecError(f"{self.path}: TensorRT refused input {name} shape {list(t.shape)}; rebuild the chain")
            ctx.set_tensor_address(name, keep[-1].data_ptr())
        for name in self.outputs:
            t = outputs[name]
            inferred = tuple(ctx.get_tensor_shape(name))
            if inferred != tuple(t.shape):
                raise MoecError(f"{self.path}: TensorRT infers output {name} as {list(inferred)}, the chain expects "
                                f"{list(t.shape)}: the chain.json does not match the engines; rebuild the chain")
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise MoecError(f"{self.path}: TensorRT failed to enqueue the step (see its log above)")
        self.stream.synchronize()
        return {name: outputs[name] for name in self.outputs}
