"""JUnit XML (junit.xml): one testcase per check; a failing check is a <failure>."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gate.report.schema import Report


def render(report: Report) -> str:
    checks = report.checks
    failures = sum(c.status == "fail" for c in checks)
    skipped = sum(c.status == "skipped" for c in checks)
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0"}
    root = ET.Element("testsuites", {"name": "gate", **counts})
    suite = ET.SubElement(
        root,
        "testsuite",
        {"name": f"gate scan {report.model.path}", **counts, "skipped": str(skipped)},
    )
    props = ET.SubElement(suite, "properties")
    for name, value in (
        ("verdict", report.verdict),
        ("policy", report.policy),
        ("model.sha256", report.model.sha256),
        ("gate_version", report.gate_version),
    ):
        ET.SubElement(props, "property", {"name": name, "value": value})
    for check in checks:
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": f"gate.{report.policy}", "name": check.name, "file": report.model.path},
        )
        if check.status == "fail":
            failure = ET.SubElement(case, "failure", {"message": check.message, "type": check.name})
            failure.text = _detail(check.message, check.value, check.threshold)
        elif check.status == "skipped":
            ET.SubElement(case, "skipped", {"message": check.message})
        else:
            out = ET.SubElement(case, "system-out")
            out.text = f"{check.status.upper()}: {check.message}"
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def _detail(message: str, value: float | None, threshold: float | None) -> str:
    parts = [message]
    if value is not None:
        parts.append(f"value: {value:.6g}")
    if threshold is not None:
        parts.append(f"threshold: {threshold:.6g}")
    return "\n".join(parts)
