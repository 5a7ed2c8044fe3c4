"""moec: compile Mixture-of-Experts transformers (Llama 4 first) into TensorRT engines.

The stages are the subpackages (``moec.models``, ``moec.compiler``, ``moec.passes``,
``moec.runtime``, ``moec.common``: the top-level folders, see README "Layout"). This file only
names the installed version, so ``import moec`` stays as light as it is.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("moec")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
