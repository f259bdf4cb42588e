"""Report formats: golden files for a fixed report, and the formats on a real demo scan."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gate.report.formats import FORMATS, parse_formats
from gate.report.schema import (
    CheckResult,
    DetectorReport,
    FingerprintReport,
    ModelInfo,
    NearestReference,
    Report,
)
from tests.conftest import run_gate

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
CI_FORMATS = ("sarif", "junit", "codequality")


def fixed_report(verdict: str = "fail") -> Report:
    """A hand-made report: one failing, one skipped and one warning check."""
    checks = [
        CheckResult(
            name="fingerprint",
            status="fail" if verdict == "fail" else "pass",
            severity="fail",
            value=0.0004,
            threshold=0.01,
            message="fingerprint is outside the clean family: p = 0.0004 < fail_alpha 0.01",
        ),
        CheckResult(
            name="activation_clustering",
            status="skipped",
            severity="fail",
            message="activation_clustering not run: no --data given",
        ),
        CheckResult(
            name="baseline_size",
            status="warn",
            severity="warn",
            value=8,
            threshold=10,
            message="baseline has only 8 references (< 10 recommended): p-values are coarse",
        ),
    ]
    return Report.model_validate(
        {
            "gate_version": "0.0.0-test",
            "verdict": verdict,
            "policy": "default",
            "model": ModelInfo(path="./models/candidate, v2.pt", sha256="ab" * 32, format="x"),
            "checks": checks,
            "fingerprint": FingerprintReport(
                anomaly_score=0.9996,
                p_value=0.0004,
                detectors=[DetectorReport(name="lof", score=3.2, p_value=0.001, p_conformal=0.09)],
                nearest_reference=NearestReference(name="ref0", sha256="cd" * 32, distance=1.5),
                top_probes=[],
                layer="@relu_0",
                representation="gram+logits",
                baseline="baseline",
                n_references=8,
            ),
            "activation_clustering": None,
            "reasons": [c.message for c in checks if c.status in {"fail", "warn"}],
        }
    )


def sarif_validator() -> jsonschema.protocols.Validator:
    schema = json.loads((DATA / "sarif-schema-2.1.0.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)  # type: ignore[no-any-return]


def check_sarif(text: str, report: Report) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(text)
    sarif_validator().validate(doc)
    run = doc["runs"][0]
    findings = [c for c in report.checks if c.status in {"fail", "warn"}]
    assert [r["ruleId"] for r in run["results"]] == [c.name for c in findings]
    rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert rule_ids == [c.name for c in report.checks]
    for result, check in zip(run["results"], findings, strict=True):
        assert result["level"] == {"fail": "error", "warn": "warning"}[check.status]
        assert rule_ids[result["ruleIndex"]] == result["ruleId"]
        assert result["message"]["text"] == check.message
        loc = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert (
            loc.replace("%20", " ")
            .replace("%2C", ",")
            .endswith(report.model.path.removeprefix("./").lstrip("/"))
        )
    return doc


def check_junit(text: str, report: Report) -> ET.Element:
    root = ET.fromstring(text)
    cases = root.findall("./testsuite/testcase")
    assert [c.get("name") for c in cases] == [c.name for c in report.checks]
    for case, check in zip(cases, report.checks, strict=True):
        assert (case.find("failure") is not None) == (check.effect() == "fail")
        # A check that examined nothing is never reported as a passing testcase: it is a
        # <skipped> one unless the policy makes it count (then a failure or a warning).
        not_counted = check.status == "not_analysed" and check.effect() == "pass"
        assert (case.find("skipped") is not None) == (check.status == "skipped" or not_counted)
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("tests") == str(len(report.checks))
    assert suite.get("failures") == str(sum(c.effect() == "fail" for c in report.checks))
    return root


def check_codequality(text: str, report: Report) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = json.loads(text)
    findings = [c for c in report.checks if c.status in {"fail", "warn"}]
    assert len(issues) == len(findings)
    for issue, check in zip(issues, findings, strict=True):
        assert {"description", "check_name", "fingerprint", "severity", "location"} <= set(issue)
        assert issue["check_name"] == f"gate/{check.name}"
        assert len(issue["fingerprint"]) == 64 and int(issue["fingerprint"], 16) >= 0
        assert issue["severity"] in {"info", "minor", "major", "critical", "blocker"}
        assert issue["location"]["path"] == report.model.path.removeprefix("./")
        assert issue["location"]["lines"]["begin"] == 1
    assert len({i["fingerprint"] for i in issues}) == len(issues)
    return issues


CHECKERS = {"sarif": check_sarif, "junit": check_junit, "codequality": check_codequality}


@pytest.mark.parametrize("name", CI_FORMATS)
def test_golden(name: str) -> None:
    """Renders byte-for-byte as the golden file (GATE_UPDATE_GOLDEN=1 rewrites them)."""
    fmt = FORMATS[name]
    text = fmt.render(fixed_report())
    golden = GOLDEN / fmt.filename
    if os.environ.get("GATE_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert text == golden.read_text(encoding="utf-8")
    CHECKERS[name](text, fixed_report())


def test_registered_filenames() -> None:
    assert {n: FORMATS[n].filename for n in CI_FORMATS} == {
        "sarif": "gate.sarif",
        "junit": "junit.xml",
        "codequality": "gl-code-quality.json",
    }
    assert [f.name for f in parse_formats(" sarif, junit ,codequality,sarif")] == list(CI_FORMATS)


def test_passing_report_has_no_findings() -> None:
    report = fixed_report("pass").model_copy(
        update={"checks": fixed_report("pass").checks[:2], "reasons": []}
    )
    assert json.loads(FORMATS["codequality"].render(report)) == []
    assert check_sarif(FORMATS["sarif"].render(report), report)["runs"][0]["results"] == []
    assert check_junit(FORMATS["junit"].render(report), report).find(".//failure") is None


def test_codequality_fingerprint_is_stable() -> None:
    a = json.loads(FORMATS["codequality"].render(fixed_report()))
    other = fixed_report().model_copy(update={"gate_version": "9.9.9"})
    assert [i["fingerprint"] for i in a] == [
        i["fingerprint"] for i in json.loads(FORMATS["codequality"].render(other))
    ]


def test_sarif_absolute_path_is_a_file_uri() -> None:
    report = fixed_report()
    report = report.model_copy(
        update={"model": report.model.model_copy(update={"path": "/abs/dir/m.pt"})}
    )
    doc = check_sarif(FORMATS["sarif"].render(report), report)
    uri = doc["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri["uri"] == "file:///abs/dir/m.pt"


@pytest.fixture(scope="module")
def demo_scan(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Report, Path]:
    out = tmp_path_factory.mktemp("formats")
    proc = run_gate(
        "scan",
        str(demo_models["backdoored"]),
        "--baseline",
        str(demo_dir / "baseline"),
        "--report-dir",
        str(out),
        "--quiet",
        "--format",
        "json,sarif,junit,codequality",
    )
    assert proc.returncode == 1, proc.stderr
    return Report.model_validate_json((out / "report.json").read_text()), out


@pytest.mark.parametrize("name", CI_FORMATS)
def test_formats_on_demo_scan(name: str, demo_scan: tuple[Report, Path]) -> None:
    report, out = demo_scan
    text = (out / FORMATS[name].filename).read_text(encoding="utf-8")
    assert text == FORMATS[name].render(report)
    CHECKERS[name](text, report)
    assert "fingerprint" in text
