"""``moec export``: a checkpoint to a moec ONNX graph."""

from __future__ import annotations

from pathlib import Path

import click
from moec.common import progress
from moec.compiler.commands.conventions import CheckpointPath, dtype_option
from moec.compiler.commands.weights_options import allow_nonfinite_option


@click.command("export")
@click.argument("checkpoint", type=CheckpointPath())
@click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path), help="OUT.onnx")
@dtype_option("[default: the dtype the checkpoint's weights are stored in]")
@click.option("--max-batch", type=int, default=None)
@click.option("--max-seq", type=int, default=None, help="Longest sequence the export accepts [default: the model's].")
@click.option(
    "--external-data-threshold",
    type=int,
    default=None,
    help="Weights above this many bytes go to OUT.onnx.data [default: 1 GiB].",
)
@allow_nonfinite_option
@click.option("--vision", is_flag=True,
              help="Multimodal checkpoint: also OUT.vision.onnx (vision tower + projector), and an image_features "
                   "input on the text graph.")
@click.option("--fp8-weights", type=click.Choice(["keep", "dequantize"]), default=None,
              help="An FP8 (fbgemm_fp8) checkpoint: keep its FP8 weights and scales, or write q * scale in --dtype "
                   "[default: keep].")
def export(checkpoint, output, dtype, max_batch, max_seq, external_data_threshold, allow_nonfinite_weights, vision=False,
           fp8_weights=None):
    """Export CHECKPOINT (a Hugging Face Llama 4 directory) to one ONNX graph for prefill and decode."""
    from moec.compiler.export import ExportConfig, export_onnx

    options = dict(dtype=dtype, max_batch=max_batch, max_seq=max_seq, external_data_threshold_bytes=external_data_threshold,
                   allow_nonfinite_weights=allow_nonfinite_weights or None, fp8_weights=fp8_weights)
    vision_files, tower = [], None
    if vision:
        from moec.compiler.export_vision import image_token_id_of
        from moec.models.checkpoint import load_vision_tower

        options["image_token_id"] = image_token_id_of(checkpoint)
        # The vision graph runs on the host's ONNX Runtime too, which has no bf16 kernels: fp16 or fp32.
        vision_dtype = "fp16" if dtype == "fp16" else "fp32"
        tower = load_vision_tower(checkpoint, dtype=vision_dtype)  # bad vision weights fail before any file is written
    config = ExportConfig(**{k: v for k, v in options.items() if v is not None})
    with progress.shown(f"moec export {checkpoint.name}"):
        if vision:
            from moec.common import contract
            from moec.compiler.export_vision import VisionExportConfig, export_text_and_vision

            # One set: a failure in either graph leaves neither (compiler/export_vision.py).
            r, v = export_text_and_vision(checkpoint, output, config, VisionExportConfig(
                dtype=vision_dtype, external_data_threshold_bytes=config.external_data_threshold_bytes), tower=tower)
            data = v.with_name(v.name + ".data")
            vision_files = [v, data if data.is_file() else None, contract.sidecar_path(v)]
        else:
            r = export_onnx(checkpoint, output, config)
    files = [r.onnx_path, r.external_data_path, r.sidecar_path, r.tokenizer_path, *vision_files]
    click.echo(
        f"exported {r.dtype} ({r.weight_bytes / 2**20:.1f} MiB of weights, max {r.max_positions} positions) "
        f"in {r.total_s:.1f} s: {', '.join(str(f) for f in files if f is not None)}"
    )
