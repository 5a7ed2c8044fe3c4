"""Hugging Face Hub ids (``meta-llama/Llama-4-Scout-17B-16E-Instruct``) as checkpoints, offline.

``resolve_checkpoint`` turns an id that is not a local path into the snapshot folder the local
Hugging Face cache holds for it (huggingface_hub's own lookup, ``local_files_only``: moec never
downloads), and refuses one that is not cached with the command that downloads it. The cache is
the one huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moec.common.errors import MoecError

# owner/name as the Hub spells repo ids; an absolute or ./relative path never matches.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not text.endswith((".onnx", ".json"))


def hub_cache_dir() -> str | None:
    """The cache to look in, read at call time (huggingface_hub reads its environment once, at
    import, so a HF_HUB_CACHE set later would otherwise be ignored); None: the library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def resolve_checkpoint(text: str | os.PathLike) -> Path:
    """``text`` as a path when it exists or cannot be a Hub id; else the cached snapshot of that id."""
    path = Path(text)
    if path.exists() or not looks_like_hub_id(str(text)):
        return path
    text = str(text)
    where = hub_cache_dir() or "~/.cache/huggingface/hub"
    how = (f"download it first (`hf download {text}`, from huggingface_hub; gated models such as Llama 4 also need "
           "`hf auth login`), or give the checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise MoecError(f"{text} does not exist as a folder, and reading it as a Hugging Face id needs huggingface_hub "
                        f"(pip install huggingface_hub); {how}") from None
    try:
        folder = snapshot_download(text, local_files_only=True, cache_dir=hub_cache_dir())
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise MoecError(f"{text} does not exist as a folder, and the local Hugging Face cache ({where}) does not hold "
                        f"the model {text}; {how}") from None
    return Path(folder)
