"""``moec plan``: a thin layer over ``moec.compiler.plan.plan`` (config.json only, no weights)."""

from __future__ import annotations

import json

import click

from moec.compiler.commands.conventions import CheckpointPath
from moec.compiler.plan import GPUS, PlanConfig


@click.command("plan")
@click.argument("checkpoint", type=CheckpointPath())
@click.option("--gpu", type=click.Choice(sorted([*GPUS, "a100"]), case_sensitive=False), default=PlanConfig.gpu,
              show_default=True, help="GPU to fit (a100 means a100-80).")
@click.option("--gpus", type=click.IntRange(min=1), default=None,
              help="GPUs (ranks) to split over [default: every world size of 1, 2, 4, 8].")
@click.option("--context", type=click.IntRange(min=2), default=None,
              help="Positions per sequence [default: min(the model's, 8192), as moec build].")
@click.option("--batch", type=click.IntRange(min=1), default=PlanConfig.batch, show_default=True,
              help="Sequences held at once (KV cache and the largest step).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(checkpoint, gpu, gpus, context, batch, as_json) -> None:
    """Memory per rank of CHECKPOINT (a checkpoint folder or its config.json) on --gpu: weights, KV
    cache at the context, an activation estimate, whether it fits, and a recommendation, for every
    expert precision and tp x ep layout."""
    from moec.compiler.plan import format_plan
    from moec.compiler.plan import plan as make_plan
    from moec.models import Llama4Config

    cfg = Llama4Config.from_pretrained(checkpoint)
    result = make_plan(cfg, PlanConfig(gpu=gpu, gpus=gpus, context=context, batch=batch))
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result))
