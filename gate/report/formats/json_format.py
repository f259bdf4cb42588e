from __future__ import annotations

import json

from gate.report.schema import Report


def render(report: Report) -> str:
    # sort_keys + fixed indent: same report, same bytes.
    return json.dumps(report.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
