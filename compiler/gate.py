"""CI performance gate: compare a bench result with a baseline and fail on a regression.

For each metric the gate compares medians as a slowdown factor: ``result / baseline`` for a
lower-is-better metric (ms), ``baseline / result`` for a higher-is-better one (tokens/s), so a 2x
drop in tokens/s is a +100% regression exactly like a 2x rise in ms (a relative drop could never
pass 100%, and a wide band would make throughput un-failable). The allowed slowdown is the user's
``max_regression`` widened by a noise band from the repeats: the robust relative spread (1.4826 *
MAD / median, a standard deviation estimate that one outlier repeat cannot inflate) of each run,
combined in quadrature and scaled by ``noise_sigmas``. A band wider than ``max_noise`` is no basis
for a verdict: that metric is "too noisy" and the gate refuses to decide (exit 2).

Results from different devices or software versions (``backend.describe()``) are refused unless
``allow_different_device``; results from different bench settings (prompt, gen length, batch) are
always refused, since they measure different work.
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
from moec.common.errors import MoecError
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
    status: str  # "pass" | "regression" | "improved" | "too noisy"


@dataclasses.dataclass
class GateReport:
    verdicts: list[Verdict]
    differences: list[str]  # device/version differences that were allowed

    @property
    def passed(self) -> bool:
        return all(v.status in ("pass", "improved") for v in self.verdicts)

    @property
    def regressions(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "regression"]

    @property
    def undecided(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status == "too noisy"]


def parse_percent(text: str, option: str = "--max-regression") -> float:
    """'5%' -> 0.05; '0.05' -> 0.05."""
    t = str(text).strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise MoecError(f"{option} {text!r}: write a percentage like 5% or a fraction like 0.05") from None
    if not math.isfinite(value):
        raise MoecError(f"{option} {text!r}: write a finite percentage like 5%")
    return value


def load_result(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MoecError(f"{path} does not exist: write it with `moec bench ARTIFACT --json {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoecError(f"{path} is not valid JSON ({e}): regenerate it with `moec bench`") from e
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise MoecError(f"{path} is not a moec bench result of format {BENCH_FORMAT} (format {found!r}): "
                        "regenerate it with this moec's `moec bench`")
    validate_result(data, path)
    return data


def validate_result(data: dict[str, Any], path: str | Path) -> None:
    """The fields the gate reads, checked so that a hand-edited or damaged file is an error naming
    the file and the field rather than a traceback or a wrong verdict."""
    def bad(field: str, value: Any, expected: str) -> MoecError:
        return MoecError(f"{path}: {field} is {value!r}, expected {expected}: regenerate it with `moec bench`")

    def positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    for block in ("backend", "config", "metrics"):
        if not isinstance(data.get(block), dict):
            raise bad(block, data.get(block), "an object")
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


def comparability(result: dict[str, Any], baseline: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(device/version differences, bench-setting differences) between two results."""
    rb, bb = result.get("backend", {}), baseline.get("backend", {})
    env = [f"{k}: baseline {bb.get(k)!r}, result {rb.get(k)!r}"
           for k in sorted(set(rb) | set(bb)) if k not in ARTIFACT_KEYS and rb.get(k) != bb.get(k)]
    rc, bc = result.get("config", {}), baseline.get("config", {})
    setting = [f"{k}: baseline {bc.get(k)!r}, result {rc.get(k)!r}"
               for k in sorted(set(rc) | set(bc)) if k not in ("repeats", "warmup") and rc.get(k) != bc.get(k)]
    return env, setting


