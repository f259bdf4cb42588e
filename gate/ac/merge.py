"""Combining the parts of a class-split `gate ac` run (``--classes``) into one report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from gate._version import __version__
from gate.errors import UsageError
from gate.policy.evaluate import decide
from gate.policy.model import Policy
from gate.report.schema import ActivationClusteringReport, Report

# What every part must agree on: one model, one dataset, one way of clustering.
_SAME = (
    "layer",
    "data_sha256",
    "n_samples",
    "labels",
    "reduction",
    "segment_by",
    "detector",
    "exre",
    "rule",
    "exre_layer",
)


def read_part(directory: str | Path) -> Report:
    """A part's report.json, validated; anything else is a usage error."""
    path = Path(directory) / "report.json"
    try:
        report = Report.model_validate_json(path.read_bytes())
    except OSError:
        raise UsageError(
            f"{directory}: no report.json (a `gate ac --classes` report dir?)"
        ) from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise UsageError(f"{path}: not a gate report ({where}: {err['msg']})") from None
    if report.activation_clustering is None:
        raise UsageError(f"{path}: has no activation clustering results")
    return report


def merge_parts(parts: Sequence[tuple[str, Report]], policy: Policy) -> Report:
    """One report for every class, as a single `gate ac` run would give (same classes,
    flags and suspicious samples), with the policy's verdict over all of them.

    Refuses parts of other models, data or settings, and missing or repeated classes.
    """
    if not parts:
        raise UsageError("give at least one part report directory to merge")
    first_name, first = parts[0]
    first_ac = _ac(first)
    seen: dict[int, str] = {}
    for name, part in parts:
        ac = _ac(part)
        if part.model.sha256 != first.model.sha256:
            raise UsageError(f"{name}: is a report on another model than {first_name}")
        if part.gate_version != __version__:
            raise UsageError(f"{name}: written by gate {part.gate_version}, this is {__version__}")
        if part.policy != policy.name:
            raise UsageError(
                f"{name}: clustered under policy {part.policy!r}; merge with --policy "
                f"{part.policy} (flags depend on the policy's thresholds)"
            )
        for key in _SAME:
            if getattr(ac, key) != getattr(first_ac, key):
                raise UsageError(
                    f"{name}: {key} differs from {first_name} ({getattr(ac, key)!r} vs "
                    f"{getattr(first_ac, key)!r}); parts must come from one `gate ac` setup"
                )
        for c in ac.classes:
            if c.label in seen:
                raise UsageError(f"class {c.label} is in both {seen[c.label]} and {name}")
            seen[c.label] = name
    missing = [label for label in first_ac.labels if label not in seen]
    if missing:
        raise UsageError(f"no part clustered class(es) {', '.join(map(str, missing))}")
    classes = sorted((c for _, p in parts for c in _ac(p).classes), key=lambda c: c.label)
    ac = first_ac.model_copy(update={"classes": classes, "class_subset": None})
    decision = decide(policy, None, ac)
    return Report(
        gate_version=__version__,
        verdict=decision.verdict,
        policy=policy.name,
        model=first.model,
        checks=decision.checks,
        fingerprint=None,
        activation_clustering=ac,
        reasons=decision.reasons,
    )


def _ac(report: Report) -> ActivationClusteringReport:
    assert report.activation_clustering is not None  # read_part checked
    return report.activation_clustering
