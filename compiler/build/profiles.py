"""Optimization profiles: the prefill and decode shape ranges of a moec graph, user overrides, and the limits an engine records."""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx
from moec.common import contract
from moec.common.errors import MoecError
from moec.compiler.build.config import BuildConfig

# --- Profiles --------------------------------------------------------------------------------------
# Two optimization profiles by default, because one profile is tuned at one opt point and the two
# phases of generation run very different shapes:
#   prefill: a whole prompt at once, new_tokens 1..max_new (opt: a typical prompt), past from 0
#            (opt 0) up to max_past capped so new + past fit the positions;
#   decode:  one token per step, new_tokens exactly 1, past 1..max_past (opt: the middle).
# TensorRT numbers profiles in the order they are added; the manifest lists them in that order
# (its "index"), and the runtime picks one per step (moec.runtime.trt_backend.select_profile).
# ``--shapes`` overrides: "prefill:NAME:MIN,OPT,MAX" or "decode:NAME:..." change that tensor in
# that profile only; a spec without a prefix builds ONE custom profile instead (both phases'
# range, opt at decode), the tensors it names overridden. The two forms do not mix.
Shape = tuple[int, ...]


Ranges = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


PROFILE_NAMES = ("prefill", "decode")


CUSTOM_PROFILE = "custom"


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str  # "prefill" | "decode" | "custom"
    shapes: Ranges


@dataclasses.dataclass(frozen=True)
class Limits:
    """The largest shapes the engine accepts, over all its profiles: max_new_tokens bounds one
    step's tokens (a prompt), max_past the past a step reads (decode's, the longest context)."""

    max_batch: int
    max_new_tokens: int
    max_past: int
    max_positions: int


