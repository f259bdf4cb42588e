from __future__ import annotations

from functools import cache
from typing import Any

from gate.report.escape import human, md_code
from gate.report.schema import Report

_ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skipped": "⏭️", "not_analysed": "❔"}


@cache
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gate.report", "templates"),
        autoescape=False,  # markdown, not HTML
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        # Every value is escaped (gate.report.escape.human): a model path or layer name with
        # a newline could otherwise start a `::set-output` line in a CI log.
        finalize=human,
    )
    env.filters["code"] = md_code
    env.filters["g"] = lambda v, digits=3: "—" if v is None else f"{v:.{digits}g}"
    env.globals["icon"] = _ICON
    return env


def render(report: Report, artifacts: str | None = None) -> str:
    """The summary. Pictures are linked relative to the report directory (summary.md sits
    beside them), unless ``artifacts`` is given: then they are named as files of the
    uploaded report artifact, linked to ``artifacts`` (a URL) when it is not empty. A
    relative link on GitHub's step-summary page would be dead."""
    template = _environment().get_template("summary.md.j2")
    return str(template.render(r=report, artifacts=artifacts))
