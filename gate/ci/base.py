"""What every CI system module provides (gate.ci registers them)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:
    from gate.report.schema import Report


@dataclass
class Publication:
    """What one CI system gets for one report.

    ``commands``: log lines the CI acts on (GitHub workflow commands), already escaped,
    printed after the run's own output. ``appends``: data appended to files the CI named
    (GitHub's step summary and outputs). ``files``: extra files for the report directory
    (GitLab's dotenv report).
    """

    commands: list[str] = field(default_factory=list)
    appends: list[tuple[Path, bytes]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)


class CISystem(Protocol):
    name: str

    def detected(self, env: Mapping[str, str]) -> bool:
        """Whether gate runs under this CI (from its environment variables)."""
        ...

    def guard(self, env: Mapping[str, str], stream: TextIO) -> AbstractContextManager[object]:
        """Entered for the whole run, before anything prints untrusted text."""
        ...

    def publish(
        self, report: Report, report_dir: Path, env: Mapping[str, str]
    ) -> Publication: ...
