"""Applying a policy to scan results: checks, a verdict and human-readable reasons."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gate.policy.model import CheckName, Policy, Severity
from gate.report.schema import (
    ActivationClusteringReport,
    CheckResult,
    FingerprintReport,
    TriggerSearchReport,
    Verdict,
)

_RANK: dict[str, int] = {"pass": 0, "warn": 1, "fail": 2}
_LEVEL: dict[str, int] = {"off": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    checks: list[CheckResult]
    reasons: list[str]


def decide(
    policy: Policy,
    fingerprint: FingerprintReport | None,
    ac: ActivationClusteringReport | None,
    trigger: TriggerSearchReport | None = None,
) -> Decision:
    if fingerprint is None and trigger is not None and trigger.status == "ok":
        # No baseline: the trigger search (a within-model null) stands in for the
        # fingerprint, so a required fingerprint is not a failure here.
        fp_check = CheckResult(
            name="fingerprint",
            status="skipped",
            severity=policy.severity_of("fingerprint"),
            message="fingerprint not run: no baseline given (the trigger search ran instead)",
        )
    else:
        fp_check = _fingerprint_check(policy, fingerprint)
    checks = [fp_check, _ac_check(policy, ac)]
    if trigger is not None or "trigger_search" in policy.required_checks:
        checks.append(_trigger_check(policy, trigger))
    reasons = [c.message for c in checks if c.effect() in {"warn", "fail"}]
    if (
        fingerprint is not None
        and fingerprint.n_references < policy.fingerprint.recommended_references
    ):
        reasons.append(
            f"baseline has only {fingerprint.n_references} references "
            f"(< {policy.fingerprint.recommended_references} recommended): p-values are coarse"
        )
        checks.append(
            CheckResult(
                name="baseline_size",
                status="warn",
                severity="warn",
                value=fingerprint.n_references,
                threshold=policy.fingerprint.recommended_references,
                message=reasons[-1],
            )
        )
    worst = max((c.effect() for c in checks), key=lambda s: _RANK[s])
    verdict: Verdict = "fail" if worst == "fail" else "warn" if worst == "warn" else "pass"
    return Decision(verdict, checks, reasons)


def _apply_severity(policy: Policy, check: CheckName, violated: bool) -> str:
    severity = policy.severity_of(check)
    if not violated or severity == "off":
        return "pass"
    return severity


def _missing(policy: Policy, check: CheckName, why: str) -> CheckResult:
    required = check in policy.required_checks
    status = _apply_severity(policy, check, required)
    message = (
        f"policy requires {check} but it did not run: {why}"
        if required
        else f"{check} not run: {why}"
    )
    return CheckResult(
        name=check,
        status="skipped" if status == "pass" else status,
        severity=policy.severity_of(check),
        message=message,
    )


def _not_analysed(
    policy: Policy, check: CheckName, why: str, value: float | None = None
) -> CheckResult:
    """A check that ran but examined nothing: never a pass. Required, it counts as the
    policy's ``not_analysed`` (capped by the check's severity); otherwise as nothing."""
    severity: Severity = "off"
    if check in policy.required_checks:
        own = policy.severity_of(check)
        severity = min(policy.not_analysed, own, key=lambda s: _LEVEL[s])
    return CheckResult(
        name=check,
        status="not_analysed",
        severity=severity,
        value=value,
        message=f"{check} not analysed: {why}",
    )


def _fingerprint_check(policy: Policy, fp: FingerprintReport | None) -> CheckResult:
    if fp is None:
        return _missing(policy, "fingerprint", "no baseline given")
    if not math.isfinite(fp.p_value):
        # NaN compares false against every alpha: it would pass without a real comparison.
        return _not_analysed(policy, "fingerprint", f"the p-value is {fp.p_value}")
    fpp = policy.fingerprint
    if fp.p_value < fpp.fail_alpha:
        status, limit = _apply_severity(policy, "fingerprint", True), fpp.fail_alpha
        message = (
            f"fingerprint is outside the clean family: p = {fp.p_value:.3g} "
            f"< fail_alpha {fpp.fail_alpha}"
        )
    elif fp.p_value < fpp.warn_alpha:
        status, limit = "warn", fpp.warn_alpha
        message = (
            f"fingerprint is unusual for the clean family: p = {fp.p_value:.3g} "
            f"< warn_alpha {fpp.warn_alpha}"
        )
    else:
        status, limit = "pass", fpp.fail_alpha
        message = f"fingerprint consistent with the clean family (p = {fp.p_value:.3g})"
    if policy.severity_of("fingerprint") == "off":
        status = "pass"
    elif status == "fail" and policy.severity_of("fingerprint") == "warn":
        status = "warn"
    return CheckResult(
        name="fingerprint",
        status=status,
        severity=policy.severity_of("fingerprint"),
        value=fp.p_value,
        threshold=limit,
        message=message,
    )


def _ac_check(policy: Policy, ac: ActivationClusteringReport | None) -> CheckResult:
    if ac is None:
        return _missing(policy, "activation_clustering", "no --data given")
    analysed = [c for c in ac.classes if c.skipped is None]
    if not analysed:
        skipped = "; ".join(f"class {c.label}: {c.skipped}" for c in ac.classes[:5])
        more = f"; {len(ac.classes) - 5} more" if len(ac.classes) > 5 else ""
        why = (
            f"every class was skipped ({skipped}{more})"
            if ac.classes
            else "no class to cluster (none in the data, or none picked by --classes)"
        )
        return _not_analysed(policy, "activation_clustering", why, value=0)
    flagged = [c for c in ac.classes if c.flagged]
    if flagged:
        n = sum(len(c.suspicious_indices) for c in flagged)
        detail = "; ".join(
            f"class {c.label}: {c.reasons[0]}" if c.reasons else f"class {c.label}" for c in flagged
        )
        message = f"activation clustering flags {n} suspicious training samples ({detail})"
    else:
        message = f"activation clustering found no poisoned class in {ac.n_samples} samples"
    if len(analysed) < len(ac.classes):
        message += f" ({len(ac.classes) - len(analysed)} of {len(ac.classes)} classes skipped)"
    status = _apply_severity(policy, "activation_clustering", bool(flagged))
    return CheckResult(
        name="activation_clustering",
        status=status,
        severity=policy.severity_of("activation_clustering"),
        value=len(flagged),
        threshold=0,
        message=message,
    )


def _trigger_check(policy: Policy, ts: TriggerSearchReport | None) -> CheckResult:
    if ts is None:
        return _missing(policy, "trigger_search", "not asked for (give --data or --input-shape)")
    if ts.status != "ok" or ts.p_value is None or not math.isfinite(ts.p_value):
        return _not_analysed(policy, "trigger_search", ts.reason or "the search did not run")
    tsp = policy.trigger_search
    where = "against the references" if ts.null == "baseline" else "across the model's classes"
    target = f", class {ts.suspected_target}" if ts.suspected_target is not None else ""
    if ts.p_value < tsp.fail_alpha:
        status, limit = _apply_severity(policy, "trigger_search", True), tsp.fail_alpha
        message = (
            f"trigger search finds a backdoor shortcut{target}: p = {ts.p_value:.3g} "
            f"{where} < fail_alpha {tsp.fail_alpha}"
        )
    elif ts.p_value < tsp.warn_alpha:
        status, limit = "warn", tsp.warn_alpha
        message = (
            f"trigger search finds an unusually easy class{target}: p = {ts.p_value:.3g} "
            f"{where} < warn_alpha {tsp.warn_alpha}"
        )
    else:
        status, limit = "pass", tsp.fail_alpha
        message = f"trigger search finds no backdoor shortcut (p = {ts.p_value:.3g} {where})"
    if policy.severity_of("trigger_search") == "off":
        status = "pass"
    elif status == "fail" and policy.severity_of("trigger_search") == "warn":
        status = "warn"
    return CheckResult(
        name="trigger_search",
        status=status,
        severity=policy.severity_of("trigger_search"),
        value=ts.p_value,
        threshold=limit,
        message=message,
    )
