"""Per-layer KV cache kinds of a moec export, as its sidecar records them (``kv_cache``).

Llama 4's chunked-attention layers (3 in 4) only ever attend within one attention chunk, so the
export gives them a ring of ``slots`` cache slots (position p at slot p mod slots; the graph masks
slots outside the query's chunk), while NoPE layers keep a full cache that grows with the context.
Export writes the list, ``validate_kv_cache`` refuses a damaged one (``validate_sidecar`` calls it),
and the runtime backends, the build stage's profiles and ``inspect`` read it through ``cache_layout``
so every stage sizes the cache the same way. A sidecar without the list (an export from before
rings) means a full cache on every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from moec.common.errors import MoecError

KIND_CHUNKED = "chunked"  # a ring of `slots` slots, static in the graph
KIND_FULL = "full"  # grows with the context; `slots` is the most it holds (max_positions)
KINDS = (KIND_CHUNKED, KIND_FULL)
_ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


@dataclass(frozen=True)
class LayerCache:
    layer: int
    kind: str
    slots: int

    @property
    def ring(self) -> bool:
        return self.kind == KIND_CHUNKED

    def slots_at(self, context: int) -> int:
        """Slots this layer's cache holds at a context of ``context`` tokens."""
        return self.slots if self.ring else context


def validate_kv_cache(meta: dict, source) -> None:
    """Refuse a ``kv_cache`` that is not one {"layer", "kind", "slots"} per layer, in order."""
    if "kv_cache" not in meta:
        return
    entries, L = meta["kv_cache"], meta["num_layers"]
    redo = "re-export the model with `moec export`"
    if not isinstance(entries, list) or len(entries) != L:
        raise MoecError(f"the moec metadata {source}: kv_cache must list one entry per layer ({L}); {redo}")
    for i, e in enumerate(entries):
        ok = (
            isinstance(e, dict)
            and set(e) == {"layer", "kind", "slots"}
            and e["layer"] == i
            and e["kind"] in KINDS
            and isinstance(e["slots"], int)
            and not isinstance(e["slots"], bool)
            and e["slots"] >= 1
        )
        if not ok:
            raise MoecError(
                f"the moec metadata {source}: kv_cache[{i}] must be {{\"layer\": {i}, \"kind\": "
                f"\"chunked\" | \"full\", \"slots\": a positive integer}}, got {e!r}; {redo}"
            )


def cache_layout(meta: dict) -> list[LayerCache]:
    """Per layer, its cache (a validated sidecar); all full when the sidecar predates rings."""
    entries = meta.get("kv_cache")
    if entries is None:
        return [LayerCache(i, KIND_FULL, int(meta["max_positions"])) for i in range(int(meta["num_layers"]))]
    return [LayerCache(e["layer"], e["kind"], e["slots"]) for e in entries]


def graph_cache_layout(meta: dict, past_key_shapes: list, source) -> list[LayerCache]:
    """Per layer, its cache as the graph itself declares it (``past_key.i`` shapes [B, K, slots,
    D], in layer order): a fixed slot axis is a chunked layer's ring, a dynamic one (a name or
    None) a full cache. The graph decides, so a graph run without its sidecar (metadata rebuilt
    from a checkpoint, which cannot know the export's caches) still gets its rings; a sidecar
    whose ``kv_cache`` says otherwise is refused."""
    positions = int(meta["max_positions"])
    layout = [LayerCache(i, KIND_CHUNKED, shape[2]) if isinstance(shape[2], int) else LayerCache(i, KIND_FULL, positions)
              for i, shape in enumerate(past_key_shapes)]
    if "kv_cache" in meta:
        for said, has in zip(cache_layout(meta), layout):
            if said.kind != has.kind or (has.ring and said.slots != has.slots):
                raise MoecError(
                    f"{source}: the moec metadata says layer {said.layer}'s KV cache is {said.kind} with {said.slots} "
                    f"slots, the graph's past_key.{said.layer} is {has.kind}"
                    + (f" with {has.slots} slots" if has.ring else "")
                    + "; the metadata belongs to another export: re-export the model with `moec export`"
                )
    return layout


def kv_bytes_per_sequence(layout: list[LayerCache], context: int, kv_heads: int, head_dim: int, dtype: str) -> dict[str, int]:
    """KV bytes one sequence holds at ``context`` tokens, per cache kind (keys and values)."""
    per_slot = 2 * kv_heads * head_dim * _ELEMENT_BYTES[dtype]
    out = {kind: 0 for kind in KINDS}
    for c in layout:
        out[c.kind] += per_slot * c.slots_at(context)
    return out


def format_kv_bytes(by_kind: dict[str, int], context: int) -> str:
    """One line: total and per kind, in MiB."""
    mib = 1 << 20
    total = sum(by_kind.values())
    parts = ", ".join(f"{kind} {by_kind[kind] / mib:.2f} MiB" for kind in KINDS)
    return f"KV cache per sequence at {context} tokens: {total / mib:.2f} MiB ({parts})"


# TensorRT / ONNX dtype names of a cache tensor -> bytes per element.
_IO_DTYPE_BYTES = {"float": 4, "float32": 4, "half": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp8": 1}


def kv_bytes_from_io(inputs: list[dict], context: int) -> dict[str, int]:
    """KV bytes one sequence holds at ``context`` tokens, per cache kind, from an engine's (or a
    graph's) inputs as ``{"name", "dtype", "shape"}``: a ``past_*`` input whose slot axis is fixed
    is a chunked layer's ring (that many slots at any context), a dynamic one (-1 or a name) a
    full cache (``context`` slots)."""
    out = {kind: 0 for kind in KINDS}
    for t in inputs:
        if not t["name"].startswith(("past_key.", "past_value.")):
            continue
        _, kv_heads, slots, head_dim = t["shape"]
        ring = isinstance(slots, int) and slots >= 0
        out[KIND_CHUNKED if ring else KIND_FULL] += kv_heads * head_dim * (slots if ring else context) * _IO_DTYPE_BYTES[t["dtype"]]
    return out