def profile_limits(sidecar: dict[str, Any], config: BuildConfig) -> Limits:
    """Batch, new-token and past-length limits: the config's, else the sidecar's export settings.
    By default a prompt may take half the positions and decode may run up to the last position."""
    model = sidecar.get("model_config", {})
    max_positions = sidecar.get("max_positions") or model.get("max_position_embeddings")
    if not max_positions:
        raise MoecError("the sidecar names no max_positions or model_config.max_position_embeddings: re-export the model")
    max_positions = context_positions(int(max_positions), config.max_seq)
    max_batch = config.max_batch if config.max_batch is not None else int(sidecar.get("max_batch") or 1)
    max_new = config.max_new_tokens if config.max_new_tokens is not None else max(1, max_positions // 2)
    max_past = config.max_past if config.max_past is not None else max_positions - 1
    if max_batch < 1:
        raise MoecError(f"--max-batch {max_batch}: give at least 1")
    if not 1 <= max_new <= max_positions:
        raise MoecError(f"--max-new-tokens {max_new} is outside 1..{max_positions} (the model's positions): lower it")
    if not 1 <= max_past <= max_positions - 1:
        raise MoecError(
            f"--max-past {max_past} is outside 1..{max_positions - 1}: decode reads at least one past token and "
            f"its own token takes a position of the model's {max_positions}; pick a past length in that range"
        )
    return Limits(max_batch, max_new, max_past, max_positions)


def context_positions(export_positions: int, max_seq: int | None) -> int:
    """The engine's context: ``max_seq``, else min(the export's positions, DEFAULT_CONTEXT)."""
    from moec.compiler.plan import DEFAULT_CONTEXT

    if max_seq is None:
        return min(export_positions, DEFAULT_CONTEXT)
    if not 2 <= max_seq <= export_positions:
        raise MoecError(f"--max-seq {max_seq} is outside 2..{export_positions} (the export's positions): "
                        "lower it, or re-export with a larger --max-seq")
    return max_seq


def phase_ranges(limits: Limits, config: BuildConfig) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of the batch, new-token and past axes for each profile the limits give."""
    # A profile is a box: its corner new + past must fit the positions, so a long prompt window
    # leaves less past for prefill (chunked prompts); decode's one token leaves all of it.
    prefill_past = min(limits.max_past, limits.max_positions - limits.max_new_tokens)
    decode_batch = config.decode_opt_batch or max(1, limits.max_batch // 2)
    return {
        "prefill": {"batch": (1, 1, limits.max_batch),
                    "new": (1, min(config.prefill_opt_tokens, limits.max_new_tokens), limits.max_new_tokens),
                    "past": (0, 0, prefill_past),
                    # Image prompts (a graph with image_features): up to every new token an image token.
                    "image_rows": (0, 0, limits.max_new_tokens)},
        "decode": {"batch": (1, min(decode_batch, limits.max_batch), limits.max_batch),
                   "new": (1, 1, 1),
                   "past": (1, max(1, limits.max_past // 2), limits.max_past),
                   "image_rows": (0, 0, 0)},
        # One profile for both phases, tuned for decode (what a single-profile engine spends most
        # steps on); the base of unprefixed --shapes.
        CUSTOM_PROFILE: {"batch": (1, 1, limits.max_batch),
                         "new": (1, 1, limits.max_new_tokens),
                         "past": (0, max(1, prefill_past // 2) if prefill_past else 0, prefill_past),
                         "image_rows": (0, 0, limits.max_new_tokens)},
    }


def axis_roles(name: str, rank: int) -> tuple[str | None, ...]:
    """The moec role of each axis of an input: batch, new (tokens this step), past (cache length)."""
    if name.startswith(("past_key.", "past_value.")):
        return ("batch", None, "past", None)
    if name in (contract.INPUT_IDS, contract.POSITION_IDS):
        return ("batch", "new")
    if name.startswith("hidden."):  # a layer range's residual stream in (moec.runtime.layer_chain)
        return ("batch", "new", None)
    if name == contract.IMAGE_FEATURES:
        return ("image_rows", None)
    return (None,) * rank


def _tensor_ranges(network, axes: dict[str, tuple[int, int, int]]) -> Ranges:
    """min/opt/max per network input: each dynamic axis from its moec role (batch, new, past)."""
    out: Ranges = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = tuple(t.shape)
        role = axis_roles(t.name, len(shape))
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(shape):
            if dim >= 0:
                lo.append(dim), opt.append(dim), hi.append(dim)
                continue
            r = role[axis] if axis < len(role) else None
            if r is None:
                raise MoecError(
                    f"input {t.name!r} axis {axis} is dynamic and not a moec batch/new_tokens/past_len axis: "
                    f"give its range with --shapes {t.name}:MINx..,OPTx..,MAXx.."
                )
            lo.append(axes[r][0]), opt.append(axes[r][1]), hi.append(axes[r][2])
        out[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return out


def parse_shapes(specs: tuple[str, ...]) -> dict[str | None, Ranges]:
    """trtexec-style ``[prefill:|decode:]name:1x1,1x128,4x512`` (min, opt, max), several per
    argument split by spaces; keyed by profile name, None for specs without a prefix."""
    out: dict[str | None, Ranges] = {}
    for spec in " ".join(specs).split():
        name, sep, ranges = spec.rpartition(":")
        parts = ranges.split(",")
        if not sep or not name or len(parts) != 3:
            raise MoecError(f"--shapes {spec!r}: write [prefill:|decode:]name:MIN,OPT,MAX with dims joined by x, "
                            "e.g. input_ids:1x1,1x128,4x512")
        prefix, psep, rest = name.partition(":")
        profile = prefix if psep and prefix in PROFILE_NAMES else None
        if profile is not None:
            name = rest
        try:
            dims = tuple(tuple(int(d) for d in p.split("x")) if p else () for p in parts)
        except ValueError:
            raise MoecError(f"--shapes {spec!r}: dims must be integers joined by x") from None
        out.setdefault(profile, {})[name] = dims  # type: ignore[assignment]
    if None in out and len(out) > 1:
        raise MoecError("--shapes mixes specs with a profile prefix (prefill:/decode:) and without one: either prefix "
                        "every spec (adjusting the two default profiles) or none (one custom profile)")
    return out


def apply_overrides(network, ranges: Ranges, overrides: Ranges, profile: str) -> Ranges:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    merged = dict(ranges)
    where = f"--shapes {profile}:" if profile in PROFILE_NAMES else "--shapes "
    for name, (lo, opt, hi) in overrides.items():
        if name not in inputs:
            hint = f"; profile prefixes are {' and '.join(p + ':' for p in PROFILE_NAMES)}" if ":" in name else ""
            raise MoecError(f"{where}{name} names {name!r}, which is not a network input; inputs are: {', '.join(inputs)}{hint}")
        shape = inputs[name]
        if not len(lo) == len(opt) == len(hi) == len(shape):
            raise MoecError(f"{where}{name}: rank of min/opt/max ({len(lo)}, {len(opt)}, {len(hi)}) must equal the input's rank {len(shape)}")
        roles = axis_roles(name, len(shape))
        for axis, dim in enumerate(shape):
            if not 0 <= lo[axis] <= opt[axis] <= hi[axis]:
                raise MoecError(f"{where}{name}: axis {axis} needs 0 <= min <= opt <= max, got {lo[axis]}, {opt[axis]}, {hi[axis]}")
            # Only a cache may be empty (a prompt's first step has no past); a step has at least
            # one sequence and one token.
            if dim < 0 and lo[axis] < 1 and (roles[axis] if axis < len(roles) else None) not in ("past", "image_rows"):
                what = {"batch": "batch", "new": "new tokens"}.get(roles[axis] if axis < len(roles) else None, "size")
                raise MoecError(f"{where}{name}: axis {axis} ({what}) has min {lo[axis]}; a step needs at least 1: give min >= 1")
            if dim >= 0 and not lo[axis] == opt[axis] == hi[axis] == dim:
                raise MoecError(f"{where}{name}: axis {axis} is fixed at {dim} in the graph, got {lo[axis]}, {opt[axis]}, {hi[axis]}")
        merged[name] = (lo, opt, hi)
    return merged


def build_profiles(network, limits: Limits, config: BuildConfig) -> list[Profile]:
    """The profiles to build, in TensorRT's index order: prefill and decode from the limits with
    any prefixed overrides, or one custom profile when --shapes has unprefixed specs."""
    overrides = parse_shapes(config.shapes)
    axes = phase_ranges(limits, config)
    if None in overrides:
        return [Profile(CUSTOM_PROFILE, apply_overrides(network, _tensor_ranges(network, axes[CUSTOM_PROFILE]),
                                                        overrides[None], CUSTOM_PROFILE))]
    return [Profile(name, apply_overrides(network, _tensor_ranges(network, axes[name]), overrides.get(name, {}), name))
            for name in PROFILE_NAMES]


def check_named_dims(model: onnx.ModelProto, profiles: list[Profile]) -> None:
    """TensorRT requires axes that share a symbolic name in the graph (input_ids and position_ids
    both [batch, new_tokens]) to have the same opt value in a profile (it fails the build with
    "Profile kOPT values are not self-consistent"; unequal min/max it narrows to their overlap);
    say so before the build, naming both tensors."""
    named: dict[str, list[tuple[str, int]]] = {}
    for t in model.graph.input:
        for axis, d in enumerate(t.type.tensor_type.shape.dim):
            if d.HasField("dim_param"):
                named.setdefault(d.dim_param, []).append((t.name, axis))
    for p in profiles:
        for dim, uses in named.items():
            opts = {(n, a): p.shapes[n][1][a] for n, a in uses if n in p.shapes}
            if len(set(opts.values())) > 1:
                (n0, a0), v0 = next(iter(opts.items()))
                (n1, a1), v1 = next((k, v) for k, v in opts.items() if v != v0)
                where = f"{p.name}:" if p.name in PROFILE_NAMES else ""
                raise MoecError(
                    f"profile {p.name}: {n0} axis {a0} and {n1} axis {a1} are both {dim!r} in the graph but get opt "
                    f"{v0} and {v1}; TensorRT needs one opt per named axis: give both the same range "
                    f"(--shapes {where}{n1}:...)"
                )


def limits_of(profiles: list[Profile], positions: int, rings: frozenset[str] = frozenset()) -> Limits:
    """The limits the (possibly overridden) profiles really allow, as the runtime will read them;
    each profile's corner must fit the model's positions. ``rings``: the chunked layers' ring
    inputs, whose slot axis is fixed whatever the past (``sidecar_ring_inputs``)."""
    batch = new = past = 0
    for p in profiles:
        ids = p.shapes[contract.INPUT_IDS][2]
        pasts = [v[2][2] for k, v in p.shapes.items()
                 if (k.startswith("past_key.") or k.startswith("past_value.")) and k not in rings]
        p_max = min(pasts) if pasts else 0
        if ids[1] + p_max > positions:
            raise MoecError(
                f"profile {p.name}: max new_tokens {ids[1]} + max past_len {p_max} exceed the model's {positions} "
                "positions: shrink the ranges in --shapes (or --max-new-tokens / --max-past)"
            )
        batch, new, past = max(batch, ids[0]), max(new, ids[1]), max(past, p_max)
    return Limits(batch, new, past, positions)


def sidecar_ring_inputs(sidecar: dict[str, Any]) -> frozenset[str]:
    """The past inputs of chunked layers' ring caches (fixed slots; their profile range is that
    size in every profile, so the decode past range applies to the full caches only)."""
    from moec.common.kv_cache import cache_layout

    return frozenset(name for c in cache_layout(sidecar) if c.ring
                     for name in (contract.past_key(c.layer), contract.past_value(c.layer)))


def kv_cache_summary(io_inputs: list[dict[str, Any]], limits: Limits) -> dict[str, Any]:
    """KV bytes per sequence at the engine's max context (decode's past + its token), per cache
    kind, from the network's input shapes."""
    from moec.common.kv_cache import kv_bytes_from_io

    context = min(limits.max_positions, limits.max_past + 1)
    return {"context": context, "bytes_per_sequence": kv_bytes_from_io(io_inputs, context)}


def _profiles_json(profiles: list[Profile]) -> list[dict[str, Any]]:
    """The manifest's record, in TensorRT's profile index order (the runtime selects by index)."""
    return [{"name": p.name, "index": i,
             "shapes": {n: {"min": list(lo), "opt": list(opt), "max": list(hi)} for n, (lo, opt, hi) in p.shapes.items()}}
            for i, p in enumerate(profiles)]
