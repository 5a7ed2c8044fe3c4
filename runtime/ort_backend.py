"""ONNX Runtime backend: runs a moec export (or an optimized copy of one) step by step.

The KV cache stays in ONNX Runtime's own memory between steps: each step binds the previous
step's ``present_*`` OrtValues as this step's ``past_*`` inputs through an IOBinding, so keys
and values never round-trip through numpy (on a CUDA provider they never leave the GPU). Only
the token ids go in and the float32 logits come out through host memory.

One-token steps (decode) keep one IOBinding across the steps of a cache (``_StepBinding``, carried
from each cache to the one its step returns): the token and position are written into bound
buffers, rings updated in place stay bound, each growing cache gets a present of the size the
layout says, and the logits land in one preallocated host buffer and are copied out.

A graph optimized with com.microsoft.GroupQueryAttention (passes/lowerings/ort_gqa.py; its sidecar
lists the layers under ``contract.GQA_LAYERS``) has its chunked layers' rings bound as their own
presents: the op writes the new keys into the ring in place, so a step copies no cache. Such a
cache is consumed by the step it is given to (the returned cache is the same buffers, updated),
and the op cannot run several new tokens after a past for more than one sequence: both are named
errors.

What the runtime needs besides the graph (layer count, maximum positions, EOS ids) comes from
the sidecar JSON beside the .onnx (``moec.common.contract.sidecar_path``), which the export
writes, or from a metadata dict the caller builds (``moec run --checkpoint``); this module never
imports the torch model code. The dtype is read from the graph's KV inputs, so an optimized graph
whose precision differs from the export's is described as what it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moec.common import contract
from moec.common.errors import MoecError
from moec.common.kv_cache import graph_cache_layout
from moec.common.onnx_files import missing_external_data, require_external_data
from moec.common.sidecar import read_sidecar, validate_sidecar
from moec.common.token_ids import bad_token_ids_message

# ONNX type strings of the KV inputs -> the element type an empty OrtValue needs. bf16 has no
# numpy dtype, so it goes by its ONNX enum (onnx.TensorProto.BFLOAT16 == 16).
_KV_ELEMENT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(bfloat16)": 16,
}
_KV_DTYPE_NAMES = {"tensor(float)": "fp32", "tensor(float16)": "fp16", "tensor(bfloat16)": "bf16"}


@dataclass
class OrtCache:
    """Past keys/values as OrtValues, one pair per layer: [B, KVH, P, D] for a full cache,
    [B, KVH, slots, D] for a chunked layer's ring (``moec.common.kv_cache``)."""

    keys: list[Any]
    values: list[Any]
    batch_size: int
    past_len: int
    consumed: bool = False  # updated in place by a forward step (GroupQueryAttention rings): use what it returned
    # The binding one-token steps of this cache's lineage reuse (``_StepBinding``); None until the first.
    step_binding: Any = field(default=None, repr=False, compare=False)


