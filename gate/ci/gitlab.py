"""GitLab CI: a dotenv report (``gate.env``) with the verdict, for later jobs' variables.

GitLab reads JUnit and Code Quality from the report formats (``--format junit,codequality``);
what GitHub gets as step outputs, GitLab gets from ``artifacts:reports:dotenv``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gate.ci.base import Publication

if TYPE_CHECKING:
    from gate.report.schema import Report

DOTENV = "gate.env"


class GitLab:
    name = "gitlab"

    def detected(self, env: Mapping[str, str]) -> bool:
        return env.get("GITLAB_CI") == "true"

    def guard(self, env: Mapping[str, str], stream: TextIO) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def publish(self, report: Report, report_dir: Path, env: Mapping[str, str]) -> Publication:
        return Publication(files={DOTENV: dotenv(report, report_dir).encode("utf-8")})


def dotenv(report: Report, report_dir: Path) -> str:
    """GATE_VERDICT, GATE_ANOMALY_SCORE and GATE_REPORT_DIR, one ``KEY=value`` line each
    (GitLab's dotenv takes no quoting or multi-line values, so line breaks become spaces)."""
    score = report.fingerprint.anomaly_score if report.fingerprint is not None else None
    values = {
        "GATE_VERDICT": report.verdict,
        "GATE_ANOMALY_SCORE": "" if score is None else f"{score:.6g}",
        "GATE_REPORT_DIR": str(report_dir),
    }
    return "".join(f"{k}={' '.join(v.splitlines())}\n" for k, v in values.items())


SYSTEM = GitLab()
