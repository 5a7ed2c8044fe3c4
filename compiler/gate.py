"""CI performance gate: compare a bench result with a baseline and fail on a regression.

For each metric the gate compares medians as a slowdown factor: ``result / baseline`` for a
lower-is-better metric (ms), ``baseline / result`` for a higher-is-better one (tokens/s), so a 2x
drop in tokens/s is a +100% regression exactly like a 2x rise in ms (a relative drop could never
pass 100%, and a wide band would make throughput un-failable). The allowed slowdown is the user's
``max_regression`` widened by a noise band from the repeats: the robust relative spread (1.4826 *
MAD / median, a standard deviation estimate that one outlier repeat cannot inflate) of each run,
combined in quadrature and scaled by ``noise_sigmas``. A band wider than ``max_noise`` is no basis
for a verdict: that metric is "too noisy" and the gate refuses to decide (exit 2).

Results from different devices, hosts or software versions (``backend.describe()``, the host's
CPU and cores) are refused unless ``allow_different_device``; results of a different model,
dtype, precision, lowering or target (the artifact's identity), or from different bench settings
(prompt, gen length, batch, threads), are always refused, since they measure different work. Every
metric of the baseline must be in the result: a result cannot pass by leaving a metric out.

A slowdown beyond the band is a regression only when a rank test (Mann-Whitney U, one-sided, on
the repeats against the baseline's repeats shifted by ``max_regression``) also separates it from
the spread of the repeats; otherwise it is "too noisy" (exit 2). Either way a stored baseline
cannot see how the host's speed drifted between the two runs: paired results
(``moec.compiler.gate_paired``) can, and are what a shared runner should gate on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from moec.common.artifacts import atomic_path
from moec.common.errors import BAD_JSON, MoecError
from moec.runtime.bench import BENCH_FORMAT


@dataclasses.dataclass(frozen=True)
class GateConfig:
    max_regression: float = 0.05  # relative, 0.05 = 5%
    metrics: tuple[str, ...] = ()  # empty: every metric in the result
    noise_sigmas: float = 2.0
    # The widest noise band (noise_sigmas * combined spread) the gate decides on; beyond it a
    # slowdown of the band's size would pass unseen.
    max_noise: float = 0.25
    allow_different_device: bool = False

    def __post_init__(self):
        if not 0 <= self.max_regression < 10:
            raise MoecError(f"--max-regression {self.max_regression:.0%} is out of range: give e.g. 5%")
        if not 0 < self.max_noise < 10:
            raise MoecError(f"--max-noise {self.max_noise:.0%} is out of range: give e.g. 25%")


@dataclasses.dataclass(frozen=True)
class Verdict:
    metric: str
    unit: str
    better: str
    baseline: float
    current: float
    worse_by: float  # slowdown factor - 1: result/baseline (lower better) or baseline/result (higher); negative: better
    allowed: float  # max_regression + noise band
    noise: float  # the noise band: noise_sigmas * combined relative spread
    status: str  # "pass" | "regression" | "improved" | "too noisy" | "undecided" (paired)
    # Paired results only: the confidence interval of the slowdown, the rounds it came from and
    # the rounds that would decide an undecided metric (None: none would, or it is decided).
    low: float | None = None
    high: float | None = None
    rounds: int | None = None
    rounds_needed: int | None = None


@dataclasses.dataclass
class GateReport:
    verdicts: list[Verdict]
    differences: list[str]  # device/version differences that were allowed
    paired: dict[str, Any] | None = None  # a paired result's rounds, seconds and stop reason

    @property
    def passed(self) -> bool:
        return all(v.status in ("pass", "improved") for v in self.verdicts)

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "regression"]

    @property
    def undecided(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status in ("too noisy", "undecided")]


def parse_percent(text: str, option: str = "--max-regression") -> float:
    """'5%' -> 0.05; '0.05' -> 0.05. A bare number of 1 or more ('5') is refused: it is far more
    likely a percentage missing its sign than a 500% allowance."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise MoecError(f"{option} {text!r}: write a percentage like 5% or a fraction like 0.05") from None
    if not math.isfinite(value):
        raise MoecError(f"{option} {text!r}: write a finite percentage like 5%")
    if not t.endswith("%") and abs(value) >= 1:
        raise MoecError(f"{option} {text!r} is ambiguous: write {t}% for a percentage, or a fraction below 1 "
                        f"(0.05 is 5%)")
    return value


