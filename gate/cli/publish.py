"""Writing what a scan produced: the report files, `-o`, the printed summary and the CI
system's outputs (gate.ci). The only place a report reaches the disk or a CI."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TextIO

from gate.cli.common import h
from gate.cli.reportdir import ReportWrite
from gate.errors import UsageError

if TYPE_CHECKING:
    from gate.report.formats import Format
    from gate.report.schema import Report

STDOUT = "-"
# Formats whose locations CI systems resolve against the repository root.
_LOCATED = ("sarif", "codequality")


@dataclass(frozen=True)
class Destination:
    """Where reports go: ``report_dir``, except the one format ``-o`` names (``output``,
    ``-`` for stdout)."""

    report_dir: Path
    output: str | None = None

    @property
    def human(self) -> TextIO:
        """Where the human summary is printed: stderr when stdout carries the report."""
        return sys.stderr if self.output == STDOUT else sys.stdout


def resolve_formats(spec: str | None, output: str | None) -> list[Format]:
    """``--format`` with ``-o``: one format (json when none is named), or a usage error."""
    from gate.report.formats import parse_formats

    if output is None:
        return parse_formats(spec)
    formats = parse_formats(spec or "json")
    if len(formats) > 1:
        names = ",".join(f.name for f in formats)
        raise UsageError(
            f"-o/--output takes one format, got {len(formats)} ({names}); name one with "
            "--format, or drop -o to write them all into --report-dir"
        )
    if output != STDOUT and Path(output).is_dir():
        raise UsageError(f"-o/--output {output} is a directory; give a file name or '-'")
    return formats


def write_files(report_dir: Path, files: Mapping[str, bytes]) -> list[Path]:
    from gate._io import write_bytes_atomic

    written = []
    with ReportWrite(report_dir):
        for name, data in files.items():
            write_bytes_atomic(report_dir / name, data)
            written.append(report_dir / name)
    return written


def emit(
    report: Report,
    formats: Sequence[Format],
    dest: Destination,
    files: Mapping[str, bytes],
    quiet: bool,
) -> None:
    """Write the formats (or the ``-o`` one) and ``files`` into the report directory, print
    the summary, and hand the CI system (if any) its outputs."""
    from gate.report.files import format_files
    from gate.report.formats import FORMATS

    written: list[Path | str] = []
    if dest.output is None:
        files = {**format_files(report, formats), **files}
    else:
        written.append(_write_output(dest.output, formats[0].render(report)))
    written[:0] = write_files(dest.report_dir, files)
    _warn_absolute(report, formats)
    if not quiet:
        print(FORMATS["markdown"].render(report), file=dest.human)  # names in it are escaped
        print(f"reports: {', '.join(h(p) for p in written)}", file=dest.human)
    publish_ci(report, dest.report_dir)


def _write_output(output: str, text: str) -> str:
    if output == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return "stdout"
    from gate._io import write_text_atomic

    try:
        write_text_atomic(Path(output), text)
    except OSError as exc:
        raise UsageError(f"cannot write -o/--output {output}: {exc.strerror or exc}") from None
    return output


def _warn_absolute(report: Report, formats: Sequence[Format]) -> None:
    """An absolute model path becomes a ``file:///`` location no CI can map to a file of
    the repository: say so (once, on stderr) when such a format was asked for."""
    path = report.model.path.replace("\\", "/")
    if PurePosixPath(path).is_absolute() and any(f.name in _LOCATED for f in formats):
        print(
            f"gate: warning: model path {h(report.model.path)} is absolute, so SARIF/Code "
            "Quality locate it as file:///...; pass a repository-relative path for code "
            "scanning to show it on the file",
            file=sys.stderr,
        )


def publish_ci(report: Report, report_dir: Path) -> None:
    """The detected CI systems' outputs (gate.ci): report-dir files, appends to the files
    the CI named, and commands printed after the run's guard."""
    from gate import ci

    env = os.environ
    for system, pub in ci.publications(report, report_dir, env):
        write_files(report_dir, pub.files)
        try:
            for path, data in pub.appends:
                with open(path, "ab") as fh:
                    fh.write(data)
        except OSError as exc:
            raise UsageError(
                f"cannot append to {system.name}'s step files: {exc.strerror or exc}"
            ) from None
        ci.emit_commands(pub.commands)
