"""Published JSON Schemas: policy.schema.json and report.schema.json, generated from pydantic.

Regenerate the committed files after changing gate/policy/model.py or gate/report/schema.py::

    python -m gate.schemas
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def policy_schema() -> dict[str, Any]:
    from gate.policy.model import Policy

    schema = Policy.model_json_schema()
    schema["title"] = "gate policy"
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


def report_schema() -> dict[str, Any]:
    from gate.report.schema import Report

    schema = Report.model_json_schema(mode="serialization")
    schema["title"] = "gate report.json (schema_version 1)"
    return {"$schema": JSON_SCHEMA_DIALECT, **schema}


SCHEMAS: dict[str, Callable[[], dict[str, Any]]] = {
    "policy.schema.json": policy_schema,
    "report.schema.json": report_schema,
}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def schema_dir() -> Path:
    return Path(__file__).resolve().parent


def write_all(directory: Path | None = None) -> list[Path]:
    out = directory or schema_dir()
    written = []
    for name, make in SCHEMAS.items():
        path = out / name
        path.write_text(render(make()), encoding="utf-8")
        written.append(path)
    return written