class OrtBackend:
    """``moec.runtime.backend.Backend`` over an ``onnxruntime.InferenceSession``."""

    name = "ort"

    def __init__(self, session, onnx_path: Path | None = None, sidecar: dict | None = None,
                 graph_optimization: bool = True, **from_onnx_options):
        if isinstance(session, (str, os.PathLike)):
            # OrtBackend("model.onnx", providers=...) is the call users try first: from_onnx's.
            self.__dict__.update(type(self).from_onnx(session, **from_onnx_options).__dict__)
            return
        self.session = session
        self.path = onnx_path
        self.sidecar = sidecar
        self.graph_optimization = graph_optimization
        self.num_layers = int(sidecar["num_layers"])
        self.max_positions = int(sidecar["max_positions"])
        self.vocab_size = int(sidecar["vocab_size"])
        self.eos_token_ids = tuple(int(t) for t in sidecar["generation"].get("eos_token_ids", []))
        self.provider = session.get_providers()[0]
        # Presents are left where the provider computes them; only logits come back to the host.
        self._device = "cuda" if self.provider == "CUDAExecutionProvider" else "cpu"
        by_name = {i.name: i for i in session.get_inputs()}
        k0 = by_name[contract.past_key(0)] if self.num_layers else None
        self._kv_type = k0.type if k0 is not None else "tensor(float)"
        if self._kv_type not in _KV_ELEMENT_TYPES:
            raise MoecError(f"{onnx_path}: KV cache input {k0.name} has type {self._kv_type}, which moec does not run")
        # [B, KVH, P, D]: KVH and D are static in a moec export.
        self._kv_heads, self._head_dim = (int(k0.shape[1]), int(k0.shape[3])) if k0 is not None else (0, 0)
        self.dtype = _KV_DTYPE_NAMES[self._kv_type]
        # A graph exported for image prompts: image features replace the embeddings of this token's positions.
        self.image_token_id = sidecar.get("image_token_id")
        features = by_name.get(contract.IMAGE_FEATURES)
        self._feature_width = int(features.shape[1]) if features is not None else 0
        self._input_names, self._output_names = contract.io_names(self.num_layers, self.image_token_id is not None)
        # Logits one-token steps write into a preallocated buffer of this numpy type (None: not one numpy has).
        logits_type = {o.name: o.type for o in session.get_outputs()}.get(contract.LOGITS)
        self._logits_np = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(logits_type)
        self.kv_cache = graph_cache_layout(
            sidecar, [by_name[contract.past_key(i)].shape for i in range(self.num_layers)], onnx_path)
        self.gqa_layers = _gqa_layers(sidecar, self.num_layers, onnx_path)
        # Rings of GroupQueryAttention layers: bound as input and output, written in place.
        self._in_place = frozenset(i for i in self.gqa_layers if self.kv_cache[i].ring)

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike,
        providers: Sequence[str] | None = None,
        graph_optimization: bool = True,
        intra_op_threads: int | None = None,
        metadata: dict | None = None,
    ) -> "OrtBackend":
        """``metadata`` replaces the sidecar file (same keys, validated the same way)."""
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():
            raise MoecError(f"{path} is a directory; the ONNX Runtime backend runs an .onnx file")
        if not path.is_file():
            raise MoecError(f"ONNX file {path} does not exist")
        if metadata is None:
            sidecar = read_sidecar(path)
        else:
            sidecar = validate_sidecar(metadata, f"given for {path}")
        # Before ONNX Runtime opens anything: an empty or truncated file, or external data that is
        # missing or lies outside the model's folder, named as such.
        require_external_data(path)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if graph_optimization else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        # ORT sizes its thread pool to every core and ignores OMP_NUM_THREADS; on a shared host
        # the caller's OMP_NUM_THREADS is the best hint of what it may use.
        if intra_op_threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            intra_op_threads = int(os.environ["OMP_NUM_THREADS"])
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types; diagnose, then report.
            try:
                problems = missing_external_data(path)
            except Exception:  # not even parseable as ONNX: the ORT message below says why
                problems = []
            if problems:
                raise MoecError(
                    f"{path} keeps its weights in external data that is not usable: {'; '.join(problems)}. "
                    "Keep the .data file beside the .onnx (same name as when exported) or re-export."
                ) from e
            msg = str(e).strip()
            if "Could not find an implementation" in msg:
                # ORT's CPU provider has no bf16 kernels for most arithmetic (MatMul, Gemm, Add,
                # Mul, Where, Expand, Tile, Sigmoid in onnxruntime 1.32); upcasting the graph
                # would change what is being run, so say so instead.
                raise MoecError(
                    f"ONNX Runtime ({', '.join(providers)}) has no kernel for a node of {path} "
                    f"({sidecar.get('dtype', 'its')} weights): {msg.split(':')[-1].strip()}. Run it on a provider "
                    "that implements this type (bf16: CUDAExecutionProvider) or export with --dtype fp32/fp16."
                ) from e
            raise MoecError(f"ONNX Runtime cannot load {path}: {msg}") from e

        want_in, want_out = contract.io_names(int(sidecar["num_layers"]), sidecar.get("image_token_id") is not None)
        have_in = [i.name for i in session.get_inputs()]
        have_out = [o.name for o in session.get_outputs()]
        missing_in = [n for n in want_in if n not in have_in]
        missing_out = [n for n in want_out if n not in have_out]
        extra_in = [n for n in have_in if n not in want_in]
        if missing_in or missing_out or extra_in:
            parts = []
            if missing_in:
                parts.append(f"missing inputs {missing_in}")
            if missing_out:
                parts.append(f"missing outputs {missing_out}")
            if extra_in:
                parts.append(f"unexpected inputs {extra_in}")
            raise MoecError(
                f"{path} is not a moec export for its metadata ({int(sidecar['num_layers'])} layers): "
                f"{'; '.join(parts)}. Export the checkpoint with `moec export`."
            )
        return cls(session, path, sidecar, graph_optimization)

    # --- Backend protocol ---------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> OrtCache:
        import onnxruntime as ort

        et = _KV_ELEMENT_TYPES[self._kv_type]

        def empty(layer):
            shape = [batch_size, self._kv_heads, layer.slots if layer.ring else 0, self._head_dim]
            value = ort.OrtValue.ortvalue_from_shape_and_type(shape, et, self._device, 0)
            if layer.ring:
                # A ring starts as zeros: every slot is masked out until written, but uninitialised
                # memory could hold NaN, which a mask cannot remove. Zero bytes are zeros in every
                # float type, so uint16/float32 words of the same size fill it (bf16 has no numpy type).
                word = np.float32 if self._kv_type == "tensor(float)" else np.uint16
                value.update_inplace(np.zeros(shape, dtype=word))
            return value

        return OrtCache(
            keys=[empty(c) for c in self.kv_cache],
            values=[empty(c) for c in self.kv_cache],
            batch_size=batch_size,
            past_len=0,
        )

    def forward(self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: OrtCache,
                image_features_NH: np.ndarray | None = None):
        """``image_features_NH``: one row per image-token position of these new tokens (runtime/image_inputs.py);
        only for a graph exported for image prompts."""
        input_ids_BS = np.ascontiguousarray(input_ids_BS, dtype=np.int64)
        position_ids_BS = np.ascontiguousarray(position_ids_BS, dtype=np.int64)
        if input_ids_BS.ndim != 2 or input_ids_BS.shape != position_ids_BS.shape or input_ids_BS.shape[1] == 0:
            raise MoecError(
                f"input_ids {input_ids_BS.shape} and position_ids {position_ids_BS.shape} must both be "
                "[batch, new_tokens] with new_tokens >= 1"
            )
        B, S = input_ids_BS.shape
        if B != cache.batch_size:
            raise MoecError(f"batch of {B} sequences against a cache made for {cache.batch_size}")
        if cache.consumed:
            raise MoecError(f"this cache was updated in place by an earlier step of {self.path} (GroupQueryAttention "
                            "rings); pass the cache that step returned")
        if self.gqa_layers and B > 1 and S > 1 and cache.past_len > 0:
            raise MoecError(
                f"{self.path}: {S} new tokens after {cache.past_len} cached ones for a batch of {B}: ONNX Runtime's "
                "GroupQueryAttention (layers " + ",".join(map(str, self.gqa_layers)) + ") runs several new tokens "
                "after a past for one sequence only; feed the batch one token per step, or one sequence at a time, "
                "or optimize with OptimizeConfig(fuse_gqa=False)"
            )
        if cache.past_len + S > self.max_positions:
            raise MoecError(
                f"{cache.past_len + S} positions exceed the {self.max_positions} that {self.path} was exported for"
            )
        if input_ids_BS.size and (input_ids_BS.min() < 0 or input_ids_BS.max() >= self.vocab_size):
            message = bad_token_ids_message(input_ids_BS.tolist(), position_ids_BS.tolist(), self.vocab_size)
            raise MoecError(f"{message}, for {self.path}")

        if S == 1 and image_features_NH is None and self._logits_np is not None:
            return self._step(input_ids_BS, position_ids_BS, cache)

        binding = self.session.io_binding()
        binding.bind_cpu_input(contract.INPUT_IDS, input_ids_BS)
        binding.bind_cpu_input(contract.POSITION_IDS, position_ids_BS)
        if self.image_token_id is not None:
            rows = image_features_NH if image_features_NH is not None else np.zeros((0, self._feature_width))
            dtype = _KV_ELEMENT_TYPES[self._kv_type]
            if dtype == 16:
                raise MoecError(f"{self.path}: image features for a bf16 graph cannot come from numpy; export fp32/fp16")
            binding.bind_cpu_input(contract.IMAGE_FEATURES, np.ascontiguousarray(rows, dtype=dtype))
        elif image_features_NH is not None:
            raise MoecError(f"{self.path} was exported for text only; export with --vision for image prompts")
        for i in range(self.num_layers):
            binding.bind_ortvalue_input(contract.past_key(i), cache.keys[i])
            binding.bind_ortvalue_input(contract.past_value(i), cache.values[i])
        binding.bind_output(contract.LOGITS, "cpu")
        for i in range(self.num_layers):
            if i in self._in_place:
                binding.bind_ortvalue_output(contract.present_key(i), cache.keys[i])
                binding.bind_ortvalue_output(contract.present_value(i), cache.values[i])
            else:
                binding.bind_output(contract.present_key(i), self._device)
                binding.bind_output(contract.present_value(i), self._device)
        self.session.run_with_iobinding(binding)
        cache.consumed = bool(self._in_place)
        outs = binding.get_outputs()
        logits_BSV = outs[0].numpy()
        if logits_BSV.dtype != np.float32:
            logits_BSV = logits_BSV.astype(np.float32)
        new = OrtCache(
            keys=[cache.keys[i] if i in self._in_place else outs[1 + 2 * i] for i in range(self.num_layers)],
            values=[cache.values[i] if i in self._in_place else outs[2 + 2 * i] for i in range(self.num_layers)],
            batch_size=B,
            past_len=cache.past_len + S,
        )
        return logits_BSV, new

    def _step(self, input_ids_B1: np.ndarray, position_ids_B1: np.ndarray, cache: OrtCache):
        """One new token per sequence through the cache lineage's kept binding (module docstring)."""
        import onnxruntime as ort

        bound = cache.step_binding
        if bound is None or not bound.serves(cache):
            bound = _StepBinding(self, cache)
        bound.ids.update_inplace(input_ids_B1)
        bound.positions.update_inplace(position_ids_B1)
        keys, values = list(cache.keys), list(cache.values)
        context = cache.past_len + 1
        et = _KV_ELEMENT_TYPES[self._kv_type]
        for i, layer in enumerate(self.kv_cache):
            if i in self._in_place:
                continue
            bound.binding.bind_ortvalue_input(contract.past_key(i), cache.keys[i])
            bound.binding.bind_ortvalue_input(contract.past_value(i), cache.values[i])
            # The present a step makes: the ring's slots, or the full cache grown by this token.
            shape = [cache.batch_size, self._kv_heads, layer.slots_at(context), self._head_dim]
            keys[i] = ort.OrtValue.ortvalue_from_shape_and_type(shape, et, self._device, 0)
            values[i] = ort.OrtValue.ortvalue_from_shape_and_type(shape, et, self._device, 0)
            bound.binding.bind_ortvalue_output(contract.present_key(i), keys[i])
            bound.binding.bind_ortvalue_output(contract.present_value(i), values[i])
        self.session.run_with_iobinding(bound.binding)
        cache.consumed = bool(self._in_place)
        # A copy: the buffer is the next step's, and a caller may keep these logits.
        logits_B1V = bound.logits.numpy().astype(np.float32, copy=True)
        return logits_B1V, OrtCache(keys, values, cache.batch_size, context, step_binding=bound)

    def describe(self) -> dict[str, str]:
        import onnxruntime as ort

        return {
            "backend": self.name,
            "onnxruntime": ort.__version__,
            "provider": self.provider,
            "providers": ",".join(self.session.get_providers()),
            "device": ort.get_device(),
            "model": str(self.path),
            "dtype": self.dtype,
            "graph_optimization": "all" if self.graph_optimization else "disabled",
            "kv_update": f"in place ({len(self._in_place)} ring layers)" if self._in_place else "copy",
        }


