"""The gate's verdict on a paired result (``moec bench NEW --against OLD``): a confidence interval
on NEW's slowdown against OLD from the per-round ratios.

Each round of a paired bench gives one ratio NEW/OLD per metric, measured seconds apart on the
same machine, so the host's drift cancels within the round. The slowdown of a round is that ratio
for a lower-is-better metric and its inverse for a higher-is-better one (half the tokens/s is
+100%, like twice the ms). The gate bootstraps a confidence interval of the 20%-trimmed mean
of the log slowdowns (``scipy.stats.bootstrap``, BCa, a fixed seed so one file always gets one
verdict) and reads the verdict off it:

- **pass**: the interval's upper end is at most ``max_regression`` (no regression beyond it);
- **regression**: its lower end is above ``max_regression`` (exit 1);
- **improved**: its upper end is below ``-max_regression``;
- **undecided**: it straddles ``max_regression`` (exit 2), with the rounds that would narrow it
  enough, from the 1/sqrt(rounds) shrinking of an interval.

The bench looks at the rounds a few times to stop early (``moec.runtime.bench_paired.look_points``),
and each look is another chance of a fluke verdict: at 95% per look, the dozen looks of a fixed
budget make a wrong verdict at the threshold several times likelier than 2.5% (simulated: 8 of 60
runs). So every look, the gate's at the end included, uses the confidence
``look_confidence(looks)`` = 1 - 5% / looks (Bonferroni): whatever the number of rounds at each
look, the chance that any of them is wrong on one side is at most 2.5%. Pocock's constant
(1 - 2.2% for 3 looks) is a little less strict but assumes looks at planned fractions of a fixed
sample; here the last look comes whenever ``--max-time`` runs out, and Bonferroni holds regardless.

Why a bootstrap and not a rank test: the verdict needs the interval itself (it is printed, and the
rounds that would decide come from its width), while a signed-rank test gives a p-value against one
hypothesised shift; the bootstrap makes no assumption on the shape of the ratios' distribution
(timings are skewed: a busy neighbour only ever slows a round down). The trimmed mean keeps the
efficiency of a mean while a few rounds hit by a burst of a neighbour's work, or a GC pause, cannot
move it; the log makes a 2x slowdown and a 2x speedup symmetric.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np

from moec.common.errors import MoecError

CONFIDENCE = 0.95
TRIM = 0.2  # proportion cut from each end of the sorted log slowdowns
MIN_ROUNDS = 20  # a bootstrap interval of fewer rounds is too narrow to trust
_RESAMPLES = 4999
_SEED = 0


@dataclasses.dataclass(frozen=True)
class Interval:
    slowdown: float  # point estimate, slowdown factor - 1 (negative: faster)
    low: float
    high: float
    rounds: int


def _trimmed_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    from scipy import stats

    return stats.trim_mean(x, TRIM, axis=axis)


def look_confidence(looks: int) -> float:
    """The confidence of each look's interval, when a paired bench may stop at any of ``looks``."""
    return 1 - (1 - CONFIDENCE) / looks


def slowdown_interval(ratios: list[float], better: str, confidence: float = CONFIDENCE) -> Interval:
    """Point estimate and ``confidence`` interval of the slowdown from per-round NEW/OLD ratios."""
    from scipy import stats

    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0 or not np.all(np.isfinite(r)) or np.any(r <= 0):
        raise MoecError("paired ratios must be positive finite numbers: regenerate the result with `moec bench --against`")
    x = np.log(r) if better == "lower" else -np.log(r)
    point = float(_trimmed_mean(x))
    if r.size < 3 or np.ptp(x) == 0:
        # No spread to resample (identical rounds): the interval is the point itself.
        lo = hi = point
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa on a nearly degenerate sample warns; checked below
            res = stats.bootstrap((x,), _trimmed_mean, confidence_level=confidence, n_resamples=_RESAMPLES,
                                  method="BCa", vectorized=True, rng=np.random.default_rng(_SEED))
            lo, hi = (float(v) for v in res.confidence_interval)
            if not (math.isfinite(lo) and math.isfinite(hi)):
                res = stats.bootstrap((x,), _trimmed_mean, confidence_level=confidence, n_resamples=_RESAMPLES,
                                      method="percentile", vectorized=True, rng=np.random.default_rng(_SEED))
                lo, hi = (float(v) for v in res.confidence_interval)
    return Interval(math.expm1(point), math.expm1(lo), math.expm1(hi), int(r.size))


