"""Load a Hugging Face Llama 4 checkpoint directory into ``moec.models.Llama4ForCausalLM``.

Accepted: config.json plus model.safetensors, or shards listed by model.safetensors.index.json;
key layouts of Llama4ForCausalLM (``model.layers.N...``, ``lm_head.weight``) and
Llama4ForConditionalGeneration (``language_model.model...``, ``language_model.lm_head.weight``;
the vision tower and projector are left out here and loaded apart by ``load_vision_tower``).

Memory: the module is built on the meta device (no storage), each tensor is read from the
memory-mapped file, cast/moved on its own, and assigned into the module, so the weights are never
held twice. Every problem with the files is a MoecError that names the file and tensor.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moec.common.errors import MoecError
from moec.models.config import CONDITIONAL_GENERATION, Llama4Config, architecture_of
from moec.models.fp8_checkpoint import (FP8_FILE_DTYPES, Fp8Weight, QuantizationConfig, assemble, is_fp8_part,
                                        read_quantization_config)
from moec.models.llama4 import Llama4ForCausalLM

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Key prefix of the text model inside each checkpoint layout.
TEXT_PREFIX = {"causal_lm": "", "conditional_generation": "language_model."}
# Top-level modules of Llama4ForConditionalGeneration that the text model does not use.
_SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")

_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class CheckpointFiles:
    """What a checkpoint directory holds: its config, layout and weight files."""

    directory: Path
    config: Llama4Config
    layout: str  # "causal_lm" | "conditional_generation"
    # shard file -> the tensor keys the index assigns to it (None: every key in the file)
    shards: dict[Path, frozenset[str] | None]
    quantization: QuantizationConfig | None = None  # a pre-quantized (fbgemm_fp8) checkpoint


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch float dtype, or one of fp32/fp16/bf16 (and their long names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in _FLOAT_DTYPES.values():
            raise MoecError(f"dtype {dtype} is not supported; use fp32, fp16 or bf16")
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise MoecError(f"dtype {dtype!r} is not supported; use fp32, fp16 or bf16") from None


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """``path`` as a checkpoint folder: it exists, is a folder, and holds config.json.

    Every command that takes a CHECKPOINT (export, verify, run, compile) goes through here first,
    so a typo or a file given in its place gets the same message everywhere, before any other
    check reads the path as something it is not.
    """
    directory = Path(path)
    if not directory.exists():
        raise MoecError(
            f"{directory} does not exist; give a Hugging Face checkpoint folder (config.json + *.safetensors)"
        )
    if not directory.is_dir():
        raise MoecError(
            f"CHECKPOINT must be a folder (got a file: {directory}); give the Hugging Face checkpoint folder "
            "that holds config.json and the *.safetensors weights"
        )
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise MoecError(f"{config_file}: missing; a checkpoint folder needs config.json beside its weights")
    return directory


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointFiles:
    """Read config.json and find the weight files, without reading any weights."""
    directory = checkpoint_folder(path)
    config_file = directory / CONFIG_FILE
    config = Llama4Config.from_pretrained(config_file)
    raw = json.loads(config_file.read_text())
    multimodal = architecture_of(raw, str(config_file)) == CONDITIONAL_GENERATION
    layout = "conditional_generation" if multimodal else "causal_lm"
    return CheckpointFiles(directory, config, layout, _find_shards(directory),
                           read_quantization_config(raw, str(config_file)))


def _find_shards(directory: Path) -> dict[Path, frozenset[str] | None]:
    index_file = directory / INDEX_FILE
    single = directory / WEIGHTS_FILE
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise MoecError(f"{index_file}: not a safetensors index (needs a 'weight_map' object): {e}") from None
        except OSError as e:
            raise MoecError(f"{index_file}: cannot read it ({e.strerror or e}); check its permissions") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise MoecError(f"{index_file}: 'weight_map' must map tensor names to shard files")
        by_file: dict[Path, set[str]] = {}
        for key, name in weight_map.items():
            if not isinstance(name, str) or Path(name).name != name:
                raise MoecError(f"{index_file}: tensor {key!r} maps to {name!r}, which is not a file name")
            by_file.setdefault(directory / name, set()).add(key)
        for file in by_file:
            if not file.is_file():
                raise MoecError(f"{index_file}: names shard {file.name}, which is not in {directory}")
        return {f: frozenset(keys) for f, keys in sorted(by_file.items())}
    if single.is_file():
        return {single: None}
    other = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pth"))
    hint = f" (found {', '.join(other)}: convert them to safetensors)" if other else ""
    raise MoecError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise MoecError(f"{file}: not a readable safetensors file ({e}); re-download or re-write it") from None
    except OSError as e:
        raise MoecError(f"{file}: cannot open ({e})") from None


def load_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
    allow_nonfinite: bool = False,
) -> Llama4ForCausalLM:
    """Load a checkpoint directory; ``dtype`` casts every weight on load (None keeps the file's).

    A tensor holding NaN or Inf (after the cast: fp32 values beyond fp16's range become Inf) is a
    MoecError naming it: such a model exports and runs "fine" and emits token 0 forever.
    ``allow_nonfinite`` is for a user who knows why their weights hold them."""
    target_dtype = resolve_dtype(dtype)
    ckpt = inspect_checkpoint(path)
    config = ckpt.config

    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")

    state, skipped = _read_text_tensors(ckpt, expected, target_dtype, torch.device(device), allow_nonfinite=allow_nonfinite)
    _check_all_read(ckpt, expected, state, skipped)

    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced the embedding Parameter; re-point lm_head at it
    model.model.rotary_emb.reset_inv_freq(device)
    model.requires_grad_(False)
    return model.eval()


def _check_all_read(ckpt: CheckpointFiles, expected: dict[str, tuple[int, ...]], found, skipped: int) -> None:
    """Every expected tensor was found (else a MoecError naming the first few), and a note for
    the vision/projector tensors that were skipped."""
    prefix = TEXT_PREFIX[ckpt.layout]
    missing = sorted(set(expected) - set(found))
    if missing:
        shown = ", ".join(prefix + m for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise MoecError(f"{ckpt.directory}: missing tensor(s) {shown}{more}")
    if skipped:
        # A warning, not info: the CLI shows warnings of the "moec" loggers on stderr as notes,
        # and a user who hands over a multimodal checkpoint should hear that part of it is unused.
        log.warning(
            "%s: the text model leaves out %d vision/projector tensor(s) of the Llama4ForConditionalGeneration "
            "checkpoint (moec loads the vision tower apart: `moec export --vision`, `moec compile` without "
            "--text-only, `moec run --image`)",
            ckpt.directory,
            skipped,
        )


def _read_text_tensors(
    ckpt: CheckpointFiles, expected: dict[str, tuple[int, ...]], dtype: torch.dtype | None, device: torch.device,
    lazy: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """The text model's tensors, by module name, checked against ``expected`` shapes; and how
    many vision/projector tensors were skipped. Each tensor is cast/moved on its own. ``lazy``:
    every check, but (file, key) in place of each tensor, nothing read beyond the headers."""
    from safetensors import SafetensorError

    prefix = TEXT_PREFIX[ckpt.layout]
    tied = ckpt.config.tie_word_embeddings
    state: dict[str, torch.Tensor] = {}
    fp8_parts: dict[str, torch.Tensor] = {}  # FP8 weights and scales, dequantized after all shards are read
    fp8_file: dict[str, str] = {}
    skipped = 0
    for file, listed in ckpt.shards.items():
        with _open(file) as f:
            keys = set(f.keys())
            if listed is not None and not listed <= keys:
                absent = sorted(listed - keys)
                raise MoecError(
                    f"{ckpt.directory / INDEX_FILE}: lists {len(absent)} tensor(s) in {file.name} that the file "
                    f"does not hold, e.g. {absent[0]!r}"
                )
            for key in sorted(listed if listed is not None else keys):
                if prefix and not key.startswith(prefix):
                    if key.startswith(_SKIPPED_PREFIXES):
                        skipped += 1
                        continue
                    raise MoecError(f"{file}: unexpected tensor {key!r} (not under {prefix!r})")
                name = key[len(prefix) :]
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # a derived buffer some exporters save; recomputed from the config
                if tied and name == "lm_head.weight":
                    continue  # tied: the embedding serves as lm_head
                if ckpt.quantization is not None and (is_fp8_part(name) or f.get_slice(key).get_dtype() in FP8_FILE_DTYPES):
                    fp8_parts[name], fp8_file[name] = f.get_tensor(key), str(file)
                    continue
                if is_fp8_part(name):
                    raise MoecError(f"{file}: tensor {key!r} belongs to an FP8 (fbgemm_fp8) checkpoint, but {CONFIG_FILE} "
                                    "has no quantization_config saying so; use the checkpoint's own config.json")
                if name not in expected:
                    raise MoecError(
                        f"{file}: unexpected tensor {key!r}; it is not part of the Llama 4 text model that "
                        f"{CONFIG_FILE} describes"
                    )
                if name in state:
                    raise MoecError(f"{file}: tensor {key!r} appears in more than one shard")
                try:
                    view = f.get_slice(key)
                    shape, file_dtype = tuple(view.get_shape()), view.get_dtype()
                    if shape != expected[name]:
                        raise MoecError(
                            f"{file}: tensor {key!r} has shape {list(shape)}, expected {list(expected[name])} "
                            f"from {CONFIG_FILE}"
                        )
                    if file_dtype in FP8_FILE_DTYPES:
                        raise MoecError(f"{file}: tensor {key!r} is {file_dtype}, but {CONFIG_FILE} has no "
                                        "quantization_config (fbgemm_fp8) saying how it is scaled; use the checkpoint's "
                                        "own config.json")
                    if file_dtype not in _FLOAT_DTYPES:
                        raise MoecError(
                            f"{file}: tensor {key!r} is {file_dtype}; moec loads fp32, fp16 or bf16 weights "
                            f"(quantized checkpoints are not supported)"
                        )
                    if lazy:
                        state[name] = (file, key)
                        continue
                    tensor = f.get_tensor(key)
                except SafetensorError as e:
                    raise MoecError(f"{file}: cannot read tensor {key!r} ({e}); the file is damaged") from None
                state[name] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                if not allow_nonfinite:
                    _check_finite(file, key, state[name])

    if fp8_parts:
        for name, weight in assemble(fp8_parts, expected, ckpt.quantization, fp8_file).items():
            if name not in expected:
                raise MoecError(f"{ckpt.directory}: unexpected FP8 tensor {prefix + name!r}; it is not part of the Llama 4 "
                                f"text model that {CONFIG_FILE} describes")
            if name in state:
                raise MoecError(f"{ckpt.directory}: {prefix + name!r} is stored both in FP8 and unquantized")
            if weight.shape != expected[name]:
                raise MoecError(f"{ckpt.directory}: FP8 tensor {prefix + name!r} assembles to shape {list(weight.shape)}, "
                                f"expected {list(expected[name])} from {CONFIG_FILE}")
            # Lazy: the FP8 weight itself (the export keeps it FP8; read_tensor dequantizes it).
            state[name] = weight if lazy else weight.dequantized(dtype or torch.bfloat16).to(device=device)
            if not allow_nonfinite:
                # q * scale: a NaN code in the FP8 weight or an Inf scale (dequantized here for the check
                # even when ``lazy``: the parts are already in memory).
                _check_finite(ckpt.directory, f"{prefix}{name} (FP8 weight x scale)",
                              weight.dequantized(torch.float32) if lazy else state[name])
    return state, skipped


_DTYPE_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def stored_dtype(path: str | os.PathLike) -> str:
    """The dtype the checkpoint's text weights are stored in ("fp32" | "fp16" | "bf16"), read from
    the safetensors headers (no weights are read). The tensors decide, not config.json's
    ``torch_dtype``, because that field is only a hint some writers leave stale; mixed float dtypes
    (a checkpoint that keeps norms in fp32, say) fall back to ``torch_dtype``, then to fp32."""
    ckpt = inspect_checkpoint(path)
    prefix = TEXT_PREFIX[ckpt.layout]
    found: set[str] = set()
    for file, listed in ckpt.shards.items():
        with _open(file) as f:
            for key in listed if listed is not None else f.keys():
                if key.startswith(prefix) and not key.startswith(_SKIPPED_PREFIXES):
                    found.add(f.get_slice(key).get_dtype())
    floats = {_FLOAT_DTYPES[d] for d in found if d in _FLOAT_DTYPES}
    if len(floats) == 1:
        return _DTYPE_SHORT[floats.pop()]
    raw = json.loads((ckpt.directory / CONFIG_FILE).read_text())
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    # transformers 5 writes "dtype", older versions "torch_dtype".
    for hint in (raw.get("dtype"), raw.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        if isinstance(hint, str) and hint.lower() in _DTYPE_NAMES:
            return _DTYPE_SHORT[_DTYPE_NAMES[hint.lower()]]
    return "fp32"


def load_pretrained_lazy(
    path: str | Path, dtype: torch.dtype | str | None = None, allow_nonfinite: bool = False,
) -> tuple[Llama4ForCausalLM, dict[str, tuple[Path, str]]]:
    """The model with UNINITIALISED weights (``to_empty``: untouched memory the OS has not backed
    with pages, so it costs no RSS) and, per module weight name, the (shard, key) it is read from.
    Every check of ``load_pretrained`` runs, on the headers only. For tracing (torch.export never
    reads the weights' values): the caller reads each tensor from the file when it needs it
    (``read_tensor``), one at a time. The RoPE buffer, not in checkpoints, is computed."""
    ckpt = inspect_checkpoint(path)
    config = ckpt.config
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    target_dtype = resolve_dtype(dtype)
    if target_dtype is not None:
        model = model.to(target_dtype)
    sources, skipped = _read_text_tensors(ckpt, expected, None, torch.device("cpu"), lazy=True,
                                          allow_nonfinite=allow_nonfinite)
    _check_all_read(ckpt, expected, sources, skipped)
    if config.tie_word_embeddings:
        sources["lm_head.weight"] = sources["model.embed_tokens.weight"]
    model = model.to_empty(device="cpu")
    model.tie_weights()
    model.model.rotary_emb.reset_inv_freq("cpu")
    model.requires_grad_(False)
    return model.eval(), sources


def read_tensor(source: tuple[Path, str] | torch.Tensor, dtype: torch.dtype | None = None,
                allow_nonfinite: bool = False) -> torch.Tensor:
    """One tensor of a checkpoint, by the (shard, key) that ``load_pretrained_lazy`` returned. A
    pre-quantized (FP8) checkpoint's experts come as tensors already: they are assembled from
    several stored tensors (weights and scales) while the headers are read, so they are held."""
    from safetensors import SafetensorError

    if isinstance(source, Fp8Weight):
        return source.dequantized(dtype or torch.bfloat16)
    if isinstance(source, torch.Tensor):
        return source if dtype is None or source.dtype == dtype else source.to(dtype)
    file, key = source
    with _open(file) as f:
        try:
            tensor = f.get_tensor(key)
        except SafetensorError as e:
            raise MoecError(f"{file}: cannot read tensor {key!r} ({e}); the file is damaged") from None
    tensor = tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)
    if not allow_nonfinite:
        _check_finite(file, key, tensor)  # after the cast, like load_pretrained
    return tensor


def _check_finite(file: Path, key: str, tensor: torch.Tensor) -> None:
    # Checked a slice at a time: no mask of the tensor's size (host memory stays at the weights)
    # unless there is something to report.
    flat = tensor.reshape(-1)
    if all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 20)):
        return
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        n_nan, n_bad = int(torch.isnan(tensor).sum()), int(bad.sum())
        raise MoecError(
            f"{file}: tensor {key!r} holds {n_bad} non-finite value(s) ({n_nan} NaN, {n_bad - n_nan} Inf) of "
            f"{tensor.numel()} ({tensor.dtype}); such weights run silently to garbage: fix the checkpoint, load it "
            f"in a wider dtype, or pass --allow-nonfinite-weights if you know why they are there")


def vision_tensor_names(ckpt: CheckpointFiles) -> list[str]:
    """The vision_model.* / multi_modal_projector.* tensor names of a checkpoint (read from its headers only)."""
    names = []
    for file, listed in ckpt.shards.items():
        if listed is None:
            with _open(file) as f:
                listed = f.keys()
        names += [k for k in listed if k.startswith(_SKIPPED_PREFIXES)]
    return sorted(names)


def load_vision_tower(path: str | Path, dtype: torch.dtype | str | None = None):
    """The vision tower + projector (`vision_model.*`, `multi_modal_projector.*`) of a ConditionalGeneration
    checkpoint, as ``moec.models.vision.VisionTower``. ``load_pretrained`` still skips these tensors with its
    note: the text model and the vision tower are loaded (and compiled) apart."""
    from moec.models.vision import VisionConfig, VisionTower, load_vision_state

    target_dtype = resolve_dtype(dtype)
    ckpt = inspect_checkpoint(path)
    if ckpt.layout != "conditional_generation":
        raise MoecError(f"{ckpt.directory}: a text-only checkpoint (no vision tower); drop the image input")
    with open(ckpt.directory / CONFIG_FILE, encoding="utf-8") as f:
        tower = VisionTower(VisionConfig.from_hf_dict(json.load(f)))
    tensors: dict[str, torch.Tensor] = {}
    for file, listed in ckpt.shards.items():
        with _open(file) as f:
            for key in sorted(listed if listed is not None else f.keys()):
                if key.startswith(_SKIPPED_PREFIXES):
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype=target_dtype or tensor.dtype)
    load_vision_state(tower, tensors, str(ckpt.directory))
    tower.requires_grad_(False)
    return tower.eval()
