"""--report-dir: refused early when it cannot hold the reports, and write errors named."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gate.errors import UsageError


def check_report_dir(report_dir: Path) -> None:
    """Fail early, with a one-line error, on a --report-dir that cannot hold the reports:
    an existing file, or a directory (or nearest existing parent) this user cannot write."""
    if report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"--report-dir {report_dir} is a file, not a directory")
    probe = report_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--report-dir {report_dir}: {probe} is a file, not a directory")
    try:  # a real probe: permission bits say nothing for root or a read-only mount
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".gate-probe-"))
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise UsageError(f"--report-dir {report_dir}: cannot write in {probe}: {why}") from None


class ReportWrite:
    """Turns an OSError while writing reports (disk full, permissions changed) into a
    one-line error naming the report directory."""

    def __init__(self, report_dir: Path) -> None:
        self.report_dir = report_dir

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, OSError):
            why = exc.strerror or str(exc)
            where = f" ({exc.filename})" if exc.filename else ""
            raise UsageError(
                f"cannot write to --report-dir {self.report_dir}{where}: {why}"
            ) from None
