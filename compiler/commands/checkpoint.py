"""``moec demo-checkpoint``: write the deterministic random Llama 4 checkpoint (the embedded default)."""

from __future__ import annotations

from pathlib import Path

import click

# The presets of moec.models.PRESETS small enough for random weights (moec.models.demo.MAX_DEMO_PARAMS;
# Scout and Maverick are refused), spelled here so `moec --help` does not import torch; a test
# keeps the two in step.
DEMO_PRESETS = ("llama4-tiny",)


@click.command("demo-checkpoint")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(DEMO_PRESETS), default="llama4-tiny", show_default=True,
              help="Model preset (the presets of moec.models.PRESETS small enough for random weights).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random weights.")
@click.option("--shards", default=1, show_default=True, type=int, help="Number of safetensors shards.")
@click.option(
    "--layout",
    type=click.Choice(["causal_lm", "conditional_generation"]),
    default="causal_lm",
    show_default=True,
    help="Hugging Face key layout: Llama4ForCausalLM or Llama4ForConditionalGeneration.",
)
@click.option("--vision", is_flag=True,
              help="conditional_generation only: add a tiny vision tower and the image tokens (for image prompts).")
def demo_checkpoint(out_dir: Path, preset: str, seed: int, shards: int, layout: str, vision: bool) -> None:
    """Write a random Llama 4 checkpoint with a byte-level tokenizer.json to OUT_DIR."""
    from moec.models.demo import write_demo_checkpoint

    path = write_demo_checkpoint(out_dir, preset=preset, seed=seed, shards=shards, layout=layout, vision=vision)
    files = sorted(p.name for p in path.iterdir())
    click.echo(f"wrote {preset} checkpoint (seed {seed}, {layout}) to {path}: {', '.join(files)}")
