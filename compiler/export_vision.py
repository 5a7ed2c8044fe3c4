"""``moec export --vision``: the vision tower + projector of a ConditionalGeneration checkpoint as its own ONNX graph
(OUT.vision.onnx, a dynamic number of tiles) with its metadata (OUT.vision.moec.json): what the runtime needs to
turn an image file into the features that replace the text graph's <|patch|> embeddings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from moec.common import contract
from moec.common.artifacts import atomic_file_set, write_json_atomic
from moec.common.errors import MoecError
from moec.runtime.vision import (DIM_TILES, FEATURES, PIXELS, VISION_FORMAT,  # noqa: F401 (names of one contract)
                                 read_vision_metadata, vision_onnx_path)


@dataclass(frozen=True)
class VisionExportConfig:
    dtype: str = "fp32"
    max_tiles: int = 64  # upper bound of the dynamic tile dimension (images x (tiles + the global tile))
    opset: int = 18
    # Weights above this many bytes go to one external-data file OUT.vision.onnx.data (protobuf's limit is 2 GiB;
    # Scout's and Maverick's towers are 3.5 GB in fp32): the text export's threshold.
    external_data_threshold_bytes: int = 1 << 30


def has_vision_tower(checkpoint_dir: str | os.PathLike) -> bool:
    """Whether ``moec compile`` should compile a vision graph too: a ConditionalGeneration config.json with a
    vision_config and an image_token_index, and vision_model.* tensors in the weights (a checkpoint whose vision
    weights were dropped, or a test config without them, compiles text only)."""
    from moec.models.checkpoint import inspect_checkpoint, vision_tensor_names

    ckpt = inspect_checkpoint(checkpoint_dir)
    hf = json.loads((ckpt.directory / "config.json").read_text())
    if ckpt.layout != "conditional_generation" or not isinstance(hf.get("vision_config"), dict):
        return False
    return "image_token_index" in hf and any(n.startswith("vision_model.") for n in vision_tensor_names(ckpt))


def image_token_id_of(checkpoint_dir: str | os.PathLike) -> int:
    """The <|patch|> token id of a multimodal checkpoint (its vision config checked too); MoecError for text-only."""
    from moec.models.checkpoint import checkpoint_folder

    return vision_metadata(checkpoint_folder(checkpoint_dir), VisionExportConfig())["image_token_id"]


def vision_metadata(checkpoint_dir: Path, config: VisionExportConfig) -> dict:
    """The vision graph's sidecar: the preprocessing settings, the image token ids and the graph's I/O."""
    from moec.models.image_processing import ImageProcessingConfig
    from moec.models.image_prompt import patches_per_tile
    from moec.models.vision import VisionConfig

    hf = json.loads((checkpoint_dir / "config.json").read_text())
    vision = VisionConfig.from_hf_dict(hf)
    processing = ImageProcessingConfig.from_checkpoint(checkpoint_dir, vision.image_size)
    if "image_token_index" not in hf:
        raise MoecError(f"{checkpoint_dir / 'config.json'} has no image_token_index (the <|patch|> token id); "
                        "a Llama4ForConditionalGeneration config.json has one")
    return {
        "format": VISION_FORMAT, "version": 1, "dtype": config.dtype,
        "tile_size": processing.tile_size, "max_tiles_per_image": processing.max_tiles,
        "resize_to_max_canvas": processing.resize_to_max_canvas, "patch_size": vision.patch_size,
        "pixel_shuffle_ratio": vision.pixel_shuffle_ratio,
        "patches_per_tile": patches_per_tile(vision.image_size, vision.patch_size, vision.pixel_shuffle_ratio),
        "text_hidden_size": vision.text_hidden_size, "image_token_id": int(hf["image_token_index"]),
        "max_tiles": config.max_tiles,
        "io": {"inputs": [PIXELS], "outputs": [FEATURES]}, "dynamic_dims": {"tiles": DIM_TILES},
    }


def export_vision_onnx(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike,
                       config: VisionExportConfig = VisionExportConfig(), tower=None) -> Path:
    """Export the vision tower of ``checkpoint_dir`` to ``out_path`` (+ its .moec.json); returns ``out_path``.
    ``tower``: the tower already loaded in ``config.dtype`` (the CLI loads it before the text export, so bad
    vision weights fail before anything is written)."""
    import torch

    from moec.compiler.export import torch_dtype
    from moec.models.checkpoint import checkpoint_folder, load_vision_tower

    checkpoint_dir = checkpoint_folder(checkpoint_dir)
    out_path = Path(out_path)
    meta = vision_metadata(checkpoint_dir, config)
    if tower is None:
        tower = load_vision_tower(checkpoint_dir, dtype=torch_dtype(config.dtype))
    side = meta["tile_size"]
    tiles = torch.export.Dim(DIM_TILES, min=1, max=config.max_tiles)
    sample = torch.zeros(2, 3, side, side, dtype=torch_dtype(config.dtype))
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(tower, (sample,), dynamo=True, dynamic_shapes=({0: tiles},),
                                    input_names=[PIXELS], output_names=[FEATURES], opset_version=config.opset,
                                    verbose=False)
    import onnx_ir as ir

    weight_bytes = sum(v.const_value.nbytes for v in program.model.graph.initializers.values()
                       if v.const_value is not None)
    external = weight_bytes > config.external_data_threshold_bytes
    data_name = out_path.name + ".data"
    # Saved here, not with program.save: over its own 1.5 GiB threshold that names the data file after the
    # temporary graph file, which would leave the weights under a temporary name beside the export.
    with atomic_file_set(out_path) as tmp:
        ir.save(program.model, tmp / out_path.name, external_data=data_name if external else None)
        write_json_atomic(contract.sidecar_path(tmp / out_path.name), meta)
    if not external:
        (out_path.parent / data_name).unlink(missing_ok=True)  # of an earlier external export of this name
    return out_path


def vision_weight_bytes(hf_config: dict, dtype: str) -> int:
    """The vision graph's weight bytes (the tower's parameters and buffers in ``dtype``) from config.json alone:
    the tower is built on the meta device, so nothing is read or allocated."""
    import torch

    from moec.compiler.export import torch_dtype
    from moec.models.vision import VisionConfig, VisionTower

    with torch.device("meta"):
        tower = VisionTower(VisionConfig.from_hf_dict(hf_config))
    itemsize = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    return sum(t.numel() for t in (*tower.parameters(), *tower.buffers())) * itemsize


def export_text_and_vision(checkpoint_dir: str | os.PathLike, out_path: str | os.PathLike, config, vision_config:
                           VisionExportConfig = VisionExportConfig(), tower=None):
    """The text graph (``moec.compiler.export.export_onnx`` with ``config``) and its vision graph beside it, as one
    set: the vision graph is exported first into the temporary folder of an ``atomic_file_set``, then the text graph
    (itself renamed into place only once complete), then the set renames the vision files beside it. A failure in
    either export leaves neither (and no earlier export of the pair is touched); returns (the text export's result,
    the vision graph's path)."""
    from moec.compiler.export import export_onnx

    out_path = Path(out_path)
    final_vision = vision_onnx_path(out_path)
    data = final_vision.with_name(final_vision.name + ".data")
    with atomic_file_set(final_vision) as tmp:
        export_vision_onnx(checkpoint_dir, tmp / final_vision.name, vision_config, tower=tower)
        external = (tmp / data.name).exists()
        result = export_onnx(checkpoint_dir, out_path, config)
    if not external:  # of an earlier external export of this name (export_vision_onnx saw only the temporary folder)
        data.unlink(missing_ok=True)
    return result, final_vision