class _StepBinding:
    """An IOBinding for one-token steps, kept across the steps of one cache lineage.

    Why: a binding built afresh each step (bind every input and output, let ONNX Runtime allocate
    the outputs and wrap each of them back into Python) cost about 0.14 ms a step in Python on the
    h512 benchmark model, 7 % of its decode step. Kept, it holds the token and position buffers,
    the preallocated logits and the rings updated in place; a step rebinds only the growing caches.
    Steps of one lineage run one at a time (a binding is not for two threads at once)."""

    def __init__(self, backend: "OrtBackend", cache: OrtCache):
        import onnxruntime as ort

        B = cache.batch_size
        self.batch_size = B
        self.ids = ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1), np.int64))
        self.positions = ort.OrtValue.ortvalue_from_numpy(np.zeros((B, 1), np.int64))
        self.logits = ort.OrtValue.ortvalue_from_shape_and_type([B, 1, backend.vocab_size], backend._logits_np)
        self.binding = backend.session.io_binding()
        self.binding.bind_ortvalue_input(contract.INPUT_IDS, self.ids)
        self.binding.bind_ortvalue_input(contract.POSITION_IDS, self.positions)
        if backend.image_token_id is not None:  # a graph for image prompts: no image rows at this token
            self._no_features = ort.OrtValue.ortvalue_from_shape_and_type(
                [0, backend._feature_width], _KV_ELEMENT_TYPES[backend._kv_type])
            self.binding.bind_ortvalue_input(contract.IMAGE_FEATURES, self._no_features)
        self.binding.bind_ortvalue_output(contract.LOGITS, self.logits)
        self.rings = {i: (cache.keys[i], cache.values[i]) for i in backend._in_place}
        for i, (k, v) in self.rings.items():  # the op's past is its present: bound both ways, once
            self.binding.bind_ortvalue_input(contract.past_key(i), k)
            self.binding.bind_ortvalue_input(contract.past_value(i), v)
            self.binding.bind_ortvalue_output(contract.present_key(i), k)
            self.binding.bind_ortvalue_output(contract.present_value(i), v)

    def serves(self, cache: OrtCache) -> bool:
        """Bound to this cache's batch size and its very ring buffers."""
        return cache.batch_size == self.batch_size and all(
            cache.keys[i] is k and cache.values[i] is v for i, (k, v) in self.rings.items())


def _gqa_layers(sidecar: dict, num_layers: int, source) -> tuple[int, ...]:
    """The sidecar's ``contract.GQA_LAYERS``: layer indices, each once, below num_layers."""
    layers = sidecar.get(contract.GQA_LAYERS, [])
    ok = isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers
                                          for i in layers) and len(set(layers)) == len(layers)
    if not ok:
        raise MoecError(f"{source}: the moec metadata's {contract.GQA_LAYERS} must list distinct layer indices below "
                        f"{num_layers}, got {layers!r}; optimize the export again with `moec optimize`")
    return tuple(sorted(layers))
