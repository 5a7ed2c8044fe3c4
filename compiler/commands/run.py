"""``moec run``: generate from a checkpoint (torch), a graph (ONNX Runtime) or an engine folder
(TensorRT), and the artifact helpers the other commands share.

``moec run ARTIFACT`` picks the backend from what ARTIFACT is (``--backend`` overrides):
a directory with config.json -> torch; an .onnx file -> ort; a directory with manifest.json -> trt.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
from moec.common import contract, demo_note
from moec.common.demo_note import has_random_weights
from moec.common.errors import MoecError
from moec.common.sidecar import check_tokenizer_belongs
from moec.compiler.commands.conventions import CheckpointPath, dtype_option
from moec.compiler.commands.weights_options import allow_nonfinite_option

BACKENDS = ("torch", "ort", "trt")


def detect_backend(artifact: Path) -> str:
    if artifact.is_dir() and (artifact / contract.ENGINE_MANIFEST).is_file():
        return "trt"
    if artifact.is_dir() and (artifact / contract.LAYER_CHAIN_MANIFEST).is_file():
        return "trt"  # a chain of layer-range engines (runtime/trt_chain.py)
    if artifact.is_dir() and (artifact / contract.PARALLEL_MANIFEST).is_file():
        return "ort"  # a partition folder: its ranks run on ONNX Runtime (runtime/parallel)
    if artifact.is_dir() and (artifact / "config.json").is_file():
        return "torch"
    if artifact.is_file() and artifact.suffix == ".onnx":
        return "ort"
    if not artifact.exists():
        raise MoecError(f"{artifact} does not exist; give a checkpoint directory, an .onnx file or an engine directory")
    raise MoecError(
        f"cannot tell what {artifact} is: expected a checkpoint directory (config.json), an .onnx export, "
        f"or an engine directory ({contract.ENGINE_MANIFEST}); or name one with --backend"
    )


def checkpoint_metadata(checkpoint: Path) -> dict:
    """What the ORT backend needs (the sidecar's keys) from a checkpoint's config.json, for an
    .onnx whose sidecar is not beside it. The dtype is left out: the backend reads it from the graph."""
    from moec.compiler.export import ExportConfig, build_sidecar
    from moec.models import Llama4Config

    llama = Llama4Config.from_pretrained(checkpoint)
    meta = build_sidecar(llama, ExportConfig(), llama.max_position_embeddings, external_data=None, tokenizer=False)
    meta.pop("dtype")
    return meta


def open_backend(artifact: Path, backend: str, dtype: str | None, checkpoint: Path | None = None,
                 allow_nonfinite: bool = False):
    """A ``moec.runtime.backend.Backend`` for ``artifact``; heavy imports happen here."""
    if backend == "torch":
        from moec.models.torch_backend import TorchBackend

        if not artifact.is_dir():
            raise MoecError(f"the torch backend runs a checkpoint directory; {artifact} is not one")
        return TorchBackend.from_checkpoint(artifact, dtype=dtype, allow_nonfinite=allow_nonfinite)
    if dtype is not None:
        raise MoecError(f"--dtype only applies to the torch backend; the {backend} artifact has its own dtype")
    if backend == "ort":
        from moec.runtime.ort_backend import OrtBackend

        metadata = None
        if checkpoint is not None and artifact.is_file() and not contract.sidecar_path(artifact).is_file():
            metadata = checkpoint_metadata(checkpoint)
        return OrtBackend.from_onnx(artifact, metadata=metadata)
    if backend == "trt":
        from moec.runtime.trt_backend import TrtBackend

        if (artifact / contract.LAYER_CHAIN_MANIFEST).is_file():
            from moec.runtime.trt_chain import TrtChainBackend

            return TrtChainBackend.from_engine_dir(artifact)
        return TrtBackend.from_engine_dir(artifact)
    raise MoecError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def artifact_sidecar(artifact: Path) -> dict | None:
    """The moec metadata of an .onnx or an engine folder (None for a checkpoint, or when absent:
    the backend itself reports a missing one)."""
    from moec.common.sidecar import read_sidecar, read_sidecar_file

    if artifact.is_file():
        return read_sidecar(artifact, required=False)
    if (artifact / contract.PARALLEL_MANIFEST).is_file():
        rank0 = contract.sidecar_path(artifact / contract.rank_onnx(0))
        return read_sidecar_file(rank0) if rank0.is_file() else None
    if (artifact / contract.LAYER_CHAIN_MANIFEST).is_file():
        from moec.compiler.build.chain import load_layer_chain

        name = load_layer_chain(artifact)[0].get("sidecar")
        return read_sidecar_file(artifact / name) if name else None
    if (artifact / contract.ENGINE_MANIFEST).is_file():
        from moec.runtime.trt_backend import load_manifest

        name = load_manifest(artifact).get("sidecar")  # checked: a plain file name in the folder
        return read_sidecar_file(artifact / name) if name else None
    return None


def find_tokenizer(artifact: Path, checkpoint: Path | None) -> Path | None:
    """tokenizer.json in (or beside) the artifact, else in --checkpoint."""
    places = [artifact if artifact.is_dir() else artifact.parent]
    if checkpoint is not None:
        places.append(checkpoint)
    from moec.common.confine import side_file

    for p in places:
        tok = side_file(p / contract.TOKENIZER_FILE, f"the tokenizer in {p}",
                        "keep the checkpoint's tokenizer.json as a file in that folder")
        if tok.is_file():
            return tok
    return None


def parse_prompt_ids(text: str) -> list[int]:
    parts = [p for p in re.split(r"[\s,]+", text.strip()) if p]
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise MoecError(f"--prompt-ids must be integers separated by spaces or commas, got {text!r}") from None
    if not ids:
        raise MoecError("--prompt-ids is empty; give at least one token id")
    return ids


def check_prompt_text(prompt: str) -> None:
    """MoecError unless ``prompt`` is text: bytes that are not UTF-8 reach Python as lone
    surrogates (the file system encoding's escape), which no tokenizer can encode."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = prompt[e.start:e.end].encode("utf-8", "surrogateescape")
        raise MoecError(f"--prompt is not valid UTF-8 text (bytes {raw!r} at character {e.start}); pass the prompt "
                        "as UTF-8, or give its token ids with --prompt-ids") from None


def printable(text: str) -> str:
    """``text`` safe for a terminal: every character that is not printable (control bytes such
    as ESC, which start terminal escape sequences, DEL, zero-width and bidi marks) becomes its
    Python escape (``\\x1b``); letters, punctuation, spaces, newlines and tabs stay as they are."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii") for c in text)


@click.command("run")
@click.argument("artifact", type=CheckpointPath())
@click.option("--prompt", help="Prompt text (needs tokenizer.json beside ARTIFACT or in --checkpoint).")
@click.option("--prompt-ids", help='Prompt token ids, e.g. "1 2 3".')
@click.option("--max-new-tokens", type=int, default=None, help="Tokens to generate [default: GenerationConfig's].")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Override the backend picked from ARTIFACT.")
@click.option(
    "--checkpoint",
    type=CheckpointPath(),
    default=None,
    help="Checkpoint to take tokenizer.json (and, for an .onnx without its sidecar, the config) from.",
)
@dtype_option("torch backend only [default: the checkpoint's].")
# Ranges checked here too, so click names the option in its message.
@click.option("--temperature", type=click.FloatRange(min=0), default=None, help="0 = greedy; > 0 samples.")
@click.option("--top-k", type=click.IntRange(min=0), default=None, help="Keep the k most likely tokens; 0 = all.")
@click.option(
    "--top-p", type=click.FloatRange(0, 1, min_open=True), default=None, help="Nucleus mass in (0, 1]; 1 = all."
)
@click.option("--seed", type=click.IntRange(min=0), default=None, help="Sampling seed (numpy needs >= 0).")
@click.option("--json", "as_json", is_flag=True, help="Print generated ids and timings as JSON.")
@click.option("--rank-timeout", type=click.FloatRange(min=1), default=None,
              help="Partition folders: seconds a rank waits for a silent peer before all stop [default: 120].")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="An image for the prompt (repeatable); goes at the prompt's n-th <|image|>, else before the text.")
@allow_nonfinite_option
def run(artifact, prompt, prompt_ids, max_new_tokens, backend, checkpoint, dtype, temperature, top_k, top_p, seed, as_json,
        rank_timeout, allow_nonfinite_weights, images=()):
    """Generate from ARTIFACT: a checkpoint directory, an .onnx export or an engine directory."""
    from moec.runtime.generate import GenerationConfig, generate

    if (prompt is None) == (prompt_ids is None):
        raise MoecError("give exactly one of --prompt TEXT or --prompt-ids \"1 2 3\"")
    if prompt is not None:
        check_prompt_text(prompt)
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    gen_config = GenerationConfig(**{k: v for k, v in options.items() if v is not None})
    backend = backend or detect_backend(artifact)
    if allow_nonfinite_weights and backend != "torch":
        raise MoecError(f"--allow-nonfinite-weights applies to a checkpoint (the torch backend); the {backend} "
                        "artifact's weights were checked, or let through, when it was exported")
    if checkpoint is not None:
        from moec.models.checkpoint import checkpoint_folder

        checkpoint_folder(checkpoint)

    from moec.compiler.export import load_tokenizer

    tokenizer, tokenizer_problem = None, None
    tok_path = find_tokenizer(artifact, checkpoint)
    if tok_path is not None:
        fix = "copy the checkpoint's tokenizer.json over it or re-export the model"

        def usable_tokenizer(what_to_do: str):
            tok = load_tokenizer(tok_path, what_to_do)
            # A readable tokenizer of another model would encode the prompt wrongly, silently.
            check_tokenizer_belongs(tok_path, artifact_sidecar(artifact), artifact)
            return tok

        if prompt is not None:
            tokenizer = usable_tokenizer(f"{fix}, or give --prompt-ids instead of --prompt")
        else:
            # Ids in, ids out: generation needs no tokenizer; only the text of the output is lost.
            try:
                tokenizer = usable_tokenizer(f"{fix} to see the output as text")
            except MoecError as e:
                tokenizer_problem = str(e)
    if prompt is not None:
        if tokenizer is None:
            where = artifact if artifact.is_dir() else artifact.parent
            raise MoecError(
                f"--prompt needs {contract.TOKENIZER_FILE}, found neither in {where}"
                + (f" nor in {checkpoint}" if checkpoint else "")
                + "; pass --checkpoint DIR or use --prompt-ids"
            )
        ids = tokenizer.encode(prompt).ids
    else:
        ids = parse_prompt_ids(prompt_ids)

    if backend == "ort" and artifact.is_dir() and (artifact / contract.PARALLEL_MANIFEST).is_file():
        _run_ranks(artifact, ids, gen_config, tokenizer, as_json, rank_timeout)
        return
    if images and backend == "ort" and artifact.is_dir():
        raise MoecError(f"--image is not supported for the partition folder {artifact}; run an .onnx export")
    be = open_backend(artifact, backend, dtype, checkpoint, allow_nonfinite=allow_nonfinite_weights)
    image_prompt = None
    if images:
        from moec.compiler.image_inputs import open_vision_encoder, prepare_image_prompt

        encoder = open_vision_encoder(artifact, backend)
        if getattr(be, "image_token_id", None) is None:
            raise MoecError(f"{artifact} takes no image features (a text-only export); export with --vision")
        bos = tokenizer.token_to_id("<|begin_of_text|>") if tokenizer is not None else None
        image_prompt = prepare_image_prompt(images, ids, tokenizer, encoder, bos, be.image_token_id)
        ids = image_prompt.ids
    if image_prompt is None:
        result = generate(be, ids, gen_config)
    else:
        result = generate(be, ids, gen_config, image_features_NH=image_prompt.features_NH)
    new_ids = result.new_tokens[0]
    text = tokenizer.decode(new_ids) if tokenizer is not None else None
    if tokenizer_problem is not None:
        click.echo(f"note: printing token ids, not text: {tokenizer_problem}", err=True)
    random_weights = has_random_weights(artifact, artifact_sidecar(artifact))
    if random_weights and not as_json:  # --json says it as "random_weights"
        click.echo(demo_note.NOTE, err=True)
        if image_prompt is not None:
            click.echo(demo_note.IMAGE_NOTE, err=True)
    if as_json:
        out = {"backend": be.name, "prompt_ids": ids, "ids": new_ids, "text": text, **result.to_dict(), "describe": be.describe(),
               "random_weights": random_weights}
        if image_prompt is not None:
            out["vision"] = {"encoder_s": image_prompt.vision_s, "tiles_hw": image_prompt.tiles_hw,
                             "image_rows": int(image_prompt.features_NH.shape[0])}
        click.echo(json.dumps(out))
        return
    # --json keeps the exact text; a terminal gets it escaped (a random or hostile model can emit
    # bytes that would drive the terminal).
    click.echo(printable(text) if text is not None else " ".join(map(str, new_ids)))
    click.echo(
        f"[{be.name}] {len(ids)} prompt + {len(new_ids)} new tokens ({result.finish_reasons[0]}): "
        f"prefill {result.prefill_s * 1e3:.1f} ms, decode {result.decode_tokens_per_s:.1f} tok/s"
        + (f", vision encoder {image_prompt.vision_s * 1e3:.1f} ms ({len(images)} image(s))" if image_prompt else ""),
        err=True,
    )


def _run_ranks(folder: Path, ids: list[int], gen_config, tokenizer, as_json: bool, timeout_s: float | None = None) -> None:
    """A partition folder: every rank in its own process (spawned here, or by torchrun); only
    rank 0 prints."""
    from moec.runtime.parallel.launch import LaunchConfig, run_parallel

    out = run_parallel(folder, ids, gen_config, LaunchConfig.with_timeout(timeout_s))
    if out is None:  # a torchrun rank other than 0
        return
    new_ids = out["new_tokens"][0]
    text = tokenizer.decode(new_ids) if tokenizer is not None else None
    kind = "trt" if out["describe"].get("backend") == "trt-parallel" else "ort"
    if as_json:
        click.echo(json.dumps({"backend": kind, "prompt_ids": ids, "ids": new_ids, "text": text, **out}))
        return
    click.echo(printable(text) if text is not None else " ".join(map(str, new_ids)))
    t = out["timings"]
    click.echo(f"[{kind} x{out['describe']['world_size']} ranks] {len(ids)} prompt + {len(new_ids)} new tokens "
               f"({out['finish_reasons'][0]}): prefill {t['prefill_s'] * 1e3:.1f} ms, decode {t['decode_tokens_per_s']:.1f} tok/s",
               err=True)
