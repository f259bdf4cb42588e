"""GitHub Actions: annotations (workflow commands), step outputs, the step summary, and
``::stop-commands::`` around the whole run."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gate.ci.base import Publication
from gate.report.escape import human

if TYPE_CHECKING:
    from gate.report.schema import CheckResult, Report

STEP_SUMMARY_LIMIT = 1024 * 1024


class GitHub:
    name = "github"

    def detected(self, env: Mapping[str, str]) -> bool:
        return env.get("GITHUB_ACTIONS") == "true"

    def guard(self, env: Mapping[str, str], stream: TextIO) -> StopCommands:
        return StopCommands(stream)

    def publish(self, report: Report, report_dir: Path, env: Mapping[str, str]) -> Publication:
        appends: list[tuple[Path, bytes]] = []
        if env.get("GITHUB_STEP_SUMMARY"):
            text = step_summary(report, artifacts_url(env))
            appends.append((Path(env["GITHUB_STEP_SUMMARY"]), text))
        if env.get("GITHUB_OUTPUT"):
            outputs = outputs_file(github_outputs(report, report_dir))
            appends.append((Path(env["GITHUB_OUTPUT"]), outputs))
        return Publication(commands=github_annotations(report), appends=appends)


def artifacts_url(env: Mapping[str, str]) -> str | None:
    """The run's page, where its uploaded artifacts are listed (None outside a real run)."""
    parts = [env.get(k, "") for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")]
    if not all(parts):
        return None
    server, repo, run = parts
    return f"{server.rstrip('/')}/{repo}/actions/runs/{run}#artifacts"


def step_summary(report: Report, url: str | None) -> bytes:
    """The markdown summary for the step summary page, where links relative to the report
    directory would be dead: pictures are named as files of the report artifact."""
    from gate.report.formats import markdown

    return truncated(markdown.render(report, artifacts=url or ""))


def github_annotations(report: Report) -> list[str]:
    """Workflow commands: ``::error`` for each failing check, ``::warning`` for each warning."""
    kinds = {"fail": "error", "warn": "warning"}
    path = report.model.path
    return [
        f"::{kinds[c.effect()]} file={escape_property(path)},"
        f"title={escape_property(_annotation_title(c))}::{escape_data(c.message)}"
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


def escape_data(text: str) -> str:
    # GitHub's escapes first (the runner decodes them), then any other control character
    # made visible, so an ESC in a file name cannot colour or rewrite the log line.
    return human(text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A"))


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def outputs_file(values: dict[str, str]) -> bytes:
    # One line per output: a report dir with a newline must not add an output of its own.
    lines = "".join(
        f"{key}={value.replace(chr(10), ' ').replace(chr(13), ' ')}\n"
        for key, value in values.items()
    )
    return lines.encode("utf-8")


def truncated(text: str) -> bytes:
    """``text`` cut to fit GitHub's 1 MiB step-summary limit (with a note saying so)."""
    data = text.encode("utf-8")
    if len(data) > STEP_SUMMARY_LIMIT - 1024:
        note = (
            "\n\n_(summary truncated to fit GitHub's 1 MiB step-summary limit; see report.json)_\n"
        )
        data = data[: STEP_SUMMARY_LIMIT - 1024].decode("utf-8", "ignore").encode() + note.encode()
    return data


class StopCommands:
    """Stops workflow-command processing for a whole run under GitHub Actions.

    Entered at the start of the CLI (before anything can print untrusted text) and left at
    the end, with a random token per run. gate's own commands are printed after the
    resume marker (gate.ci.emit_commands queues them). Both markers go to ``stream``
    (stdout, or stderr when stdout carries a report: ``-o -``); both streams are flushed
    before the resume, so the step's log keeps the order.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.token = ""

    def __enter__(self) -> StopCommands:
        import secrets  # only here: `gate --help` stays quick to start

        self.token = secrets.token_hex(16)
        self.stream.write(f"::stop-commands::{self.token}\n")
        self.stream.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self.stream.write(f"::{self.token}::\n")
        self.stream.flush()


SYSTEM = GitHub()
