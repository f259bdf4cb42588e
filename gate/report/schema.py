"""report.json, defined once as pydantic models (schema_version 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["pass", "warn", "fail"]
# "not_analysed": the check ran but examined nothing (e.g. every class of the data was too
# small to cluster); it is never a pass. What it does to the verdict is its ``severity``.
CheckStatus = Literal["pass", "warn", "fail", "skipped", "not_analysed"]
Effect = Literal["pass", "warn", "fail"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Model):
    path: str
    sha256: str
    format: str
    device: str = Field(
        "cpu",
        description="where the model's forward passes and trigger search ran (--device); "
        "the CPU is the reference",
    )


class DetectorReport(_Model):
    name: str
    score: float
    p_value: float
    p_conformal: float


class NearestReference(_Model):
    name: str
    sha256: str
    distance: float


class ProbeDeviation(_Model):
    index: int
    kind: str
    deviation: float
    top_class: int
    reference_top_class: int


class FingerprintReport(_Model):
    anomaly_score: float
    p_value: float
    detectors: list[DetectorReport]
    nearest_reference: NearestReference
    top_probes: list[ProbeDeviation]
    layer: str
    representation: str
    baseline: str
    n_references: int


class SpectralReport(_Model):
    """Spectral signature (Tran et al., 2018) of one class's activations."""

    separation: float
    top_ratio: float
    flagged: bool
    n_suspicious: int


class ClassReport(_Model):
    label: int
    size: int
    silhouette: float | None
    flagged: bool
    suspicious_indices: list[int]
    cluster_sizes: list[int]
    skipped: str | None = None
    separation: float | None = None
    small_fraction: float | None = None
    exre_score: float | None = None
    exre_log_odds: float | None = None
    suspected_source: int | None = None
    found_in: str | None = Field(
        default=None,
        description="where the reported cluster was found: 'layer' (the clustered layer), "
        "'exre layer', or (rule calibrated) 'input, along the flagged classes' trigger'",
    )
    spectral: SpectralReport | None = None
    p_value: float | None = Field(
        default=None,
        description="rule calibrated: the class's p-value against the model's own candidates",
    )
    reasons: list[str] = []


class ActivationClusteringReport(_Model):
    layer: str
    data: str
    n_samples: int
    classes: list[ClassReport]
    reduction: str = "ica"
    segment_by: str = "label"
    detector: str = "ac"
    exre: str = "linear"
    rule: str = "separation"
    exre_layer: str | None = Field(
        default=None, description="the layer the fast ExRe classifier ran in (null: `layer`)"
    )
    data_sha256: str | None = None
    labels: list[int] = Field(default=[], description="every class label present in the data")
    class_subset: str | None = Field(
        default=None,
        description="`--classes` of a partial run (combine parts with `gate ac-merge`); "
        "null when every class was clustered",
    )


class TriggerClassReport(_Model):
    """One class's trigger-search statistics (higher z = easier to reach than the others)."""

    label: int
    max_margin: float
    mask_l1: float
    mask_asr: float
    z_margin: float
    z_mask: float
    p_value: float = Field(description="within-model p-value of this class")
    flip_l1: float | None = Field(
        default=None, description="smallest mask that sends this class's inputs elsewhere"
    )
    z_reference: float | None = Field(
        default=None,
        description="with a baseline: this class's excess over the references' same class",
    )
    p_reference: float | None = Field(
        default=None, description="with a baseline: this class's p-value against the references"
    )


class TriggerSearchReport(_Model):
    """Model-adaptive trigger search (MM-BD max margin + Neural Cleanse masks per class)."""

    status: Literal["ok", "not_run"]
    reason: str | None = None
    p_value: float | None = Field(
        default=None,
        description="within-model null across classes without a baseline; each class "
        "against the same class of the references' searches with one (null: not run)",
    )
    anomaly_score: float | None = Field(default=None, description="1 - p_value")
    null: Literal["within_model", "baseline"] | None = None
    within_model_p_value: float | None = None
    reference_shift_z: float | None = Field(
        default=None,
        description="with a baseline: every class's shift against the references (all-to-all)",
    )
    reference_shift_p_value: float | None = None
    suspected_target: int | None = Field(
        default=None,
        description="the class the search reaches most easily, when p_value < warn_alpha",
    )
    most_suspicious_class: int | None = None
    classes: list[TriggerClassReport] = []
    input_range: list[float] | None = None
    inputs: str | None = Field(default=None, description="'data' or 'synthetic' inputs")
    steps: dict[str, int] | None = None
    n_references: int | None = None


class CheckResult(_Model):
    name: str
    status: CheckStatus = Field(
        description="pass, warn, fail; skipped (did not run); not_analysed (ran but examined "
        "nothing: `message` says why; it counts as `severity` says)"
    )
    severity: str
    value: float | None = None
    threshold: float | None = None
    message: str

    def effect(self) -> Effect:
        """What this check does to the verdict: a not-analysed check counts as its
        severity (the policy's ``not_analysed`` for a required check), a skipped one as a
        pass (a required check that did not run is already reported as failing)."""
        if self.status in _EFFECTS:
            return _EFFECTS[self.status]
        if self.status == "not_analysed":
            return _EFFECTS.get(self.severity, "pass")
        return "pass"


_EFFECTS: dict[str, Effect] = {"pass": "pass", "warn": "warn", "fail": "fail"}


class Report(_Model):
    schema_version: Literal[1] = 1
    gate_version: str
    verdict: Verdict
    policy: str
    model: ModelInfo
    checks: list[CheckResult]
    fingerprint: FingerprintReport | None
    activation_clustering: ActivationClusteringReport | None
    trigger_search: TriggerSearchReport | None = None
    reasons: list[str]
