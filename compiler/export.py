"""Export stage: a Llama 4 checkpoint -> one ONNX graph, plus what the runtime needs beside it.

Exporter: ``torch.onnx.export(..., dynamo=True)``, the torch.export-based exporter. It traces
the model's real Python (no TorchScript scripting), records dynamic dimensions as named symbols
with their ranges, and emits an onnx-ir model we can post-process and stream to disk before any
protobuf copy of the weights exists. The TorchScript exporter is deprecated in torch 2.x and
needs a full ModelProto in memory.

One graph serves prefill and decode: the new-token count ``new_tokens`` and the past length
``past_len`` are both dynamic, so prefill is (S = prompt, P = 0) and decode (S = 1, P > 0) of
the same graph. Two graphs would duplicate every weight reference (or need a shared external
file and two sessions/engines), double the passes' work and the number of TensorRT
engines/profiles to build, and let the two phases drift; a dynamic-shape TensorRT engine can
still carry one optimization profile per phase over one graph.

The MoE blocks stay exactly as ``moec.models`` writes them (router, TopK, ScatterElements,
Sigmoid, dense bmm over all experts, shared expert); ``moec.passes`` fuses them later. In
fp16/bf16 exports the router's top-k, scatter and sigmoid run in fp32 (the model casts the router
logits up before them; ``router_precisions`` reads it back from the graph for the tests).

Files written (all first under temporary names, renamed into place only after the checks pass):
    OUT.onnx           the graph
    OUT.onnx.data      all weights, when they exceed ``external_data_threshold_bytes``
    OUT.moec.json      the sidecar (``moec.common.contract.sidecar_path``): see ``build_sidecar``
    tokenizer.json     copied from the checkpoint when it has one (loaded first: a file that
                       ``tokenizers`` cannot read stops the export before any work)
"""

from __future__ import annotations


import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moec.common import contract
from moec.common.artifacts import make_parents, remove_made, sha256_file, write_json_atomic
from moec.common.sidecar import check_tokenizer_slot
from moec.common.errors import MoecError
from moec.compiler.export_sidecar import (  # noqa: F401 - the sidecar's format and writer, re-exported
    SIDECAR_FORMAT,
    SIDECAR_VERSION,
    build_sidecar,
    kv_cache_entries,
    router_precisions,
)


DTYPES = ("fp32", "fp16", "bf16")


CHUNKED_CACHES = ("ring", "full")


FP8_WEIGHTS = ("keep", "dequantize")


@dataclass(frozen=True)
class ExportConfig:
    """How to export. The CLI (``moec export``) fills it; defaults live here only."""

    # "fp32" | "fp16" | "bf16": weights, activations and KV cache. None: the dtype the checkpoint's
    # weights are stored in (``moec.models.checkpoint.stored_dtype``), so a bf16 checkpoint is not
    # doubled in size by default.
    dtype: str | None = None
    max_batch: int = 8  # upper bound of the dynamic batch dimension
    # Longest sequence (prompt + generated) the artifact accepts; None: the model's
    # max_position_embeddings.
    max_seq: int | None = None
    allow_nonfinite_weights: bool = False  # NaN/Inf weights are an error unless the user says so
    # Weights above this many bytes go to one external-data file OUT.onnx.data. Protobuf cannot
    # hold more than 2 GiB, and a large inline proto is a second copy of the weights in memory
    # while it is serialised, so the default stays well below that.
    external_data_threshold_bytes: int = 1 << 30
    # ONNX opset 18: the torchlib exporter's native opset, read by ONNX Runtime and by the
    # TensorRT / TensorRT-RTX parsers. Newer opsets would make the exporter emit fused
    # RMSNormalization/Attention ops (opset 23) that the MoE passes and older parsers do not expect.
    opset: int = 18
    # Run onnxscript's optimizer (constant folding of small subgraphs, dead code removal).
    optimize: bool = True
    # The chunked-attention layers' KV cache: "ring" (attention_chunk_size slots, position p at
    # slot p mod chunk: memory and attention cost of one chunk at any context) or "full" (grows
    # with the context like the NoPE layers': the layout before rings, kept to compare against).
    chunked_cache: str = "ring"
    # The <|patch|> token id of a multimodal checkpoint: the graph gains an image_features input whose rows
    # replace the embeddings at that token's positions (contract.IMAGE_FEATURES). None: text only.
    image_token_id: int | None = None
    # A pre-quantized (fbgemm_fp8) checkpoint: "keep" writes its FP8 weights and scales as they
    # are (DequantizeLinear; compiler/export_fp8.py), "dequantize" writes q * scale in ``dtype``.
    fp8_weights: str = "keep"

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise MoecError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.max_batch < 1:
            raise MoecError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_seq is not None and self.max_seq < 2:
            raise MoecError(f"max_seq must be >= 2, got {self.max_seq}")
        if self.external_data_threshold_bytes < 0:
            raise MoecError("external_data_threshold_bytes must be >= 0")
        if self.chunked_cache not in CHUNKED_CACHES:
            raise MoecError(f"unknown chunked_cache {self.chunked_cache!r}; choose one of {', '.join(CHUNKED_CACHES)}")
        if self.fp8_weights not in FP8_WEIGHTS:
            raise MoecError(f"fp8_weights {self.fp8_weights!r}: choose one of {', '.join(FP8_WEIGHTS)}")
        from moec.compiler.dims import check_dim

        check_dim("max_batch", self.max_batch)
        check_dim("max_seq", self.max_seq)


