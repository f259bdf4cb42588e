"""Report formats. Each is ``render(report) -> str``; add one with a module and a line here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gate.errors import UsageError
from gate.report.formats import codequality, json_format, junit, markdown, sarif
from gate.report.schema import Report


@dataclass(frozen=True)
class Format:
    name: str
    filename: str
    render: Callable[[Report], str]


FORMATS: dict[str, Format] = {
    "markdown": Format("markdown", "summary.md", markdown.render),
    "json": Format("json", "report.json", json_format.render),
    "sarif": Format("sarif", "gate.sarif", sarif.render),
    "junit": Format("junit", "junit.xml", junit.render),
    "codequality": Format("codequality", "gl-code-quality.json", codequality.render),
}

DEFAULT_FORMATS = ("markdown", "json")


def parse_formats(spec: str | None) -> list[Format]:
    names = [s.strip() for s in (spec or ",".join(DEFAULT_FORMATS)).split(",") if s.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown or not names:
        raise UsageError(
            f"unknown report format {unknown[0] if unknown else spec!r}; "
            f"choose from {', '.join(FORMATS)}"
        )
    return [FORMATS[n] for n in dict.fromkeys(names)]
