"""Performance gate: pass, regression, noise band, device/version refusal, JUnit XML, CLI exit codes."""

from __future__ import annotations

import copy
import json
import xml.etree.ElementTree as ET

import pytest

from moec.common.errors import MoecError
from moec.compiler.gate import GateConfig, compare, gate, parse_percent, relative_noise, write_junit
from moec.runtime.bench import BENCH_FORMAT


IDENTITY = {"model_config_sha256": "c0" * 32, "tokenizer_sha256": "none", "num_layers": 4, "vocab_size": 264,
            "dtype": "fp32", "precision": "fp32", "lowering": "none", "target": "none"}


def result(decode_ms=(10.0, 10.1, 9.9, 10.0, 10.05), tok_s=(100.0, 99.0, 101.0, 100.0, 100.5), device="GPU-A"):
    def metric(unit, better, values):
        values = list(values)
        s = sorted(values)
        return {"unit": unit, "better": better, "median": s[len(s) // 2], "p50": s[len(s) // 2], "p90": s[-1],
                "p99": s[-1], "repeats": values}

    return {
        "format": BENCH_FORMAT,
        "artifact": {"path": "build/engine", "kind": "trt", "sha256": "ab" * 32, "identity": dict(IDENTITY)},
        "backend": {"backend": "trt", "device": device, "trt_version": "10.16.0"},
        "host": {"name": "runner-1", "machine": "x86_64", "cpu": "AMD EPYC", "cores": 2},
        "config": {"prompt_len": 32, "gen_len": 32, "batch": 1, "repeats": len(decode_ms), "warmup": 1, "seed": 0,
                   "threads": 2},
        "metrics": {"decode_ms_per_step": metric("ms", "lower", decode_ms), "decode_tokens_per_s": metric("tokens/s", "higher", tok_s)},
    }


def scaled(res, factor_ms, factor_tok=1.0):
    r = copy.deepcopy(res)
    for name, f in (("decode_ms_per_step", factor_ms), ("decode_tokens_per_s", factor_tok)):
        m = r["metrics"][name]
        m["repeats"] = [v * f for v in m["repeats"]]
        for k in ("median", "p50", "p90", "p99"):
            m[k] *= f
    return r


def status(report):
    return {v.metric: v.status for v in report.verdicts}


def test_same_numbers_pass():
    report = compare(result(), result())
    assert report.passed and status(report) == {"decode_ms_per_step": "pass", "decode_tokens_per_s": "pass"}


def test_slowdown_beyond_band_fails_and_speedup_is_improved():
    base = result()
    assert status(compare(scaled(base, 1.10), base)) == {"decode_ms_per_step": "regression", "decode_tokens_per_s": "pass"}
    assert not compare(scaled(base, 1.0, 0.85), base).passed
    assert status(compare(scaled(base, 0.8, 1.3), base)) == {"decode_ms_per_step": "improved", "decode_tokens_per_s": "improved"}
    # 3% slower is inside the default 5%.
    assert compare(scaled(base, 1.03), base).passed
    # 6% is inside 5% + the band of these repeats (about 2%), not inside 1% + the band.
    assert compare(scaled(base, 1.06), base).passed
    assert not compare(scaled(base, 1.06), base, GateConfig(max_regression=0.01)).passed


def test_noisy_repeats_widen_the_band():
    noisy = result(decode_ms=(10.0, 10.6, 9.6, 10.4, 9.8))
    assert relative_noise(noisy["metrics"]["decode_ms_per_step"]["repeats"]) > 0.05
    slower = scaled(noisy, 1.10)
    v = compare(slower, noisy).verdicts[0]
    assert v.status == "pass" and v.allowed > 0.10
    # The same 10% with quiet repeats is a regression.
    assert compare(scaled(result(), 1.10), result()).verdicts[0].status == "regression"


def test_throughput_slowdown_is_symmetric_with_latency():
    base = result()
    # Half the tokens/s is the same +100% slowdown as twice the ms per step.
    report = compare(scaled(base, 2.0, 0.5), base)
    v = {x.metric: x for x in report.verdicts}
    assert v["decode_tokens_per_s"].worse_by == pytest.approx(1.0)
    assert v["decode_ms_per_step"].worse_by == pytest.approx(1.0)
    assert status(report) == {"decode_ms_per_step": "regression", "decode_tokens_per_s": "regression"}
    # A 10x drop is +900%, not a capped -90%.
    assert compare(scaled(base, 1.0, 0.1), base).verdicts[1].worse_by == pytest.approx(9.0)
    assert status(compare(scaled(base, 1.0, 1.25), base))["decode_tokens_per_s"] == "improved"


def test_a_band_wider_than_the_cap_refuses_to_decide():
    # Repeats as noisy as a shared CPU runner's: the band (about 84%) would let a 2x slowdown pass.
    noisy = result(decode_ms=(10.0, 13.0, 8.0, 12.0, 9.0), tok_s=(100.0, 77.0, 125.0, 83.0, 111.0))
    report = compare(scaled(noisy, 2.0, 0.5), noisy)
    assert status(report) == {"decode_ms_per_step": "too noisy", "decode_tokens_per_s": "too noisy"}
    assert not report.passed and not report.regressions
    assert all(v.noise > 0.25 for v in report.verdicts)
    # The cap is configurable.
    wide = compare(scaled(noisy, 2.0, 0.5), noisy, GateConfig(max_noise=2.0))
    assert status(wide) == {"decode_ms_per_step": "regression", "decode_tokens_per_s": "regression"}


def test_different_device_or_version_is_refused_unless_allowed():
    with pytest.raises(MoecError, match="different devices or versions .*device: baseline 'GPU-A', result 'GPU-B'.*--allow-different-device"):
        compare(result(device="GPU-B"), result())
    report = compare(result(device="GPU-B"), result(), GateConfig(allow_different_device=True))
    assert report.passed and report.differences == ["device: baseline 'GPU-A', result 'GPU-B'"]


def test_artifact_path_is_not_a_device_difference():
    moved = result()
    moved["backend"]["model"] = "/ci/checkout-2/build/model.onnx"
    assert compare(moved, result()).differences == []


def test_different_bench_settings_are_refused():
    other = result()
    other["config"]["gen_len"] = 64
    with pytest.raises(MoecError, match="different models or settings .*gen_len"):
        compare(other, result(), GateConfig(allow_different_device=True))


def test_baseline_without_the_metric():
    base = result()
    del base["metrics"]["decode_tokens_per_s"]
    # By default the gate judges the baseline's metrics; asking for one the baseline lacks is an error.
    assert status(compare(result(), base)) == {"decode_ms_per_step": "pass"}
    with pytest.raises(MoecError, match="baseline .* has no metric 'decode_tokens_per_s' \\(it has: decode_ms_per_step\\)"):
        compare(result(), base, GateConfig(metrics=("decode_tokens_per_s",)))
    with pytest.raises(MoecError, match="no metric 'nope'"):
        compare(result(), result(), GateConfig(metrics=("nope",)))


def test_junit_xml(tmp_path):
    base = result()
    report = compare(scaled(base, 1.2), base)
    path = tmp_path / "gate.xml"
    write_junit(report, path)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert cases["decode_ms_per_step"].find("failure") is not None
    assert "worse by +20.00%" in cases["decode_ms_per_step"].find("failure").text
    assert cases["decode_tokens_per_s"].find("failure") is None


@pytest.mark.parametrize("field, value, message", [
    ("median", "fast", "metrics.decode_ms_per_step.median is 'fast', expected a positive finite number"),
    ("median", 0, "metrics.decode_ms_per_step.median is 0, expected a positive"),
    ("repeats", [0, 0, 0], "metrics.decode_ms_per_step.repeats is \\[0, 0, 0\\]"),
    ("better", "faster", "metrics.decode_ms_per_step.better is 'faster'"),
])
def test_malformed_metric_names_file_and_field(tmp_path, field, value, message):
    bad = result()
    bad["metrics"]["decode_ms_per_step"][field] = value
    path = tmp_path / "base.json"
    path.write_text(json.dumps(bad))
    (tmp_path / "r.json").write_text(json.dumps(result()))
    with pytest.raises(MoecError, match=f"base.json: {message}"):
        gate(tmp_path / "r.json", path)


def test_table_is_readable_in_80_columns():
    import io

    from rich.console import Console

    from moec.compiler.gate import print_report

    base = result()
    base["metrics"]["prefill_tokens_per_s"] = dict(base["metrics"]["decode_tokens_per_s"], median=24870.0, repeats=[24870.0])
    slow = scaled(base, 2.0, 0.5)
    slow["metrics"]["prefill_tokens_per_s"] = dict(base["metrics"]["prefill_tokens_per_s"], median=12430.0, repeats=[12430.0])
    out = io.StringIO()
    print_report(compare(slow, base), Console(file=out, width=80, color_system=None))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    for cell in ("2.487e+04", "1.243e+04", "+100.0%", "regression", "prefill_tokens_per_s", "decode_ms_per_step"):
        assert cell in text, cell


def test_parse_percent():
    assert parse_percent("5%") == pytest.approx(0.05) and parse_percent("0.1") == pytest.approx(0.1)
    with pytest.raises(MoecError, match="percentage"):
        parse_percent("five")


def test_bad_result_files(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(MoecError, match="not a moec bench result"):
        gate(tmp_path / "x.json", tmp_path / "x.json")
    with pytest.raises(MoecError, match="does not exist"):
        gate(tmp_path / "missing.json", tmp_path / "x.json")


def test_cli_exit_codes(tmp_path, capsys):
    from moec.compiler.cli import main

    base, same, slow = tmp_path / "base.json", tmp_path / "same.json", tmp_path / "slow.json"
    base.write_text(json.dumps(result()))
    same.write_text(json.dumps(result()))
    slow.write_text(json.dumps(scaled(result(), 1.5)))
    main(["gate", str(same), "--baseline", str(base), "--junit", str(tmp_path / "ok.xml")])
    assert ET.parse(tmp_path / "ok.xml").getroot().get("failures") == "0"
    with pytest.raises(SystemExit) as e:
        main(["gate", str(slow), "--baseline", str(base), "--max-regression", "10%"])
    assert e.value.code == 1 and "regression in decode_ms_per_step" in capsys.readouterr().err
    nometric = result()
    del nometric["metrics"]["decode_ms_per_step"]
    (tmp_path / "nometric.json").write_text(json.dumps(nometric))
    with pytest.raises(SystemExit) as e:
        main(["gate", str(same), "--baseline", str(tmp_path / "nometric.json"), "--metric", "decode_ms_per_step"])
    assert e.value.code == 2 and "has no metric 'decode_ms_per_step'" in capsys.readouterr().err


def test_cli_cannot_decide_exits_2_and_still_writes_junit(tmp_path, capsys):
    from moec.compiler.cli import main

    noisy = result(decode_ms=(10.0, 13.0, 8.0, 12.0, 9.0), tok_s=(100.0, 77.0, 125.0, 83.0, 111.0))
    (tmp_path / "base.json").write_text(json.dumps(noisy))
    (tmp_path / "slow.json").write_text(json.dumps(scaled(noisy, 2.0, 0.5)))
    (tmp_path / "other.json").write_text(json.dumps(result(device="GPU-B")))
    junit = tmp_path / "gate.xml"
    with pytest.raises(SystemExit) as e:
        main(["gate", str(tmp_path / "slow.json"), "--baseline", str(tmp_path / "base.json"), "--junit", str(junit)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "too wide to gate on: raise --repeats or use a quieter runner" in err
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("errors") == "2" and suite.get("failures") == "0"
    assert all(c.find("error") is not None for c in suite.findall("testcase"))
    # --max-noise widens the cap: then the 2x slowdown is a regression.
    with pytest.raises(SystemExit) as e:
        main(["gate", str(tmp_path / "slow.json"), "--baseline", str(tmp_path / "base.json"), "--max-noise", "200%"])
    assert e.value.code == 1
    capsys.readouterr()
    # A comparison refused outright (different device) writes one <error> case too.
    junit.unlink()
    with pytest.raises(SystemExit) as e:
        main(["gate", str(tmp_path / "other.json"), "--baseline", str(tmp_path / "base.json"), "--junit", str(junit)])
    assert e.value.code == 2
    root = ET.parse(junit).getroot()
    assert root.get("errors") == "1" and "different devices" in root.find("testsuite/testcase/error").get("message")


# --- Gate integrity (issue 11) ---------------------------------------------------------------------

def test_a_result_without_the_regressed_metric_fails_naming_it():
    base = result()
    slow = scaled(base, 1.5)
    assert not compare(slow, base).passed
    del slow["metrics"]["decode_ms_per_step"]
    with pytest.raises(MoecError, match="lacks the baseline's metric\\(s\\) decode_ms_per_step"):
        compare(slow, base)
    # --metric does not get around it either.
    with pytest.raises(MoecError, match="lacks the baseline's metric"):
        compare(slow, base, GateConfig(metrics=("decode_tokens_per_s",)))


@pytest.mark.parametrize("block, field, value", [
    ("identity", "model_config_sha256", "d1" * 32),
    ("identity", "dtype", "fp16"),
    ("identity", "lowering", "ort"),
    ("identity", "tokenizer_sha256", "e2" * 32),
    ("config", "threads", 1),
    ("config", "batch", 4),
    ("config", "prompt_len", 128),
])
def test_unlike_results_are_refused_naming_the_field(block, field, value):
    other = result()
    (other["artifact"]["identity"] if block == "identity" else other["config"])[field] = value
    with pytest.raises(MoecError, match=f"different models or settings .*{field}: baseline .*, result {value!r}"):
        compare(other, result(), GateConfig(allow_different_device=True))


def test_another_host_kind_is_refused_but_not_another_runner_name():
    renamed = result()
    renamed["host"]["name"] = "runner-7"
    assert compare(renamed, result()).passed
    other = result()
    other["host"]["cpu"] = "Intel Xeon"
    with pytest.raises(MoecError, match="host.cpu: baseline 'AMD EPYC', result 'Intel Xeon'.*--allow-different-device"):
        compare(other, result())
    assert compare(other, result(), GateConfig(allow_different_device=True)).passed


def test_a_result_without_identity_is_refused(tmp_path):
    old = result()
    del old["artifact"]["identity"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "r.json").write_text(json.dumps(result()))
    with pytest.raises(MoecError, match="old.json: artifact.identity is None"):
        gate(tmp_path / "r.json", tmp_path / "old.json")


# --- Stored-baseline mode never calls noise a regression ------------------------------------------------

def test_a_shift_the_repeats_cannot_separate_is_too_noisy_not_a_regression():
    # Three repeats each, all 30% slower: beyond the band, but three repeats are no evidence
    # (the smallest one-sided Mann-Whitney p of 3 against 3 is 0.05).
    base = result(decode_ms=(10.0, 10.1, 9.9), tok_s=(100.0, 99.0, 101.0))
    report = compare(scaled(base, 1.3, 1 / 1.3), base)
    assert status(report) == {"decode_ms_per_step": "too noisy", "decode_tokens_per_s": "too noisy"}
    assert not report.regressions
    # Overlapping repeats whose medians differ beyond the band: too noisy too.
    base = result(decode_ms=(10.0, 10.0, 10.0, 13.0, 13.0), tok_s=(100.0, 100.0, 100.0, 77.0, 77.0))
    slow = result(decode_ms=(10.0, 13.0, 13.0, 13.0, 13.0), tok_s=(100.0, 77.0, 77.0, 77.0, 77.0))
    v = compare(slow, base, GateConfig(max_noise=5.0)).verdicts[0]
    assert v.worse_by > v.allowed and v.status == "too noisy"
    # Five cleanly separated repeats are a regression.
    base = result()
    assert status(compare(scaled(base, 1.3, 1 / 1.3), base))["decode_ms_per_step"] == "regression"


def test_cli_too_noisy_message_names_the_rank_test(tmp_path, capsys):
    from tests.moec_cli import run_cli

    base = result(decode_ms=(10.0, 10.1, 9.9), tok_s=(100.0, 99.0, 101.0))
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "slow.json").write_text(json.dumps(scaled(base, 1.3, 1 / 1.3)))
    code, _, err = run_cli(["gate", tmp_path / "slow.json", "--baseline", tmp_path / "base.json"], capsys)
    assert code == 2 and "do not separate it from noise" in err and "--against" in err


@pytest.mark.parametrize("text", ["5", "1", "25", "1.5"])
def test_bare_numbers_of_one_or_more_are_refused(text):
    with pytest.raises(MoecError, match=f"--max-regression '{text}' is ambiguous: write {text}% for a percentage"):
        parse_percent(text)
    assert parse_percent(f"{text}%") == pytest.approx(float(text) / 100)


def test_cli_refuses_a_bare_max_regression(tmp_path, capsys):
    from tests.moec_cli import run_cli

    (tmp_path / "r.json").write_text(json.dumps(result()))
    code, _, err = run_cli(["gate", tmp_path / "r.json", "--baseline", tmp_path / "r.json", "--max-regression", "5"],
                           capsys)
    assert code == 2 and "ambiguous" in err and "Traceback" not in err