def load_result(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MoecError(f"{path} does not exist: write it with `moec bench ARTIFACT --json-out {path}`")
    try:
        data = json.loads(path.read_text())
    except BAD_JSON as e:
        raise MoecError(f"{path} is not valid JSON ({e}): regenerate it with `moec bench`") from e
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise MoecError(f"{path} is not a moec bench result of format {BENCH_FORMAT} (format {found!r}): "
                        "regenerate it with this moec's `moec bench`")
    validate_result(data, path)
    if "paired" in data:
        from moec.compiler.gate_paired import validate_paired

        validate_paired(data, str(path))
    return data


def validate_result(data: dict[str, Any], path: str | Path) -> None:
    """The fields the gate reads, checked so that a hand-edited or damaged file is an error naming
    the file and the field rather than a traceback or a wrong verdict."""
    def bad(field: str, value: Any, expected: str) -> MoecError:
        return MoecError(f"{path}: {field} is {value!r}, expected {expected}: regenerate it with `moec bench`")

    def positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    for block in ("backend", "config", "metrics", "host", "artifact"):
        if not isinstance(data.get(block), dict):
            raise bad(block, data.get(block), "an object")
    if not isinstance(data["artifact"].get("identity"), dict):
        raise bad("artifact.identity", data["artifact"].get("identity"), "the artifact's identity (model, dtype, lowering)")
    if not data["metrics"]:
        raise bad("metrics", data["metrics"], "at least one metric")
    for name, m in data["metrics"].items():
        where = f"metrics.{name}"
        if not isinstance(m, dict):
            raise bad(where, m, "an object")
        if m.get("better") not in ("lower", "higher"):
            raise bad(f"{where}.better", m.get("better"), '"lower" or "higher"')
        if not positive(m.get("median")):
            # A zero median (a metric that measured nothing) cannot be a reference: any change to it is infinite.
            raise bad(f"{where}.median", m.get("median"), "a positive finite number")
        reps = m.get("repeats", [])
        if not isinstance(reps, list) or not all(positive(v) for v in reps):
            raise bad(f"{where}.repeats", reps, "a list of positive finite numbers (one per repeat)")
        if not isinstance(m.get("unit", ""), str):
            raise bad(f"{where}.unit", m.get("unit"), "a string")


def relative_noise(values: list[float]) -> float:
    a = np.asarray(values, dtype=np.float64)
    if a.size < 2:
        return 0.0
    med = float(np.median(a))
    if med == 0:
        return 0.0
    return 1.4826 * float(np.median(np.abs(a - med))) / abs(med)


# describe() keys that name the artifact rather than the device or software: the artifact is what
# a gated change is allowed to change (and CI checkouts put it at different paths).
ARTIFACT_KEYS = frozenset({"model", "path", "engine_dir"})


# Config keys that say how long a bench ran, not what it measured.
DURATION_KEYS = frozenset({"repeats", "warmup", "max_time", "min_rounds"})
# host keys that identify one machine rather than its kind (CI runners of one pool differ in name).
HOST_NAME_KEYS = frozenset({"name"})


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str, skip=frozenset()) -> list[str]:
    return [f"{prefix}{k}: baseline {b.get(k)!r}, result {a.get(k)!r}"
            for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]