def judge(iv: Interval, max_regression: float) -> str:
    if iv.rounds < MIN_ROUNDS:
        return "undecided"
    if iv.low > max_regression:
        return "regression"
    if iv.high < -max_regression:
        return "improved"
    if iv.high <= max_regression:
        return "pass"
    return "undecided"


def rounds_to_decide(iv: Interval, max_regression: float) -> int | None:
    """Rounds after which the interval, shrinking as 1/sqrt(rounds) around the same estimate, would
    clear ``max_regression`` on the side of the estimate; None when the estimate sits on the
    threshold (no number of rounds separates them)."""
    if iv.rounds < MIN_ROUNDS and judge(dataclasses.replace(iv, rounds=MIN_ROUNDS), max_regression) != "undecided":
        return MIN_ROUNDS
    point, lo, hi, thr = (math.log1p(v) for v in (iv.slowdown, iv.low, iv.high, max_regression))
    distance = abs(point - thr)
    half = (point - lo) if point > thr else (hi - point)
    if distance < 1e-4 or half <= 0:
        return None
    # 20% more than the estimate: the interval's width is itself an estimate.
    return max(iv.rounds + 1, math.ceil(1.2 * iv.rounds * (half / distance) ** 2))


def all_decided(ratios: dict[str, list[float]], betters: dict[str, str], max_regression: float,
                confidence: float, metrics: tuple[str, ...] = ()) -> bool:
    """Whether the gate's outcome is settled: every gated metric has a verdict, or one is already a
    regression (the gate then fails whatever the others say). The early stop of a paired bench,
    at the gate's per-look ``confidence``."""
    names = metrics or tuple(betters)
    verdicts = [judge(slowdown_interval(ratios[m], betters[m], confidence), max_regression) for m in names]
    return "regression" in verdicts or "undecided" not in verdicts


# Direction of each metric a paired bench measures (the bench's metric blocks say the same).
PAIRED_BETTER = {"prefill_ms": "lower", "decode_ms_per_step": "lower",
                 "decode_tokens_per_s": "higher", "prefill_tokens_per_s": "higher"}


def validate_paired(data: dict[str, Any], path: str) -> None:
    """The paired fields the gate reads, so a damaged file is an error naming the field."""
    def bad(field: str, value: Any, expected: str) -> MoecError:
        return MoecError(f"{path}: {field} is {str(value)[:80]!r}, expected {expected}: "
                         "regenerate it with `moec bench NEW --against OLD`")

    paired, against = data.get("paired"), data.get("against_metrics")
    if not isinstance(paired, dict):
        raise bad("paired", paired, "an object")
    if not isinstance(against, dict):
        raise bad("against_metrics", against, "an object (OLD's metrics)")
    if not isinstance(data.get("against"), dict) or not isinstance(data["against"].get("identity"), dict):
        raise bad("against.identity", data.get("against"), "the --against artifact's identity")
    ratios = paired.get("ratios")
    if not isinstance(ratios, dict):
        raise bad("paired.ratios", ratios, "an object of per-round ratios")
    rounds = paired.get("rounds")
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise bad("paired.rounds", rounds, "a positive integer")
    for name, values in ratios.items():
        ok = isinstance(values, list) and len(values) == rounds and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)
        if not ok:
            raise bad(f"paired.ratios.{name}", values, f"{rounds} positive finite numbers (one per round)")
    looks = paired.get("looks")
    if not isinstance(looks, int) or isinstance(looks, bool) or looks < 1:
        raise bad("paired.looks", looks, "the number of looks the bench planned (a positive integer)")
    seconds = paired.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds) or seconds < 0:
        raise bad("paired.seconds", seconds, "a number of seconds")
