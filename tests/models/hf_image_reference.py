"""transformers' Llama4ImageProcessor and Llama4Processor, the references for moec's image preprocessing and
prompt layout (imported by tests/models as ``hf_image_reference``).

transformers 5.24's Llama4 image processor needs torchvision. The torchvision wheels PyPI has for torch 2.13 are
CUDA builds whose C extension cannot load on a CPU-only torch; its Python transforms (all the processor uses) work,
but importing the package fails while registering fake kernels for the missing C ops. The stand-in module below
skips only that registration; nothing of it is on the processor's path."""

from __future__ import annotations

import sys
import types

import pytest


def hf_image_processor_class():
    """transformers' Llama4ImageProcessor, or a skip where transformers or torchvision is not installed."""
    pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("torchvision is not installed (the transformers Llama4 image processor needs it)")
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401
    from transformers.models.llama4.image_processing_llama4 import Llama4ImageProcessor

    return Llama4ImageProcessor
