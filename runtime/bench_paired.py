"""Paired, interleaved benchmark of two artifacts in one process: ``moec bench NEW --against OLD``.

A comparison with a baseline recorded at another time cannot separate a regression from the
machine being busier: on a shared runner the speed of the host drifts by tens of percent between
runs, and on a loaded 2-core host even from one 20 ms generate call to the next (measured: the
median decode step of consecutive calls of one model varied 5x). So both artifacts run in the same
process, on the same prompt and settings, interleaved at the finest grain the generation loop has:
a round is one ``generate`` call (the shared loop, as ``moec run`` takes it) over ``PairedBackend``,
whose every ``forward`` runs the step on NEW and on OLD back to back, timing each, NEW first on even
steps and OLD first on odd ones (NEW, OLD, OLD, NEW, ...). The two timings of a step are a
millisecond apart, so a drift of the host's speed, and any advantage of going first or second,
hits both equally. Both artifacts get the same tokens (NEW's greedy choices; EOS ignored), so they
do the same work. Each round gives one value per artifact and metric (its median decode step, its
prefill) and their ratio NEW/OLD; the gate (``moec.compiler.gate_paired``) puts a confidence
interval on those ratios.

Rounds go on until ``max_time`` seconds have passed or ``max_rounds`` rounds are done, and may
stop earlier when the caller's ``decided`` says the ratios so far settle the verdict. Each look at
the data is one more chance to stop on a fluke, so the looks are few and fixed in advance:
``looks - 1`` early ones at ``min_rounds`` x 1, 4, 16, ... rounds, and the gate's own at the end;
the gate judges every look at the confidence ``moec.compiler.gate_paired.look_confidence(looks)``
(a Bonferroni split of its error rate over the looks), which the caller's ``decided`` must use too.

Result: a bench result (``moec.runtime.bench``) whose ``metrics`` are NEW's, plus ``against`` (OLD's
artifact record), ``against_metrics`` (OLD's metrics) and ``paired``::

    {"rounds", "order": "per step: new, old, old, new, ...", "seconds", "stop": "decided" |
     "max-time" | "max-rounds", "looks": planned looks (the final one included), "looked_at": [rounds
     of the early looks made], "ratios": {metric: [NEW/OLD per round]},
     "new": {metric: [per round]}, "old": {metric: [per round]}}

For a throughput metric the ratio is still NEW/OLD of the throughput (below 1 is slower).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moec.common import progress
from moec.common.errors import MoecError
from moec.runtime.backend import Backend
from moec.runtime.bench import (BenchConfig, artifact_record, latency_metric, open_backend,
                                result_header, throughput_metric)

# Metrics measured per round; the throughputs are derived (tokens * 1000 / ms).
ROUND_METRICS = ("prefill_ms", "decode_ms_per_step")


@dataclasses.dataclass(frozen=True)
class PairedConfig:
    bench: BenchConfig = BenchConfig()
    max_time: float = 35.0  # seconds of timed rounds (warm-up excluded)
    # The first early look. A bootstrap interval of a dozen heavy-tailed rounds is too narrow (on
    # the loaded host, 2 of 20 self-comparisons stopped at 12 rounds on a false regression).
    min_rounds: int = 30
    looks: int = 3  # looks at the data in all: the early ones at min_rounds x 4^k, and the gate's at the end
    max_rounds: int = 2000
    prefills: int = 21  # prefills per round (one inside the generate call); the round's value is their median

    def __post_init__(self):
        if not (math.isfinite(self.max_time) and self.max_time > 0):
            raise MoecError(f"--max-time must be a positive number of seconds, got {self.max_time}")
        if self.min_rounds < 2:
            raise MoecError(f"--rounds must be >= 2, got {self.min_rounds}")
        if self.prefills < 1:
            raise MoecError(f"prefills per round must be >= 1, got {self.prefills}")
        if self.looks < 1:
            raise MoecError(f"looks must be >= 1 (the gate's own look at the end), got {self.looks}")
        if self.max_rounds < self.min_rounds:
            raise MoecError(f"max rounds {self.max_rounds} is below --rounds {self.min_rounds}")


def step_order(i: int) -> tuple[str, str]:
    return ("new", "old") if i % 2 == 0 else ("old", "new")


class PairedBackend:
    """A ``Backend`` that runs every step on two backends, timing each; NEW's logits drive the loop.

    ``calls`` collects, per forward call of the current round, (kind, prefill number, new ms, old ms)
    with kind "prefill" (positions inside the prompt of ``prompt_len`` tokens: every chunk of a
    chunked prefill) or "decode"."""

    name = "paired"

    def __init__(self, new: Backend, old: Backend, prompt_len: int, clock: Callable[[], float] = time.perf_counter):
        self.backends = {"new": new, "old": old}
        self.max_positions = min(int(new.max_positions), int(old.max_positions))
        self.eos_token_ids = ()
        limits = [v for v in (getattr(b, "max_new_tokens_per_step", None) for b in (new, old)) if v is not None]
        self.max_new_tokens_per_step = min(limits) if limits else None
        self.prompt_len = prompt_len
        self.clock = clock
        # Who goes first alternates along the steps of a round and between rounds, so that every
        # step of a round (the prefill included) is led by NEW in half the rounds, by OLD in the other.
        self.round = -1
        self.step = 0
        self.order: list[str] = []
        self.calls: list[tuple[str, int, float, float]] = []
        self.prefills = 0

    def init_cache(self, batch_size: int):
        self.calls = []
        self.round += 1
        self.step = 0
        return self.fresh_cache(batch_size)

    def fresh_cache(self, batch_size: int):
        """An empty cache for both, within the current round (an extra prefill of the round)."""
        return {"new": self.backends["new"].init_cache(batch_size), "old": self.backends["old"].init_cache(batch_size),
                "past_len": 0}

    def forward(self, input_ids_BS, position_ids_BS, cache):
        ms, out = {}, {}
        for who in step_order(self.round + self.step):
            t0 = self.clock()
            out[who] = self.backends[who].forward(input_ids_BS, position_ids_BS, cache[who])
            ms[who] = (self.clock() - t0) * 1e3
            self.order.append(who)
        self.step += 1
        kind = "prefill" if int(position_ids_BS[0, -1]) < self.prompt_len else "decode"
        if int(position_ids_BS[0, 0]) == 0:
            self.prefills += 1
        self.calls.append((kind, self.prefills, ms["new"], ms["old"]))
        new_cache = {"new": out["new"][1], "old": out["old"][1], "past_len": cache["past_len"] + input_ids_BS.shape[1]}
        # A copy, so that neither artifact's output buffer outlives the step. The loop keeps the
        # logits it is handed until the next step returns; were they NEW's own buffer, NEW would run
        # every step with its previous output still alive (a fresh allocation) and OLD with its
        # buffer free to reuse: measured, NEW = OLD then came out slower in 11 of 11 self-comparisons
        # (median +1.1%, up to +3.4%), a bias that eats a 5% threshold.
        return np.array(out["new"][0], copy=True), new_cache

    def describe(self) -> dict[str, str]:
        return self.backends["new"].describe()


# One round: {"new": (prefill ms, [decode step ms]), "old": (...)}.
Measure = Callable[[], dict[str, tuple[float, list[float]]]]


def generate_measure(paired: PairedBackend, config: BenchConfig, prefills: int = 1) -> Measure:
    """One generate call over ``paired`` per round: the same random prompt (``config.seed``) every
    round, EOS ignored so every round does the same work; then ``prefills - 1`` more prefills of
    the same prompt (the forward calls of generate's prefill), and the round's prefill is their
    median: a prefill is one short call, and on a loaded host a good share of single calls lose the
    CPU to a neighbour for a whole time slice, which the median of a few interleaved ones shrugs off
    (the decode steps of a round are many already)."""
    from moec.runtime.generate import GenerationConfig, generate, prefill_chunk

    rng = np.random.default_rng(config.seed)
    prompt = rng.integers(0, 100, size=(config.batch, config.prompt_len), dtype=np.int64)  # ids in every vocabulary
    gen = GenerationConfig(max_new_tokens=config.gen_len, stop_on_eos=False)

    positions = np.broadcast_to(np.arange(config.prompt_len, dtype=np.int64), prompt.shape).copy()
    chunk = prefill_chunk(paired, config.prompt_len)

    def measure() -> dict[str, tuple[float, list[float]]]:
        generate(paired, prompt, gen)
        for _ in range(prefills - 1):
            cache = paired.fresh_cache(config.batch)
            for start in range(0, config.prompt_len, chunk):
                _, cache = paired.forward(prompt[:, start:start + chunk], positions[:, start:start + chunk], cache)
        out = {}
        for i, who in ((2, "new"), (3, "old")):
            per_prefill: dict[int, float] = {}
            for c in paired.calls:
                if c[0] == "prefill":
                    per_prefill[c[1]] = per_prefill.get(c[1], 0.0) + c[i]
            out[who] = (float(np.median(list(per_prefill.values()))), [c[i] for c in paired.calls if c[0] == "decode"])
        return out

    return measure


def look_points(min_rounds: int, looks: int) -> tuple[int, ...]:
    """Rounds after which ``decided`` is asked: ``looks - 1`` of them, min_rounds x 1, 4, 16, ...
    (the gate's look at the end is the last). Spaced 4x apart, each early look comes with twice the
    previous one's precision, so it has a real chance to decide what the previous could not."""
    return tuple(min_rounds * 4 ** k for k in range(looks - 1))


def run_paired(config: PairedConfig, measure: Measure,
               decided: Callable[[dict[str, list[float]]], bool] | None = None,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run rounds of ``measure`` (warm-up first); return the ``paired`` block plus both
    artifacts' per-sample populations (``samples``, for their metrics)."""
    for _ in range(config.bench.warmup):
        measure()
    per_round: dict[str, dict[str, list[float]]] = {w: {m: [] for m in ROUND_METRICS} for w in ("new", "old")}
    samples: dict[str, dict[str, list[float]]] = {w: {"prefill_ms": [], "decode_ms_per_step": []} for w in ("new", "old")}
    checks = look_points(config.min_rounds, config.looks)
    looked_at: list[int] = []
    stop = "max-rounds"
    start = clock()
    rounds = 0
    for i in range(config.max_rounds):
        progress.step(f"round {i + 1} (at most {config.max_rounds}, {config.max_time:.0f} s)")
        measured = measure()
        for who in ("new", "old"):
            prefill_ms, steps_ms = measured[who]
            per_round[who]["prefill_ms"].append(prefill_ms)
            per_round[who]["decode_ms_per_step"].append(float(np.median(steps_ms)))
            samples[who]["prefill_ms"].append(prefill_ms)
            samples[who]["decode_ms_per_step"].extend(steps_ms)
        rounds = i + 1
        # A hard budget, even before the first look: a CI job must end in bounded time, and the
        # gate calls too few rounds "undecided" with the rounds that would decide.
        if clock() - start >= config.max_time:
            stop = "max-time"
            break
        if decided is not None and rounds in checks:
            looked_at.append(rounds)
            if decided(ratios_of(per_round)):
                stop = "decided"
                break
    seconds = clock() - start
    return {"rounds": rounds, "seconds": round(seconds, 3), "stop": stop, "looks": config.looks, "looked_at": looked_at,
            "ratios": ratios_of(per_round), "new": per_round["new"], "old": per_round["old"], "samples": samples}


def ratios_of(per_round: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """NEW/OLD per round for every metric, the derived throughputs included (their ratio is the
    inverse of their latency's)."""
    out = {}
    for m in ROUND_METRICS:
        new, old = np.asarray(per_round["new"][m]), np.asarray(per_round["old"][m])
        out[m] = (new / old).tolist()
    out["decode_tokens_per_s"] = [1 / r for r in out["decode_ms_per_step"]]
    out["prefill_tokens_per_s"] = [1 / r for r in out["prefill_ms"]]
    return out


def metrics_of(samples: dict[str, list[float]], per_round: dict[str, list[float]], config: BenchConfig) -> dict[str, Any]:
    """One artifact's metrics block, in the same form as a single bench's (``run_bench``)."""
    decode = latency_metric(samples["decode_ms_per_step"], per_round["decode_ms_per_step"],
                            f"every decode step of every round ({len(samples['decode_ms_per_step'])} steps); "
                            "repeats: each round's median step")
    prefill = latency_metric(samples["prefill_ms"], per_round["prefill_ms"],
                             f"one prefill of {config.prompt_len} tokens per round ({len(samples['prefill_ms'])})")
    return {
        "prefill_ms": prefill,
        "decode_ms_per_step": decode,
        "decode_tokens_per_s": throughput_metric(decode, config.batch, "decode_ms_per_step"),
        "prefill_tokens_per_s": throughput_metric(prefill, config.batch * config.prompt_len, "prefill_ms"),
    }


def check_pairable(new_path: Path, old_path: Path, new: dict[str, Any], old: dict[str, Any]) -> None:
    """Refuse (before any timing) to pair artifacts of different kinds or different models; a
    different dtype, precision, lowering or target is what a change may legitimately do."""
    if new["kind"] != old["kind"]:
        raise MoecError(f"{new_path} is a {new['kind']} artifact and --against {old_path} a {old['kind']} one: "
                        "compare two .onnx files or two engine folders")
    for field in ("model_config_sha256", "tokenizer_sha256", "num_layers", "vocab_size"):
        a, b = new["identity"][field], old["identity"][field]
        if a != b:
            raise MoecError(f"{new_path} and --against {old_path} are different models ({field}: {a!r} vs {b!r}): "
                            "compare two builds of the same model")


def bench_paired(new_path: str | Path, old_path: str | Path, config: PairedConfig = PairedConfig(),
                 backend: str | None = None,
                 decided: Callable[[dict[str, list[float]]], bool] | None = None) -> dict[str, Any]:
    new_path, old_path = Path(new_path), Path(old_path)
    for p, what in ((new_path, "the artifact"), (old_path, "--against")):
        if not p.exists():
            raise MoecError(f"{what} {p} does not exist: bench an .onnx file or an engine directory")
    new_rec, old_rec = artifact_record(new_path), artifact_record(old_path)
    check_pairable(new_path, old_path, new_rec, old_rec)
    bc = config.bench
    backends = {"new": open_backend(new_path, backend, bc.threads), "old": open_backend(old_path, backend, bc.threads)}
    for who, path in (("new", new_path), ("old", old_path)):
        if bc.prompt_len + bc.gen_len > backends[who].max_positions:
            raise MoecError(f"prompt-len {bc.prompt_len} + gen-len {bc.gen_len} exceed {path}'s "
                            f"{backends[who].max_positions} positions: lower them")
    pair = PairedBackend(backends["new"], backends["old"], bc.prompt_len)
    paired = run_paired(config, generate_measure(pair, bc, config.prefills), decided)
    paired["order"] = "per step: " + ", ".join(pair.order[:8]) + ", ... (first of each step alternates, and flips every round)"
    samples = paired.pop("samples")
    result = result_header(new_path, backends["new"], bc)
    result["config"] |= {"max_time": config.max_time, "min_rounds": config.min_rounds, "looks": config.looks}
    result["against"] = old_rec
    result["metrics"] = metrics_of(samples["new"], paired["new"], bc)
    result["against_metrics"] = metrics_of(samples["old"], paired["old"], bc)
    result["paired"] = paired
    return result
