"""The PyTorch reference backend: runs ``Llama4ForCausalLM`` one step at a time for the
backend-agnostic generation loop (moec.runtime.generate).

It implements runtime/backend.py's ``Backend`` protocol by shape (duck typing): models/ sits
upstream of runtime/ and must not import it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moec.common.errors import MoecError
from moec.common.token_ids import bad_token_ids_message
from moec.models.checkpoint import load_pretrained, resolve_dtype
from moec.models.config import Llama4Config
from moec.models.llama4 import KVCache, Llama4ForCausalLM


@dataclass(frozen=True)
class TorchKVCache:
    """Per layer ``(key, value)`` torch tensors in the model's ``cache_kinds`` layout (a ring's
    length is fixed, so P = ``past_len`` is counted, not read from a shape)."""

    layers: KVCache
    batch_size: int
    past_len: int = 0


class TorchBackend:
    name = "torch"

    def __init__(self, model: Llama4ForCausalLM | str | os.PathLike, config: Llama4Config | None = None,
                 max_positions: int | None = None, **options):
        """``max_positions``: the context to serve (default: the model's); the chunked layers'
        rings are sized for it as an export of that context sizes them, so caches compare."""
        if isinstance(model, (str, os.PathLike)):
            # TorchBackend("checkpoint_dir", dtype="bf16") is the call users try first: from_checkpoint's.
            self.__dict__.update(type(self).from_checkpoint(model, max_positions=max_positions, **options).__dict__)
            return
        from moec.models.llama4 import default_ring_slots

        self.model = model.eval()
        self.config = config or model.config
        self.max_positions = max_positions or self.config.max_position_embeddings
        if max_positions is not None and model.ring_slots is not None:
            model.ring_slots = default_ring_slots(self.config, max_positions)
        self.eos_token_ids = tuple(self.config.eos_token_ids)
        weight = model.model.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.image_token_id: int | None = None  # set by from_checkpoint for a multimodal checkpoint

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, dtype: torch.dtype | str | None = None, device: str = "cpu",
        allow_nonfinite: bool = False, max_positions: int | None = None,
    ) -> TorchBackend:
        model = load_pretrained(path, dtype=resolve_dtype(dtype), device=device, allow_nonfinite=allow_nonfinite)
        backend = cls(model, model.config, max_positions)
        import json

        backend.image_token_id = json.loads((Path(path) / "config.json").read_text()).get("image_token_index")
        return backend

    def follow_kv_cache(self, layout) -> None:
        """Use the cache layout of an export (``moec.common.kv_cache.cache_layout``): the same
        ring slots on chunked layers, or full caches, so both backends' caches compare."""
        rings = {c.slots for c in layout if c.ring}
        if len(rings) > 1:
            raise MoecError(f"chunked layers with different ring sizes {sorted(rings)}; moec exports one size")
        self.model.ring_slots = rings.pop() if rings else None

    def init_cache(self, batch_size: int) -> TorchKVCache:
        if batch_size < 1:
            raise MoecError(f"batch size must be at least 1, got {batch_size}")
        return TorchKVCache(self.model.empty_cache(batch_size), batch_size, 0)

    def forward(
        self, input_ids_BS: np.ndarray, position_ids_BS: np.ndarray, cache: TorchKVCache,
        image_features_NH: np.ndarray | None = None,
    ) -> tuple[np.ndarray, TorchKVCache]:
        ids = np.asarray(input_ids_BS)
        pos = np.asarray(position_ids_BS)
        if ids.ndim != 2 or ids.shape != pos.shape or ids.shape[1] == 0:
            raise MoecError(
                f"input_ids {ids.shape} and position_ids {pos.shape} must both be [batch, new_tokens] with new_tokens >= 1"
            )
        if ids.shape[0] != cache.batch_size:
            raise MoecError(f"input batch {ids.shape[0]} does not match the cache's batch {cache.batch_size}")
        vocab = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise MoecError(bad_token_ids_message(ids.tolist(), pos.tolist(), vocab))
        end = cache.past_len + ids.shape[1]
        if end > self.max_positions:
            raise MoecError(f"sequence of {end} tokens exceeds the model's {self.max_positions} positions")
        with torch.inference_mode():
            ids_BS = torch.from_numpy(ids.astype(np.int64)).to(self.device)
            embeds_BSH = None
            if image_features_NH is not None:
                from moec.models.image_prompt import merge_image_features

                if self.image_token_id is None:
                    raise MoecError("this checkpoint's config.json has no image_token_index: it takes no images")
                embeds_BSH = merge_image_features(self.model.model.embed_tokens(ids_BS), ids_BS,
                                                  torch.from_numpy(np.asarray(image_features_NH)).to(self.device),
                                                  self.image_token_id)
            logits_BSV, present = self.model(
                ids_BS,
                torch.from_numpy(pos.astype(np.int64)).to(self.device),
                cache.layers,
                inputs_embeds_BSH=embeds_BSH,
            )
        return logits_BSV.float().cpu().numpy(), TorchKVCache(present, cache.batch_size, end)

    def describe(self) -> dict[str, str]:
        return {
            "backend": self.name,
            "torch": torch.__version__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "threads": str(torch.get_num_threads()),
            "cpu": platform.processor() or platform.machine(),
        }
