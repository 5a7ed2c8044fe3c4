"""The paired bench's stopping rule on a simulated host: per-round ratios from a seeded sampler
(heavy-tailed, like a shared runner's) on a virtual clock go through the real ``run_paired`` with
the gate's early-stop check, and the gate's verdict is read at the end, as ``moec gate`` would.

The hard case is a true slowdown right on ``--max-regression``: there both "pass" and
"regression" are wrong, and every extra look at the data is another chance to hit one. The rule
promises at most 2.5% wrong on each side whatever the number of looks it makes; the rule it
replaced (a look at 12 rounds and every 1.25x after, each at 95%) breaks that on the same trials,
which is what shows the test can fail."""

from __future__ import annotations

import math

import numpy as np
import pytest

import moec.compiler.gate_paired as gate_paired
from moec.compiler.gate_paired import PAIRED_BETTER, all_decided, judge, look_confidence, slowdown_interval
from moec.runtime.bench import BenchConfig
from moec.runtime.bench_paired import PairedConfig, run_paired

THRESHOLD = 0.05
TRIALS = 60
SECONDS_PER_ROUND = 0.0625  # exact in binary, so the budget ends at exactly MAX_ROUNDS rounds
MAX_ROUNDS = 150
CONFIG = PairedConfig(BenchConfig(warmup=0), max_time=MAX_ROUNDS * SECONDS_PER_ROUND)  # early looks at 30 and 120


@pytest.fixture(autouse=True)
def fewer_resamples(monkeypatch):
    # 999 resamples instead of 4999: the intervals move by well under a percent of their width,
    # and the hundreds of bootstraps here take seconds instead of a minute.
    monkeypatch.setattr(gate_paired, "_RESAMPLES", 999)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def log_slowdowns(true_slowdown: float, n: int, seed: int) -> np.ndarray:
    """Round log-ratios: 10% noise, and one round in ten hit by a neighbour's burst (+-150%)."""
    rng = np.random.default_rng(seed)
    x = math.log1p(true_slowdown) + rng.normal(0, 0.1, n)
    hit = rng.random(n) < 0.1
    x[hit] += rng.choice([-1.5, 1.5], hit.sum())
    return x


def bench_and_gate(true_slowdown: float, seed: int) -> tuple[str, dict]:
    """One simulated ``moec bench NEW --against OLD`` (decode only) and the gate's verdict on it."""
    clock = Clock()
    rounds = iter(np.exp(log_slowdowns(true_slowdown, MAX_ROUNDS, seed)))

    def measure():
        clock.t += SECONDS_PER_ROUND
        r = float(next(rounds))
        return {"new": (1.0, [r]), "old": (1.0, [1.0])}

    confidence = look_confidence(CONFIG.looks)
    out = run_paired(CONFIG, measure, lambda ratios: all_decided(
        ratios, PAIRED_BETTER, THRESHOLD, confidence, metrics=("decode_ms_per_step",)), clock=clock)
    iv = slowdown_interval(out["ratios"]["decode_ms_per_step"], "lower", look_confidence(out["looks"]))
    return judge(iv, THRESHOLD), out


def replaced_rule(true_slowdown: float, seed: int) -> str:
    """The former rule on the same rounds: looks at 12, 15, 18, 22, ... rounds, each at 95%."""
    x = np.exp(log_slowdowns(true_slowdown, MAX_ROUNDS, seed))
    n = 12
    while True:
        n = min(n, len(x))
        verdict = judge(slowdown_interval(x[:n].tolist(), "lower"), THRESHOLD)
        if verdict != "undecided" or n == len(x):
            return verdict
        n = max(n + 2, int(n * 1.25))


def test_looks_do_not_inflate_wrong_verdicts_at_the_threshold():
    seeds = range(1000, 1000 + TRIALS)
    new = [bench_and_gate(THRESHOLD, s)[0] for s in seeds]
    old = [replaced_rule(THRESHOLD, s) for s in seeds]
    print(f"wrong of {TRIALS}: this rule {new.count('regression')} regression, {new.count('pass')} pass; "
          f"the replaced rule {old.count('regression')} regression, {old.count('pass')} pass")
    # Under a 2.5% bound per side, 5 or more wrong of 60 on one side has a chance below 2%.
    assert new.count("regression") <= 4 and new.count("pass") <= 4, new
    # The replaced rule, on the same rounds, is wrong far more often than 2.5% + 2.5% allows.
    old_wrong = old.count("regression") + old.count("pass")
    assert old_wrong >= 6, old
    assert old_wrong >= 3 * (new.count("regression") + new.count("pass")), (old, new)


def test_clear_cases_still_stop_early():
    first = 0
    for seed in range(10):
        for truth, right in ((0.30, "regression"), (0.0, "pass")):
            verdict, out = bench_and_gate(truth, seed)
            assert verdict == right and out["stop"] == "decided" and out["rounds"] in (30, 120), (truth, out["rounds"])
            first += out["rounds"] == 30
    assert first >= 12  # most at the first look (30 rounds)
    # An undecidable case runs to the time budget, looking only at the planned rounds.
    verdict, out = bench_and_gate(THRESHOLD, 1000)
    assert out["stop"] == "max-time" and out["rounds"] == MAX_ROUNDS and out["looked_at"] == [30, 120]


def test_look_confidence_splits_the_error_over_the_looks():
    assert look_confidence(1) == pytest.approx(0.95)
    assert look_confidence(3) == pytest.approx(1 - 0.05 / 3)
    wide = slowdown_interval(np.exp(log_slowdowns(0.0, 60, 0)).tolist(), "lower", look_confidence(3))
    narrow = slowdown_interval(np.exp(log_slowdowns(0.0, 60, 0)).tolist(), "lower")
    assert wide.low < narrow.low < narrow.high < wide.high
