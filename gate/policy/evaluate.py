"""Applying a policy to scan results: checks, a verdict and human-readable reasons."""

from __future__ import annotations

from dataclasses import dataclass

from gate.policy.model import CheckName, Policy
from gate.report.schema import ActivationClusteringReport, CheckResult, FingerprintReport, Verdict

_RANK: dict[str, int] = {"pass": 0, "skipped": 0, "warn": 1, "fail": 2}


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    checks: list[CheckResult]
    reasons: list[str]


def decide(
    policy: Policy, fingerprint: FingerprintReport | None, ac: ActivationClusteringReport | None
) -> Decision:
    checks = [_fingerprint_check(policy, fingerprint), _ac_check(policy, ac)]
    reasons = [c.message for c in checks if c.status in {"warn", "fail"}]
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
    worst = max((c.status for c in checks), key=lambda s: _RANK[s])
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


def _fingerprint_check(policy: Policy, fp: FingerprintReport | None) -> CheckResult:
    if fp is None:
        return _missing(policy, "fingerprint", "no baseline given")
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
    flagged = [c for c in ac.classes if c.flagged]
    if flagged:
        n = sum(len(c.suspicious_indices) for c in flagged)
        detail = "; ".join(
            f"class {c.label}: {c.reasons[0]}" if c.reasons else f"class {c.label}" for c in flagged
        )
        message = f"activation clustering flags {n} suspicious training samples ({detail})"
    else:
        message = f"activation clustering found no poisoned class in {ac.n_samples} samples"
    status = _apply_severity(policy, "activation_clustering", bool(flagged))
    return CheckResult(
        name="activation_clustering",
        status=status,
        severity=policy.severity_of("activation_clustering"),
        value=len(flagged),
        threshold=0,
        message=message,
    )
