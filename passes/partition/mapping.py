"""Which rank holds what: one object answers it for every stage (after TensorRT-LLM's mapping.py).

World = tp x ep ranks, tp fastest: rank = ep_rank * tp + tp_rank, so a tensor-parallel group is
``tp`` consecutive ranks (on one host's NVLink island when tp <= GPUs per host).

- Attention: kv heads split over the tp group, each rank keeping the query heads of its kv heads
  (GQA intact); replicated across ep groups. The KV cache follows the kv heads.
- Dense MLPs (non-MoE layers): intermediate split over the tp group.
- MoE layers: routed experts split over ep (E/ep per ep group), each expert's intermediate split
  over the tp group; the shared expert's intermediate split over the whole world. Every rank's
  partial sums then add up to the block's output with ONE world all-reduce per MoE layer.
- Router, norms, embedding and vocab projection: replicated (partition.plan says why).
"""

from __future__ import annotations

import dataclasses

from moec.common.errors import MoecError


@dataclasses.dataclass(frozen=True)
class Mapping:
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name, n in (("tp", self.tp), ("ep", self.ep)):
            if not isinstance(n, int) or n < 1:
                raise MoecError(f"--{name} must be a whole number >= 1, got {n!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.ep

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise MoecError(f"rank {rank} is outside the world of {self.world_size} ranks (tp {self.tp} x ep {self.ep})")

    def tp_rank(self, rank: int) -> int:
        return rank % self.tp

    def ep_rank(self, rank: int) -> int:
        return rank // self.tp

    def tp_group(self, rank: int) -> tuple[int, ...]:
        first = self.ep_rank(rank) * self.tp
        return tuple(range(first, first + self.tp))

    def tp_groups(self) -> list[tuple[int, ...]]:
        return [self.tp_group(e * self.tp) for e in range(self.ep)]

    def world(self) -> tuple[int, ...]:
        return tuple(range(self.world_size))

    # --- slices: [start, stop) of a dimension of size n held by ``rank`` ---------------------------
    @staticmethod
    def _part(n: int, parts: int, index: int) -> tuple[int, int]:
        size = n // parts
        return index * size, (index + 1) * size

    def kv_heads(self, rank: int, num_kv_heads: int) -> tuple[int, int]:
        return self._part(num_kv_heads, self.tp, self.tp_rank(rank))

    def q_heads(self, rank: int, num_heads: int) -> tuple[int, int]:
        return self._part(num_heads, self.tp, self.tp_rank(rank))

    def experts(self, rank: int, num_experts: int) -> tuple[int, int]:
        return self._part(num_experts, self.ep, self.ep_rank(rank))

    def slice_for(self, by: str, rank: int, n: int) -> tuple[int, int]:
        """The part of an axis of size ``n`` split ``by`` "tp", "ep" or "world"."""
        parts, index = {"tp": (self.tp, self.tp_rank(rank)), "ep": (self.ep, self.ep_rank(rank)),
                        "world": (self.world_size, rank)}[by]
        return self._part(n, parts, index)

    def parts(self, by: str) -> int:
        return {"tp": self.tp, "ep": self.ep, "world": self.world_size}[by]

    def group(self, by: str, rank: int) -> tuple[int, ...]:
        return self.tp_group(rank) if by == "tp" else self.world()

    def check_divisible(self, model_config: dict) -> None:
        """A named MoecError for every size the split does not divide, before any work."""
        c = model_config
        problems = []
        heads, kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
        if kv % self.tp:
            problems.append(f"{kv} kv heads (num_key_value_heads) over tp {self.tp}")
        if heads % self.tp:
            problems.append(f"{heads} attention heads (num_attention_heads) over tp {self.tp}")
        experts = int(c.get("num_local_experts", 0) or 0)
        has_moe = bool(c.get("moe_layers")) and experts > 0
        if has_moe and experts % self.ep:
            problems.append(f"{experts} experts (num_local_experts) over ep {self.ep}")
        if has_moe and int(c["intermediate_size"]) % self.world_size:
            # the shared expert is split over the world, each routed expert over tp (a divisor)
            problems.append(f"expert intermediate size {c['intermediate_size']} over {self.world_size} ranks")
        dense = len(c.get("moe_layers") or []) < int(c["num_hidden_layers"])
        if dense and int(c["intermediate_size_mlp"]) % self.tp:
            problems.append(f"dense MLP intermediate size {c['intermediate_size_mlp']} (intermediate_size_mlp) over tp {self.tp}")
        if self.ep > 1 and not has_moe:
            problems.append(f"ep {self.ep} on a model without MoE layers")
        if problems:
            raise MoecError(f"cannot split the model over tp {self.tp} x ep {self.ep}: " + "; ".join(problems)
                            + "; choose --tp/--ep that divide these sizes")

    def to_dict(self) -> dict:
        return {"tp": self.tp, "ep": self.ep, "world_size": self.world_size,
                "tp_groups": [list(g) for g in self.tp_groups()]}
