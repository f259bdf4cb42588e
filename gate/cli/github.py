"""GitHub Actions: gate's own workflow commands (annotations) and the step files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gate.report.escape import human

if TYPE_CHECKING:
    from gate.report.schema import CheckResult, Report

STEP_SUMMARY_LIMIT = 1024 * 1024


def github_annotations(report: Report) -> list[str]:
    """Workflow commands: ``::error`` for each failing check, ``::warning`` for each warning."""
    kinds = {"fail": "error", "warn": "warning"}
    path = report.model.path
    return [
        f"::{kinds[c.effect()]} file={_escape_property(path)},"
        f"title={_escape_property(_annotation_title(c))}::{_escape_data(c.message)}"
        for c in report.checks
        if c.effect() in kinds
    ]


def github_outputs(report: Report, report_dir: Path) -> dict[str, str]:
    score = report.fingerprint.anomaly_score if report.fingerprint is not None else None
    return {
        "verdict": report.verdict,
        "anomaly-score": "" if score is None else f"{score:.6g}",
        "report-dir": str(report_dir),
    }


def _annotation_title(check: CheckResult) -> str:
    return f"gate {check.name}: {check.status}"


def _escape_data(text: str) -> str:
    # GitHub's escapes first (the runner decodes them), then any other control character
    # made visible, so an ESC in a file name cannot colour or rewrite the log line.
    return human(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _append_outputs(path: Path, values: dict[str, str]) -> None:
    # One line per output: a report dir with a newline must not add an output of its own.
    lines = "".join(
        f"{key}={value.replace(chr(10), ' ').replace(chr(13), ' ')}\n"
        for key, value in values.items()
    )
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(lines)


def _append_step_summary(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if len(data) > STEP_SUMMARY_LIMIT - 1024:
        note = (
            "\n\n_(summary truncated to fit GitHub's 1 MiB step-summary limit; see report.json)_\n"
        )
        data = data[: STEP_SUMMARY_LIMIT - 1024].decode("utf-8", "ignore").encode() + note.encode()
    with open(path, "ab") as fh:
        fh.write(data)
