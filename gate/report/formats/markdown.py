from __future__ import annotations

from functools import cache
from typing import Any

from gate.report.schema import Report

_ICON = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skipped": "⏭️"}


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
    )
    env.filters["g"] = lambda v, digits=3: "—" if v is None else f"{v:.{digits}g}"
    env.globals["icon"] = _ICON
    return env


def render(report: Report) -> str:
    return str(_environment().get_template("summary.md.j2").render(r=report))
