"""GitLab Code Quality (gl-code-quality.json): one issue per failing or warning check."""

from __future__ import annotations

import json
from typing import Any

from gate.report.formats._findings import artifact_path, findings, fingerprint
from gate.report.schema import Report

_SEVERITY = {"fail": "critical", "warn": "minor"}


def render(report: Report) -> str:
    issues: list[dict[str, Any]] = [
        {
            "type": "issue",
            "description": f"gate {check.name}: {check.message}",
            "check_name": f"gate/{check.name}",
            "categories": ["Security"],
            "fingerprint": fingerprint(report, check),
            "severity": _SEVERITY[check.effect()],
            "location": {"path": artifact_path(report), "lines": {"begin": 1}},
        }
        for check in findings(report)
    ]
    return json.dumps(issues, indent=2, sort_keys=True) + "\n"
