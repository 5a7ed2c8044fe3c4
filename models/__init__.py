"""moec.models: the Llama 4 MoE text model in plain PyTorch and Hugging Face checkpoint loading.

``load_pretrained(dir)`` returns a ``Llama4ForCausalLM``; ``moec.models.demo.write_demo_checkpoint``
writes the small random checkpoint every stage's tests and the main job start from.
"""

from moec.models.checkpoint import load_pretrained
from moec.models.config import PRESETS, Llama4Config, RopeParameters
from moec.models.llama4 import Llama4ForCausalLM

__all__ = ["PRESETS", "Llama4Config", "Llama4ForCausalLM", "RopeParameters", "load_pretrained"]