@dataclass
class ExportResult:
    onnx_path: Path
    external_data_path: Path | None
    sidecar_path: Path
    tokenizer_path: Path | None
    dtype: str
    weight_bytes: int
    max_positions: int
    op_counts: dict[str, int] = field(default_factory=dict)
    export_s: float = 0.0  # torch.export + translation to ONNX
    save_s: float = 0.0  # writing the graph and weights
    check_s: float = 0.0  # checker + strict shape inference
    total_s: float = 0.0


def load_tokenizer(path: str | os.PathLike, what_to_do: str):
    """``tokenizers.Tokenizer`` read from ``path``; a MoecError naming the file and saying
    ``what_to_do`` when the file cannot be parsed. Export and run share it, so a tokenizer.json
    that export copied is one that run can read."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    # tokenizers raises a bare Exception (no subclass) for every parse error: bad JSON, bad
    # UTF-8, a model without vocab; nothing narrower can be caught.
    except Exception as e:
        raise MoecError(f"{path}: not a usable tokenizer ({e}); {what_to_do}") from None


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _export_module(model, image_token_id: int | None = None):
    """The model with the contract's flat signature: (input_ids, position_ids, past...) ->
    (logits fp32, present...). Logits leave in fp32 whatever the dtype, because numpy (and so
    every backend's host side) has no bfloat16 and the loop samples in fp32 anyway."""
    import torch

    class ExportModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, past):
            past_kv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            logits, present = self.inner(input_ids, position_ids_BS=position_ids, past_key_values=past_kv)
            return (logits.float(), *[t for kv in present for t in kv])

    class ImageExportModule(ExportModule):
        def forward(self, input_ids, position_ids, image_features, past):
            from moec.models.image_prompt import place_image_features

            past_kv = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            embeds = place_image_features(self.inner.model.embed_tokens(input_ids), input_ids, image_features,
                                          image_token_id)
            logits, present = self.inner(input_ids, position_ids_BS=position_ids, past_key_values=past_kv,
                                         inputs_embeds_BSH=embeds)
            return (logits.float(), *[t for kv in present for t in kv])

    return (ExportModule(model) if image_token_id is None else ImageExportModule(model)).eval()


