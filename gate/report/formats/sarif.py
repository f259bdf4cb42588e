"""SARIF 2.1.0 (gate.sarif): one result per failing or warning check, on the model file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import quote

from gate.report.formats._findings import artifact_path, findings, fingerprint
from gate.report.schema import CheckResult, Report

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_LEVEL = {"fail": "error", "warn": "warning"}
# A rule's default level: what its policy severity makes of a violation ("off": none).
_DEFAULT_LEVEL = {"fail": "error", "warn": "warning", "off": "none"}
# GitHub code scanning ranks security alerts by this number (critical >= 9.0, high >= 7.0,
# medium >= 4.0, low > 0), so it follows the rule's level: a check the policy fails on is
# high, one it only warns on medium.
_SECURITY_SEVERITY = {"error": "8.0", "warning": "5.0", "note": "2.0", "none": "0.0"}


@dataclass(frozen=True)
class _Rule:
    short: str
    full: str
    security: bool = True  # a finding about the model (not about gate's own evidence)


_RULES = {
    "fingerprint": _Rule(
        "Model's activations fall outside its clean model family",
        "The candidate's activation fingerprint on a fixed probe set is compared with a "
        "baseline of known-clean models of the same family; a small p-value means it is "
        "outside that family, as backdoored models are.",
    ),
    "activation_clustering": _Rule(
        "Training data holds a cluster of likely poisoned samples",
        "Per-class activation clustering on the training data (Chen et al., 2018): a class "
        "whose activations split off a well-separated cluster that exclusionary "
        "reclassification assigns to another class may hold poisoned samples "
        "(suspicious.csv lists them).",
    ),
    "trigger_search": _Rule(
        "A small input trigger sends inputs to one class",
        "Model-adaptive trigger search (MM-BD max margin and Neural Cleanse masks per class): "
        "a class that is much easier to reach than the others is the signature of a "
        "backdoor target.",
    ),
    "baseline_size": _Rule(
        "Baseline has too few clean references",
        "The baseline has fewer clean references than recommended, so the fingerprint "
        "p-values are coarse; add references.",
        security=False,
    ),
}


def _uri(path: str) -> str:
    if PurePosixPath(path).is_absolute():
        return "file://" + quote(path)
    return quote(path)


def _rule(check: CheckResult) -> dict[str, Any]:
    name = check.name
    rule = _RULES.get(name, _Rule(f"gate check {name}", f"gate check {name}"))
    level = _DEFAULT_LEVEL.get(check.severity, "warning")
    tags = ["security", "ml-backdoor"] if rule.security else ["ml-backdoor", "quality"]
    # A rule about gate's own evidence (too few references) is not a security finding:
    # ranked low whatever its level.
    severity = _SECURITY_SEVERITY[level if rule.security else "note"]
    properties: dict[str, Any] = {"tags": tags, "security-severity": severity}
    return {
        "id": name,
        "name": "".join(part.capitalize() for part in name.split("_")),
        "shortDescription": {"text": rule.short},
        "fullDescription": {"text": rule.full},
        "help": {"text": rule.full},
        "defaultConfiguration": {"level": level},
        "properties": properties,
    }


def _notifications(report: Report) -> list[dict[str, Any]]:
    if not PurePosixPath(artifact_path(report)).is_absolute():
        return []
    return [
        {
            "level": "warning",
            "descriptor": {"id": "absolute-location"},
            "message": {
                "text": "the model path is absolute, so its location is a file:/// URI that "
                "code scanning cannot map to a file of the repository; pass a "
                "repository-relative path"
            },
        }
    ]


def render(report: Report) -> str:
    rule_checks = {c.name: c for c in reversed(report.checks)}  # the first of each name
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
                        "rules": [_rule(rule_checks[name]) for name in rule_ids],
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
    notes = _notifications(report)
    if notes:
        sarif["runs"][0]["invocations"] = [  # type: ignore[index]
            {"executionSuccessful": True, "toolExecutionNotifications": notes}
        ]
    return json.dumps(sarif, indent=2, sort_keys=True) + "\n"
