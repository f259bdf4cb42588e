"""What the CI formats share: which checks are findings, and how a model path is named."""

from __future__ import annotations

import hashlib

from gate.report.schema import CheckResult, Report

FINDING_STATUSES = ("fail", "warn")


def findings(report: Report) -> list[CheckResult]:
    """The checks a CI system should show: those that fail or warn the verdict (a required
    check that analysed nothing included), in report order. Their level is ``effect()``."""
    return [c for c in report.checks if c.effect() in FINDING_STATUSES]


def artifact_path(report: Report) -> str:
    """The model path as given on the command line, with '/' separators and no leading './'.

    CI systems resolve it against the repository root, so pass repository-relative paths.
    """
    path = report.model.path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def fingerprint(report: Report, check: CheckResult) -> str:
    """A stable id for one finding: the same check on the same model path gives the same id."""
    return hashlib.sha256(f"gate:{check.name}:{artifact_path(report)}".encode()).hexdigest()