def comparability(result: dict[str, Any], baseline: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(device/host/version differences, differences of what was measured: the artifact's
    identity and the bench settings) between two results."""
    env = _differences(result.get("backend", {}), baseline.get("backend", {}), "", ARTIFACT_KEYS)
    env += _differences(result.get("host", {}), baseline.get("host", {}), "host.", HOST_NAME_KEYS)
    setting = _differences(result.get("artifact", {}).get("identity", {}),
                           baseline.get("artifact", {}).get("identity", {}), "artifact.identity.")
    setting += _differences(result.get("config", {}), baseline.get("config", {}), "", DURATION_KEYS)
    return env, setting


def compare(result: dict[str, Any], baseline: dict[str, Any], config: GateConfig = GateConfig(),
            result_name: str = "result", baseline_name: str = "baseline") -> GateReport:
    env, setting = comparability(result, baseline)
    if setting:
        raise MoecError(f"{result_name} and {baseline_name} measured different models or settings ({'; '.join(setting)}): "
                        "rerun the bench with the baseline's model and settings, or compare a paired result "
                        "(`moec bench NEW --against OLD`)")
    if env and not config.allow_different_device:
        raise MoecError(f"{result_name} and {baseline_name} come from different devices or versions ({'; '.join(env)}): "
                        "rerun the baseline on this runner, or pass --allow-different-device")
    missing = [m for m in baseline.get("metrics", {}) if m not in result["metrics"]]
    if missing:
        raise MoecError(f"{result_name} lacks the baseline's metric(s) {', '.join(missing)} (it has: "
                        f"{', '.join(result['metrics'])}): every metric of the baseline must be measured; "
                        "regenerate the result with `moec bench`")
    names = config.metrics or tuple(baseline.get("metrics", {}))
    verdicts = []
    for name in names:
        if name not in result["metrics"]:
            raise MoecError(f"{result_name} has no metric {name!r} (it has: {', '.join(result['metrics'])})")
        if name not in baseline.get("metrics", {}):
            raise MoecError(f"baseline {baseline_name} has no metric {name!r} (it has: {', '.join(baseline.get('metrics', {})) or 'none'}): "
                            "regenerate the baseline with this moec's `moec bench`, or drop --metric " + name)
        verdicts.append(_verdict(name, result["metrics"][name], baseline["metrics"][name], config))
    return GateReport(verdicts, env)


def _verdict(name: str, cur: dict[str, Any], base: dict[str, Any], config: GateConfig) -> Verdict:
    b, c = float(base["median"]), float(cur["median"])
    better = base["better"]
    if cur["better"] != better:
        raise MoecError(f"metric {name} is {better}-is-better in the baseline and {cur['better']}-is-better in the "
                        "result: they come from different moec versions; regenerate the baseline")
    # A slowdown factor in both directions: time grows by c/b, throughput shrinks by b/c.
    worse_by = c / b - 1 if better == "lower" else b / c - 1
    # The spread of 1/x equals the spread of x to first order; take it on the same side as worse_by.
    def spread(values: list[float]) -> float:
        return relative_noise(values if better == "lower" else [1 / v for v in values])

    noise = config.noise_sigmas * math.hypot(spread(base.get("repeats", [])), spread(cur.get("repeats", [])))
    allowed = config.max_regression + noise
    if noise > config.max_noise:
        status = "too noisy"
    else:
        status = "regression" if worse_by > allowed else "improved" if -worse_by > allowed else "pass"
    if status == "regression" and not _separated(cur.get("repeats", []), base.get("repeats", []), better,
                                                 config.max_regression):
        status = "too noisy"
    return Verdict(name, base.get("unit", ""), better, b, c, worse_by, allowed, noise, status)


# One-sided significance a stored-baseline regression needs. With 5 repeats each the smallest
# Mann-Whitney p-value is 1/252, so 5 cleanly separated repeats suffice; 3 never do.
SEPARATION_P = 0.01


def _separated(cur: list[float], base: list[float], better: str, max_regression: float) -> bool:
    """Whether the repeats show the result slower than the baseline's repeats made
    ``max_regression`` slower (Mann-Whitney U, one-sided): a median beyond the band on two or three
    repeats, or on repeats that overlap, is not told apart from noise."""
    from scipy import stats

    if len(cur) < 2 or len(base) < 2:
        return False
    slow_cur = np.asarray(cur, dtype=np.float64) if better == "lower" else 1 / np.asarray(cur, dtype=np.float64)
    slow_base = np.asarray(base, dtype=np.float64) if better == "lower" else 1 / np.asarray(base, dtype=np.float64)
    p = stats.mannwhitneyu(slow_cur, slow_base * (1 + max_regression), alternative="greater").pvalue
    return bool(p < SEPARATION_P)


def noisy_message(report: GateReport, config: GateConfig) -> str:
    if report.paired is not None:
        return undecided_message(report, config)
    wide = [v for v in report.undecided if v.noise > config.max_noise]
    if wide:
        worst = max(wide, key=lambda v: v.noise)
        return (f"noise band {worst.noise:.0%} too wide to gate on: raise --repeats or use a quieter runner "
                f"({', '.join(v.metric for v in wide)}; the limit is --max-noise {config.max_noise:.0%}), "
                "or gate a paired result (`moec bench NEW --against OLD`)")
    return (f"{', '.join(f'{v.metric} {v.worse_by:+.0%}' for v in report.undecided)} slower, but the repeats do not "
            f"separate it from noise (one-sided Mann-Whitney p >= {SEPARATION_P}): raise --repeats, or gate a "
            "paired result (`moec bench NEW --against OLD`)")


def print_report(report: GateReport, console=None) -> None:
    from rich.console import Console

    console = console or Console()
    if report.paired is not None:
        p = report.paired
        rows = [(v.metric, f"{v.baseline:.4g}", f"{v.current:.4g}", f"{v.worse_by:+.1%}",
                 f"{v.low:+.1%}..{v.high:+.1%}", v.status) for v in report.verdicts]
        allowed = report.verdicts[0].allowed if report.verdicts else 0.0
        _print_table(console, f"moec gate: paired, {p.get('rounds')} rounds in {p.get('seconds', 0):.0f} s "
                              f"({p.get('stop')}), allowed {allowed:.1%}",
                     ("metric", "OLD", "NEW", "slower", f"{_confidence_text(report)} interval", "status"), rows)
        console.print("slower: NEW against OLD, the 20%-trimmed mean of the per-round NEW/OLD ratios (OLD/NEW for "
                      f"tokens/s) with its {_confidence_text(report)} bootstrap interval (95% over the bench's "
                      f"{p.get('looks')} looks); OLD, NEW: medians", soft_wrap=False)
        for d in report.differences:
            console.print(f"note: {d}")
        return
    rows = [(v.metric, f"{v.baseline:.4g}", f"{v.current:.4g}", f"{v.worse_by:+.1%}", f"{v.allowed:.1%}",
             f"{v.noise:.1%}", v.status) for v in report.verdicts]
    _print_table(console, "moec gate", ("metric", "baseline", "result", "slower", "allowed", "noise", "status"), rows)
    higher = [v.metric for v in report.verdicts if v.better == "higher"]
    console.print("slower: result/baseline - 1 (higher-is-better metrics: baseline/result - 1); "
                  "allowed: --max-regression + noise band" + (f"; higher is better: {', '.join(higher)}" if higher else ""),
                  soft_wrap=False)
    for d in report.differences:
        console.print(f"[yellow]allowed difference: {d}[/]")


_COLOURS = {"pass": "green", "regression": "red", "improved": "cyan", "too noisy": "yellow", "undecided": "yellow"}


def _print_table(console, title: str, headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Narrow enough for an 80-column CI log (the unit is in each metric's name, the direction in
    the legend); where even that does not fit, one line per metric, so no number is ever cut. The
    last column is the status."""
    from rich import box
    from rich.table import Table

    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    if sum(widths) + 2 * (len(widths) - 1) <= console.width:
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
        for i, col in enumerate(headers):
            table.add_column(col, justify="left" if i in (0, len(headers) - 1) else "right", no_wrap=True,
                             min_width=widths[i])
        for r in rows:
            table.add_row(*r[:-1], f"[{_COLOURS[r[-1]]}]{r[-1]}[/]")
        console.print(table)
    else:
        console.print(f"[bold]{title}[/]")
        for r in rows:
            fields = ", ".join(f"{h} {c}" for h, c in zip(headers[1:-1], r[1:-1]))
            console.print(f"{r[0]}: {fields}: [{_COLOURS[r[-1]]}]{r[-1]}[/]")


def _confidence_text(report: GateReport) -> str:
    """A paired look's confidence, as printed: 98.3%."""
    return f"{report.paired['confidence']:.1%}".replace(".0%", "%")


def _verdict_text(v: Verdict, report: GateReport) -> str:
    if v.low is not None:
        return (f"{v.metric}: OLD {v.baseline:.6g} {v.unit}, NEW {v.current:.6g} {v.unit}, slower by {v.worse_by:+.2%} "
                f"({_confidence_text(report)} interval {v.low:+.2%} .. {v.high:+.2%} over {v.rounds} paired rounds, "
                f"allowed {v.allowed:.2%}, {v.better} is better)")
    return (f"{v.metric}: baseline {v.baseline:.6g} {v.unit}, result {v.current:.6g} {v.unit}, "
            f"worse by {v.worse_by:+.2%} (allowed {v.allowed:.2%}, noise {v.noise:.2%}, {v.better} is better)")


def write_junit(report: GateReport, path: str | Path) -> None:
    """One testcase per metric, a <failure> for each regression, an <error> for each metric too
    noisy to decide (JUnit XML as CI systems read it)."""
    failures = len(report.regressions)
    errors = len(report.undecided)
    suites, suite = _junit_suites(len(report.verdicts), failures, errors)
    for v in report.verdicts:
        case = ET.SubElement(suite, "testcase", classname="moec.gate", name=v.metric, time="0")
        text = _verdict_text(v, report)
        if v.status == "regression":
            ET.SubElement(case, "failure", message=f"{v.metric} regressed by {v.worse_by:.1%}", type="regression").text = text
        elif v.status == "too noisy":
            ET.SubElement(case, "error", message=f"{v.metric}: noise band {v.noise:.1%} too wide to gate on",
                          type="too noisy").text = text
        elif v.status == "undecided":
            needed = f"about {v.rounds_needed} rounds would decide" if v.rounds_needed else "no number of rounds decides"
            ET.SubElement(case, "error", message=f"{v.metric}: undecided ({needed})", type="undecided").text = text
        ET.SubElement(case, "system-out").text = text
    _write_junit(suites, path)


def write_junit_error(message: str, path: str | Path) -> None:
    """A JUnit file with one <error> case, for a gate that could not compare (exit 2), so a CI
    report shows why instead of nothing."""
    suites, suite = _junit_suites(1, 0, 1)
    case = ET.SubElement(suite, "testcase", classname="moec.gate", name="gate", time="0")
    ET.SubElement(case, "error", message=message[:200], type="gate error").text = message
    _write_junit(suites, path)


def _junit_suites(tests: int, failures: int, errors: int):
    suites = ET.Element("testsuites", name="moec", tests=str(tests), failures=str(failures), errors=str(errors))
    suite = ET.SubElement(suites, "testsuite", name="moec.gate", tests=str(tests), failures=str(failures),
                          errors=str(errors), skipped="0")
    return suites, suite


def _write_junit(suites, path: str | Path) -> None:
    ET.indent(suites)
    with atomic_path(path) as tmp:
        ET.ElementTree(suites).write(tmp, encoding="utf-8", xml_declaration=True)


def gate(result_path: str | Path, baseline_path: str | Path | None = None, config: GateConfig = GateConfig()) -> GateReport:
    """Stored-baseline mode with ``baseline_path`` (the result's own metrics, NEW's for a paired
    result); paired mode without it."""
    result = load_result(result_path)
    if baseline_path is None:
        if "paired" not in result:
            raise MoecError(f"{result_path} is a single bench, not a paired one: give --baseline BASE.json, or bench "
                            "with `moec bench NEW --against OLD --json-out R.json` and gate that")
        return compare_paired(result, config, str(result_path))
    return compare(result, load_result(baseline_path), config, str(result_path), str(baseline_path))


def compare_paired(result: dict[str, Any], config: GateConfig = GateConfig(), name: str = "result") -> GateReport:
    """NEW against OLD from the rounds of one paired result (``moec.compiler.gate_paired``)."""
    from moec.compiler.gate_paired import judge, look_confidence, rounds_to_decide, slowdown_interval
    from moec.runtime.bench_paired import check_pairable

    new_rec, old_rec = result["artifact"], result["against"]
    try:
        check_pairable(Path(new_rec.get("path", "NEW")), Path(old_rec.get("path", "OLD")), new_rec, old_rec)
    except KeyError as e:
        raise MoecError(f"{name}: the artifact records lack {e}: regenerate it with `moec bench --against`") from None
    new_m, old_m, ratios = result["metrics"], result["against_metrics"], result["paired"]["ratios"]
    missing = [m for m in old_m if m not in new_m or m not in ratios]
    if missing:
        raise MoecError(f"{name} lacks NEW's values or ratios of {', '.join(missing)}, which OLD has: every metric "
                        "must be measured on both; regenerate it with `moec bench --against`")
    # The bench may have stopped at any of its planned looks: this one is judged at the same level.
    confidence = look_confidence(result["paired"]["looks"])
    verdicts = []
    for metric in config.metrics or tuple(old_m):
        if metric not in old_m:
            raise MoecError(f"{name} has no metric {metric!r} (it has: {', '.join(old_m)})")
        better = old_m[metric]["better"]
        if new_m[metric]["better"] != better:
            raise MoecError(f"{name}: metric {metric} is {better}-is-better for OLD and "
                            f"{new_m[metric]['better']}-is-better for NEW: regenerate it")
        iv = slowdown_interval(ratios[metric], better, confidence)
        status = judge(iv, config.max_regression)
        needed = rounds_to_decide(iv, config.max_regression) if status == "undecided" else None
        verdicts.append(Verdict(metric, old_m[metric].get("unit", ""), better, float(old_m[metric]["median"]),
                                float(new_m[metric]["median"]), iv.slowdown, config.max_regression,
                                (iv.high - iv.low) / 2, status, iv.low, iv.high, iv.rounds, needed))
    differences = [f"NEW and OLD differ in {k}: {old_rec['identity'].get(k)!r} -> {new_rec['identity'].get(k)!r}"
                   for k in sorted(new_rec["identity"]) if new_rec["identity"].get(k) != old_rec["identity"].get(k)]
    paired = {k: result["paired"].get(k) for k in ("rounds", "seconds", "stop", "looks")} | {"confidence": confidence}
    return GateReport(verdicts, differences, paired=paired)


def undecided_message(report: GateReport, config: GateConfig) -> str:
    """For a paired report: which metrics straddle the threshold and how many rounds (and about how
    many seconds of --max-time) would decide them."""
    rounds = report.paired.get("rounds") or 1
    per_round = (report.paired.get("seconds") or 0) / rounds
    parts = []
    for v in report.undecided:
        iv = f"{v.worse_by:+.1%} [{v.low:+.1%}, {v.high:+.1%}]"
        if v.rounds_needed is None:
            parts.append(f"{v.metric} {iv} sits on the threshold: no number of rounds decides it")
        else:
            parts.append(f"{v.metric} {iv}: about {v.rounds_needed} rounds would decide it "
                         f"(--max-time {math.ceil(v.rounds_needed * per_round) + 1})")
    return (f"undecided after {rounds} rounds ({report.paired.get('seconds', 0):.0f} s): the "
            f"{_confidence_text(report)} interval "
            f"straddles --max-regression {config.max_regression:.1%}: " + "; ".join(parts)
            + "; rerun `moec bench NEW --against OLD` with that --max-time")
