"""CI performance gate: compare a bench result with a baseline and fail on a regression.

For each metric the gate compares medians. The allowed change is the user's ``max_regression``
widened by a noise band from the repeats: the robust relative spread (1.4826 * MAD / median, a
standard deviation estimate that one outlier repeat cannot inflate) of each run, combined in
quadrature and scaled by ``noise_sigmas``. A change in the metric's "worse" direction beyond the
allowance is a regression; beyond it the other way, an improvement.

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
    allow_different_device: bool = False

    def __post_init__(self):
        if not 0 <= self.max_regression < 10:
            raise MoecError(f"--max-regression {self.max_regression:.0%} is out of range: give e.g. 5%")


@dataclasses.dataclass(frozen=True)
class Verdict:
    metric: str
    unit: str
    better: str
    baseline: float
    current: float
    worse_by: float  # relative change in the worse direction (negative: better)
    allowed: float  # max_regression + noise band
    noise: float
    status: str  # "pass" | "regression" | "improved"


@dataclasses.dataclass
class GateReport:
    verdicts: list[Verdict]
    differences: list[str]  # device/version differences that were allowed

    @property
    def passed(self) -> bool:
        return all(v.status != "regression" for v in self.verdicts)


def parse_percent(text: str) -> float:
    """'5%' -> 0.05; '0.05' -> 0.05."""
    t = str(text).strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise MoecError(f"--max-regression {text!r}: write a percentage like 5% or a fraction like 0.05") from None


def load_result(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MoecError(f"{path} does not exist: write it with `moec bench ARTIFACT --json {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoecError(f"{path} is not valid JSON ({e}): regenerate it with `moec bench`") from e
    if not isinstance(data, dict) or data.get("format") != BENCH_FORMAT:
        raise MoecError(f"{path} is not a moec bench result (format {BENCH_FORMAT}): regenerate it with `moec bench`")
    return data


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
    better = base.get("better", "lower")
    if b == 0:
        change = 0.0 if c == 0 else math.inf
    else:
        change = (c - b) / abs(b)
    worse_by = change if better == "lower" else -change
    noise = math.hypot(relative_noise(base.get("repeats", [])), relative_noise(cur.get("repeats", [])))
    allowed = config.max_regression + config.noise_sigmas * noise
    status = "regression" if worse_by > allowed else "improved" if -worse_by > allowed else "pass"
    return Verdict(name, base.get("unit", ""), better, b, c, worse_by, allowed, noise, status)


def print_report(report: GateReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="moec gate")
    for col in ("metric", "unit", "baseline", "result", "worse by", "allowed", "noise", "status"):
        table.add_column(col, justify="left" if col in ("metric", "unit", "status") else "right", no_wrap=True)
    colours = {"pass": "green", "regression": "red", "improved": "cyan"}
    for v in report.verdicts:
        table.add_row(v.metric, f"{v.unit} ({v.better} better)", f"{v.baseline:.4g}", f"{v.current:.4g}",
                      f"{v.worse_by:+.1%}", f"{v.allowed:.1%}", f"{v.noise:.1%}", f"[{colours[v.status]}]{v.status}[/]")
    console.print(table)
    for d in report.differences:
        console.print(f"[yellow]allowed difference: {d}[/]")


def write_junit(report: GateReport, path: str | Path) -> None:
    """One testcase per metric, a <failure> for each regression (JUnit XML as CI systems read it)."""
    failures = sum(v.status == "regression" for v in report.verdicts)
    suites = ET.Element("testsuites", name="moec", tests=str(len(report.verdicts)), failures=str(failures))
    suite = ET.SubElement(suites, "testsuite", name="moec.gate", tests=str(len(report.verdicts)), failures=str(failures),
                          errors="0", skipped="0")
    for v in report.verdicts:
        case = ET.SubElement(suite, "testcase", classname="moec.gate", name=v.metric, time="0")
        text = (f"{v.metric}: baseline {v.baseline:.6g} {v.unit}, result {v.current:.6g} {v.unit}, "
                f"worse by {v.worse_by:+.2%} (allowed {v.allowed:.2%}, noise {v.noise:.2%}, {v.better} is better)")
        if v.status == "regression":
            ET.SubElement(case, "failure", message=f"{v.metric} regressed by {v.worse_by:.1%}", type="regression").text = text
        ET.SubElement(case, "system-out").text = text
    ET.indent(suites)
    with atomic_path(path) as tmp:
        ET.ElementTree(suites).write(tmp, encoding="utf-8", xml_declaration=True)


def gate(result_path: str | Path, baseline_path: str | Path, config: GateConfig = GateConfig()) -> GateReport:
    return compare(load_result(result_path), load_result(baseline_path), config, str(result_path), str(baseline_path))