def _trace_to_onnx(model, llama_config, config: ExportConfig, max_positions: int):
    """torch.onnx.export with dynamic batch, new tokens and past length -> onnx_ir.Model."""
    import torch
    from torch.export import Dim

    L = llama_config.num_hidden_layers
    K, D = llama_config.num_key_value_heads, llama_config.head_dim
    dt = torch_dtype(config.dtype) if config.dtype else next(model.parameters()).dtype
    kinds = model.cache_kinds()
    # Sample sizes: distinct and > 1, so torch.export neither specialises (0/1) nor unifies them.
    B, S, P = 2, 3, 5
    batch = Dim(contract.DIM_BATCH, min=1, max=config.max_batch)
    new = Dim(contract.DIM_NEW_TOKENS, min=1, max=max_positions)
    past = Dim(contract.DIM_PAST, min=0, max=max_positions - 1)
    args = (
        torch.zeros(B, S, dtype=torch.int64),
        (torch.arange(S, dtype=torch.int64) + P).expand(B, S).contiguous(),
        # A ring cache has a fixed number of slots (static dim); a full cache grows (past_len).
        tuple(torch.zeros(B, K, slots or P, D, dtype=dt) for _, slots in kinds for _ in range(2)),
    )
    dynamic_shapes = (
        {0: batch, 1: new},
        {0: batch, 1: new},
        tuple({0: batch} if slots else {0: batch, 2: past} for _, slots in kinds for _ in range(2)),
    )
    if config.image_token_id is not None:
        rows = Dim(contract.DIM_IMAGE_ROWS, min=0, max=config.max_batch * max_positions)
        args = (*args[:2], torch.zeros(4, llama_config.hidden_size, dtype=dt), args[2])
        dynamic_shapes = (*dynamic_shapes[:2], {0: rows}, dynamic_shapes[2])
    input_names, output_names = contract.io_names(L, image_features=config.image_token_id is not None)
    # The exporter prints progress lines and warns (through logging and warnings) about
    # torchvision ops that a language model never uses.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _export_module(model, config.image_token_id),
            args,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=config.opset,
            # We optimize ourselves, after folding weight transposes lazily (see below).
            optimize=False,
            verbose=False,
        )
    model = program.model
    # Parameters are named after the wrapper's attribute ("inner."); give them back their
    # checkpoint names so errors, passes and refits can refer to them as the checkpoint does.
    for value in list(model.graph.initializers.values()):
        if value.name.startswith("inner."):
            value.name = value.name[len("inner.") :]
    return model


def _fold_weight_layout_ops(model) -> int:
    """Replace Transpose(initializer) with a pre-transposed initializer, evaluated lazily.

    The exporter writes nn.Linear as MatMul(x, Transpose(W)). onnxscript's constant folding would
    fold small weights (below its 8192-element limit) into new numpy arrays and leave large ones
    unfolded: the tiny test models and real ones would then differ in graph shape, and the folded
    copies would be a second copy of the weights in memory. Folding every one lazily (an
    ``ir.LazyTensor`` computed when the saver writes it, one tensor at a time) gives one graph
    shape for all sizes and keeps peak memory at one copy plus one tensor.
    """
    import numpy as np
    import onnx_ir as ir

    folded = 0
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or src.const_value is None:
            continue
        perm_attr = node.attributes.get("perm")
        rank = len(src.shape)
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(rank)))
        tensor = src.const_value

        def transposed(tensor=tensor, perm=perm):
            return ir.tensor(np.ascontiguousarray(np.transpose(tensor.numpy(), perm)))

        shape = ir.Shape([src.shape[p] for p in perm])
        out = node.outputs[0]
        new_value = ir.Value(name=f"{src.name}.T", shape=shape, type=src.type)
        new_value.const_value = ir.LazyTensor(transposed, dtype=src.dtype, shape=shape, name=new_value.name)
        graph.register_initializer(new_value)
        out.replace_all_uses_with(new_value)
        if out.is_graph_output():
            continue
        graph.remove(node, safe=True)
        if not src.uses() and not src.is_graph_output():
            graph.initializers.pop(src.name)
        folded += 1
    return folded


def _weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


# int32/int64 initializers up to this size stay in the graph in an external-data save.
INLINE_INDEX_BYTES = 1 << 20
# Any initializer up to this size stays in the graph too (onnx-ir's own default threshold).
INLINE_ANY_BYTES = 256


def _stays_inline(tensor) -> bool:
    """The ring caches' slot constants (int64, 8 bytes a slot) feed shape inference's data
    propagation, which cannot read external data: the strict check below failed on any ring over
    32 slots (Scout's 8192 included). onnx-ir's save picks external tensors by size only, and the
    weights of a tiny model are as small as such constants, so the choice is made by dtype."""
    import onnx_ir as ir

    if tensor.nbytes <= INLINE_ANY_BYTES:
        return True
    return tensor.dtype in (ir.DataType.INT64, ir.DataType.INT32) and tensor.nbytes <= INLINE_INDEX_BYTES


