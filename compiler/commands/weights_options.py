"""``--allow-nonfinite-weights``: one spelling and one meaning for every command that reads a
checkpoint's weights (export, verify, compile, run on a checkpoint). The loader refuses a tensor
holding NaN or Inf (moec.models.checkpoint) and its message names this flag.

Commands that read an ONNX graph or an engine (optimize, build, bench, run on either) do not
check again and so offer no flag: their weights were checked, or let through by this flag, when
the checkpoint was exported, and re-reading every weight of a large model to check it again
would cost a full pass over its files.
"""

from __future__ import annotations

import click

allow_nonfinite_option = click.option(
    "--allow-nonfinite-weights", is_flag=True,
    help="Load checkpoint weights that hold NaN or Inf (refused by default: such a model runs to garbage).")
