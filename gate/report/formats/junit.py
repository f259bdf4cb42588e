"""JUnit XML (junit.xml): one testcase per check; a failing check is a <failure>, a warning
one carries its message in <properties> and <system-out>."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gate.report.escape import xml_text as x
from gate.report.schema import CheckResult, Report

# Every value from the report goes through ``x`` (gate.report.escape.xml_text): a model
# path or message may hold characters XML 1.0 forbids, which ElementTree writes as they are.


def render(report: Report) -> str:
    checks = report.checks
    failures = sum(c.effect() == "fail" for c in checks)
    skipped = sum(_skipped(c) for c in checks)
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0"}
    root = ET.Element("testsuites", {"name": "gate", **counts})
    suite = ET.SubElement(
        root,
        "testsuite",
        {"name": x(f"gate scan {report.model.path}"), **counts, "skipped": str(skipped)},
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("verdict", report.verdict),
        ("policy", report.policy),
        ("model.sha256", report.model.sha256),
        ("gate_version", report.gate_version),
    ):
        ET.SubElement(props, "property", {"name": name, "value": x(value)})
    for check in checks:
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": x(f"gate.{report.policy}"),
                "name": x(check.name),
                "file": x(report.model.path),
            },
        )
        if check.effect() == "fail":
            attrs = {"message": x(check.message), "type": x(check.name)}
            failure = ET.SubElement(case, "failure", attrs)
            failure.text = _detail(check.message, check.value, check.threshold)
        elif _skipped(check):
            ET.SubElement(case, "skipped", {"message": x(check.message)})
        else:
            if check.effect() == "warn":
                # Not a plain pass: JUnit has no warning outcome, so the warning is in the
                # case's properties (as pytest's record_property writes them) and its output.
                cprops = ET.SubElement(case, "properties")
                for name, value in (("gate.status", "warn"), ("gate.message", check.message)):
                    ET.SubElement(cprops, "property", {"name": name, "value": x(value)})
            out = ET.SubElement(case, "system-out")
            label = "WARNING" if check.effect() == "warn" else check.status.upper()
            out.text = x(f"{label}: {check.message}")
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def _skipped(check: CheckResult) -> bool:
    # A check that did not run, or analysed nothing without counting against the verdict.
    not_counted = check.status == "not_analysed" and check.effect() == "pass"
    return check.status == "skipped" or not_counted


def _detail(message: str, value: float | None, threshold: float | None) -> str:
    parts = [x(message)]
    if value is not None:
        parts.append(f"value: {value:.6g}")
    if threshold is not None:
        parts.append(f"threshold: {threshold:.6g}")
    return "\n".join(parts)