def _save_external(onnx_model, path: Path, data_name: str) -> None:
    """Save ``onnx_model`` to ``path`` with every initializer but the small index tensors in
    ``data_name`` beside it.

    onnx-ir streams the chosen tensors into the data file one at a time (LazyTensors are evaluated
    there), so no second copy of the weights is built; the graph is then written once, the
    external ones as references. The model is left as it was."""
    import onnx_ir as ir

    values = [v for g in onnx_model.graphs() for v in g.initializers.values()
              if v.const_value is not None and not _stays_inline(v.const_value)]
    originals = [v.const_value for v in values]
    external = ir.external_data.convert_tensors_to_external(originals, path.parent, data_name)
    try:
        for v, t in zip(values, external, strict=True):
            v.const_value = t
        ir.save(onnx_model, path)
    finally:
        for v, t in zip(values, originals, strict=True):
            v.const_value = t


def _check_by_path(path: Path) -> None:
    """Full checker and strict shape inference, by path (works beyond protobuf's 2 GiB)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    inferred = path.with_name(path.name + ".inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True, data_prop=True)
    finally:
        with contextlib.suppress(FileNotFoundError):
            inferred.unlink()


def export_onnx(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export ``checkpoint_dir`` to ``out_path`` (and the files beside it); see the module doc."""
    import onnx_ir as ir

    from moec.common import demo_note
    from moec.common.demo_note import is_demo_checkpoint
    from moec.common.progress import step
    from moec.models import Llama4Config
    from moec.models.checkpoint import checkpoint_folder

    t_start = time.perf_counter()
    checkpoint_dir = checkpoint_folder(checkpoint_dir)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise MoecError(f"the export's file name must end in .onnx, got {out_path}")
    if out_path.is_dir():
        raise MoecError(f"{out_path} is a directory; give the .onnx file to write")
    llama_config = Llama4Config.from_pretrained(checkpoint_dir)
    if config.dtype is None:
        from moec.models.checkpoint import stored_dtype

        config = dataclasses.replace(config, dtype=stored_dtype(checkpoint_dir))
    max_positions = config.max_seq or llama_config.max_position_embeddings
    if max_positions > llama_config.max_position_embeddings:
        raise MoecError(
            f"max_seq {max_positions} exceeds the model's max_position_embeddings "
            f"({llama_config.max_position_embeddings}) in {checkpoint_dir / 'config.json'}"
        )

    tokenizer_src = checkpoint_dir / contract.TOKENIZER_FILE
    has_tokenizer = tokenizer_src.is_file()
    if has_tokenizer:
        load_tokenizer(
            tokenizer_src,
            "replace it with the model's own tokenizer.json (from its Hugging Face repository), "
            "or remove it to export without a tokenizer (then run with --prompt-ids)",
        )
        # Before any work: the folder may already hold another model's tokenizer.json.
        check_tokenizer_slot(tokenizer_src, out_path.with_name(contract.TOKENIZER_FILE))

    data_name = out_path.name + ".data"
    # Everything is written into a temporary folder beside the destination (same filesystem),
    # checked there, and only then renamed into place; a failure removes the folder. It is made
    # before the export itself, so an unwritable destination fails at once, not after the work.
    made: list[Path] = []  # folders made above out_path: removed again if the export fails
    try:
        made = make_parents(out_path)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    except OSError as e:
        remove_made(made)
        raise MoecError(f"cannot write {out_path}: {e.strerror or e}; choose a writable location") from None
    try:
        # The weights stay in the checkpoint's files until the saver streams them one at a time
        # (moec.compiler.export_weights): host memory does not grow with the layer count.
        from moec.compiler.export_weights import attach_checkpoint_weights
        from moec.models.checkpoint import load_pretrained_lazy

        step("reading the checkpoint")
        model, sources = load_pretrained_lazy(checkpoint_dir, dtype=torch_dtype(config.dtype),
                                              allow_nonfinite=config.allow_nonfinite_weights)
        allow_nonfinite = config.allow_nonfinite_weights
        from moec.models.llama4 import default_ring_slots

        model.ring_slots = default_ring_slots(llama_config, max_positions) if config.chunked_cache == "ring" else None
        kv_cache = kv_cache_entries(model, max_positions)
        t0 = time.perf_counter()
        step("tracing the model (torch.export)")
        onnx_model = _trace_to_onnx(model, llama_config, config, max_positions)
        attach_checkpoint_weights(onnx_model, model, sources, allow_nonfinite=allow_nonfinite)
        _fold_weight_layout_ops(onnx_model)
        if config.optimize:
            import onnxscript.optimizer

            step("folding constants (onnxscript optimizer)")
            onnxscript.optimizer.optimize_ir(onnx_model)
        kept_fp8 = 0
        if config.fp8_weights == "keep":
            from moec.compiler.export_fp8 import keep_fp8_weights

            kept_fp8 = keep_fp8_weights(onnx_model, sources)
        export_s = time.perf_counter() - t0
        op_counts = dict(Counter(n.op_type for n in onnx_model.graph.all_nodes()))
        weight_bytes = _weight_bytes(onnx_model)
        external = weight_bytes > config.external_data_threshold_bytes

        tmp_model = tmp_dir / out_path.name
        try:
            t0 = time.perf_counter()
            step(f"writing {weight_bytes / 2**20:.0f} MiB of weights")
            if external:
                _save_external(onnx_model, tmp_model, data_name)
            else:
                ir.save(onnx_model, tmp_model)
            save_s = time.perf_counter() - t0
        except OSError as e:  # a full disk, a quota
            raise MoecError(f"cannot write {out_path}: {e.strerror or e}; free some space or choose another location") from None
        except Exception as e:
            # onnx-ir wraps what a lazily read weight raised (a non-finite or damaged tensor):
            # the user's error is the innermost MoecError, not the serializer's chain.
            cause = e
            while cause is not None and not isinstance(cause, MoecError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        del onnx_model, model  # the torch weights are no longer needed for the checks

        t0 = time.perf_counter()
        step("checking the graph (onnx.checker)")
        _check_by_path(tmp_model)
        check_s = time.perf_counter() - t0

        sidecar = build_sidecar(llama_config, config, max_positions, data_name if external else None, has_tokenizer)
        if has_tokenizer:
            sidecar["tokenizer_sha256"] = sha256_file(tokenizer_src)
        sidecar["kv_cache"] = kv_cache
        if is_demo_checkpoint(checkpoint_dir):  # `moec run` says its output is noise (common/demo_note.py)
            sidecar[demo_note.SIDECAR_KEY] = True
        if kept_fp8:
            from moec.compiler.export_fp8 import sidecar_record

            sidecar["quantization"] = sidecar_record(checkpoint_dir, kept_fp8)
        write_json_atomic(contract.sidecar_path(tmp_model), sidecar)
        if has_tokenizer:
            shutil.copyfile(tokenizer_src, tmp_dir / contract.TOKENIZER_FILE)

        # The graph goes last: until it is renamed, an old export (if any) stays the readable one.
        final_data = out_path.with_name(data_name)
        moves = []
        if external:
            moves.append((tmp_dir / data_name, final_data))
        moves.append((contract.sidecar_path(tmp_model), contract.sidecar_path(out_path)))
        if has_tokenizer:
            moves.append((tmp_dir / contract.TOKENIZER_FILE, out_path.with_name(contract.TOKENIZER_FILE)))
        moves.append((tmp_model, out_path))
        for src, dst in moves:
            os.replace(src, dst)
        if not external and final_data.is_file():
            final_data.unlink()  # a stale data file of an earlier external export of this name
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        remove_made(made)  # a failed export leaves no empty output folder behind
        raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    return ExportResult(
        onnx_path=out_path,
        external_data_path=out_path.with_name(data_name) if external else None,
        sidecar_path=contract.sidecar_path(out_path),
        tokenizer_path=out_path.with_name(contract.TOKENIZER_FILE) if has_tokenizer else None,
        dtype=config.dtype,
        weight_bytes=weight_bytes,
        max_positions=max_positions,
        op_counts=op_counts,
        export_s=export_s,
        save_s=save_s,
        check_s=check_s,
        total_s=time.perf_counter() - t_start,
    )
