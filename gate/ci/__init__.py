"""CI systems: what gate tells the CI it runs under, beyond the report files.

Each system is one module with a ``SYSTEM`` object (:class:`gate.ci.base.CISystem`) and
one line in :data:`SYSTEMS`. A system only *says* what to publish
(:class:`gate.ci.base.Publication`); the CLI writes it, as it writes every report file.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from gate.ci import github, gitlab
from gate.ci.base import CISystem, Publication

if TYPE_CHECKING:
    from gate.report.schema import Report

__all__ = [
    "SYSTEMS",
    "CISystem",
    "Publication",
    "detected",
    "emit_commands",
    "guard",
    "publications",
]


# The registry: add a CI system with a module and a line here.
SYSTEMS: tuple[CISystem, ...] = (github.SYSTEM, gitlab.SYSTEM)


def detected(env: Mapping[str, str]) -> list[CISystem]:
    return [s for s in SYSTEMS if s.detected(env)]


class _Run:
    """The whole CLI run under the detected systems' guards. Commands queued meanwhile
    (:func:`emit_commands`) are printed once every guard has ended, so that the CI acts on
    them."""

    active: _Run | None = None

    def __init__(self, env: Mapping[str, str], stream: TextIO) -> None:
        self.env, self.stream = env, stream
        self.pending: list[str] = []
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> _Run:
        if _Run.active is None:
            for system in detected(self.env):
                self.stack.enter_context(system.guard(self.env, self.stream))
            _Run.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        if _Run.active is not self:
            return
        _Run.active = None
        self.stack.close()
        for line in self.pending:
            self.stream.write(line + "\n")
        self.stream.flush()


def guard(env: Mapping[str, str], stream: TextIO) -> AbstractContextManager[object]:
    """Enter for a whole run: every detected system's guard, in registry order."""
    return _Run(env, stream)


def emit_commands(lines: list[str], stream: TextIO | None = None) -> None:
    """Print CI commands (already escaped by their system): after the run's guards when a
    run is active, otherwise now on ``stream`` (stdout)."""
    run = _Run.active
    if run is not None:
        run.pending.extend(lines)
        return
    out = stream or sys.stdout
    for line in lines:
        out.write(line + "\n")


def publications(
    report: Report, report_dir: Path, env: Mapping[str, str]
) -> list[tuple[CISystem, Publication]]:
    return [(s, s.publish(report, report_dir, env)) for s in detected(env)]