def compare(result: dict[str, Any], baseline: dict[str, Any], config: GateConfig = GateConfig(),
            result_name: str = "result", baseline_name: str = "baseline") -> GateReport:
    env, setting = comparability(result, baseline)
    if setting:
        raise MoecError(f"{result_name} and {baseline_name} were benched with different settings ({'; '.join(setting)}): "
                        "rerun the bench with the baseline's settings")
    if env and not config.allow_different_device:
        raise MoecError(f"{result_name} and {baseline_name} come from different devices or versions ({'; '.join(env)}): "
                        "rerun the baseline on this runner, or pass --allow-different-device")
    names = config.metrics or tuple(result["metrics"])
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
    return Verdict(name, base.get("unit", ""), better, b, c, worse_by, allowed, noise, status)


def noisy_message(report: GateReport, config: GateConfig) -> str:
    worst = max(report.undecided, key=lambda v: v.noise)
    return (f"noise band {worst.noise:.0%} too wide to gate on: raise --repeats or use a quieter runner "
            f"({', '.join(v.metric for v in report.undecided)}; the limit is --max-noise {config.max_noise:.0%})")


def print_report(report: GateReport, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    colours = {"pass": "green", "regression": "red", "improved": "cyan", "too noisy": "yellow"}
    rows = [(v.metric, f"{v.baseline:.4g}", f"{v.current:.4g}", f"{v.worse_by:+.1%}", f"{v.allowed:.1%}",
             f"{v.noise:.1%}", v.status) for v in report.verdicts]
    headers = ("metric", "baseline", "result", "slower", "allowed", "noise", "status")
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    # Narrow enough for an 80-column CI log (the unit is in each metric's name, the direction in
    # the legend); where even that does not fit, one line per metric, so no number is ever cut.
    if sum(widths) + 2 * (len(widths) - 1) <= console.width:
        table = Table(title="moec gate", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0), show_edge=False)
        for i, col in enumerate(headers):
            table.add_column(col, justify="left" if i in (0, 6) else "right", no_wrap=True, min_width=widths[i])
        for r in rows:
            table.add_row(*r[:-1], f"[{colours[r[-1]]}]{r[-1]}[/]")
        console.print(table)
    else:
        console.print("[bold]moec gate[/]")
        for r in rows:
            console.print(f"{r[0]}: baseline {r[1]}, result {r[2]}, slower {r[3]} (allowed {r[4]}, noise {r[5]}): "
                          f"[{colours[r[6]]}]{r[6]}[/]")
    higher = [v.metric for v in report.verdicts if v.better == "higher"]
    console.print("slower: result/baseline - 1 (higher-is-better metrics: baseline/result - 1); "
                  "allowed: --max-regression + noise band" + (f"; higher is better: {', '.join(higher)}" if higher else ""),
                  soft_wrap=False)
    for d in report.differences:
        console.print(f"[yellow]allowed difference: {d}[/]")


def write_junit(report: GateReport, path: str | Path) -> None:
    """One testcase per metric, a <failure> for each regression, an <error> for each metric too
    noisy to decide (JUnit XML as CI systems read it)."""
    failures = len(report.regressions)
    errors = len(report.undecided)
    suites, suite = _junit_suites(len(report.verdicts), failures, errors)
    for v in report.verdicts:
        case = ET.SubElement(suite, "testcase", classname="moec.gate", name=v.metric, time="0")
        text = (f"{v.metric}: baseline {v.baseline:.6g} {v.unit}, result {v.current:.6g} {v.unit}, "
                f"worse by {v.worse_by:+.2%} (allowed {v.allowed:.2%}, noise {v.noise:.2%}, {v.better} is better)")
        if v.status == "regression":
            ET.SubElement(case, "failure", message=f"{v.metric} regressed by {v.worse_by:.1%}", type="regression").text = text
        elif v.status == "too noisy":
            ET.SubElement(case, "error", message=f"{v.metric}: noise band {v.noise:.1%} too wide to gate on",
                          type="too noisy").text = text
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


def gate(result_path: str | Path, baseline_path: str | Path, config: GateConfig = GateConfig()) -> GateReport:
    return compare(load_result(result_path), load_result(baseline_path), config, str(result_path), str(baseline_path))
