"""Policies: thresholds and requirements, validated once at load time."""

from gate.policy.load import load_policy, policy_names
from gate.policy.model import CheckName, Policy, Severity

__all__ = ["CheckName", "Policy", "Severity", "load_policy", "policy_names"]
