"""SARIF 2.1.0 (gate.sarif): one result per failing or warning check, on the model file."""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from gate.report.formats._findings import artifact_path, findings, fingerprint
from gate.report.schema import Report

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {"fail": "error", "warn": "warning"}
_RULES = {
    "fingerprint": "The candidate's activation fingerprint is compared with a baseline of "
    "known-clean models of the same family; a small p-value means it is outside that family, "
    "as backdoored models are.",
    "activation_clustering": "Per-class activation clustering on the training data "
    "(Chen et al., 2018): a class whose activations split into two well-separated clusters "
    "may hold poisoned samples.",
    "baseline_size": "The baseline has fewer clean references than recommended, so the "
    "fingerprint p-values are coarse.",
}


def _uri(path: str) -> str:
    if PurePosixPath(path).is_absolute():
        return "file://" + quote(path)
    return quote(path)


def _rule(name: str) -> dict[str, Any]:
    text = _RULES.get(name, f"gate check {name}")
    return {
        "id": name,
        "name": "".join(part.capitalize() for part in name.split("_")),
        "shortDescription": {"text": f"gate check: {name}"},
        "fullDescription": {"text": text},
        "defaultConfiguration": {"level": "error"},
        "properties": {"tags": ["security", "ml-backdoor"]},
    }


def render(report: Report) -> str:
    rule_ids = list(dict.fromkeys(c.name for c in report.checks))
    results = []
    for check in findings(report):
        properties: dict[str, Any] = {"status": check.status, "severity": check.severity}
        if check.value is not None:
            properties["value"] = check.value
        if check.threshold is not None:
            properties["threshold"] = check.threshold
        results.append(
            {
                "ruleId": check.name,
                "ruleIndex": rule_ids.index(check.name),
                "level": _LEVEL[check.effect()],
                "message": {"text": check.message},
                "locations": [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": _uri(artifact_path(report))},
                            "region": {"startLine": 1},
                        }
                    }
                ],
                "partialFingerprints": {"gateFinding/v1": fingerprint(report, check)},
                "properties": properties,
            }
        )
    run_properties: dict[str, Any] = {
        "verdict": report.verdict,
        "policy": report.policy,
        "modelSha256": report.model.sha256,
    }
    if report.fingerprint is not None:
        run_properties["anomalyScore"] = report.fingerprint.anomaly_score
        run_properties["pValue"] = report.fingerprint.p_value
    sarif = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "gate",
                        "version": report.gate_version,
                        "rules": [_rule(name) for name in rule_ids],
                    }
                },
                "artifacts": [
                    {
                        "location": {"uri": _uri(artifact_path(report))},
                        "hashes": {"sha-256": report.model.sha256},
                    }
                ],
                "results": results,
                "properties": run_properties,
            }
        ],
    }
    return json.dumps(sarif, indent=2, sort_keys=True) + "\n"
