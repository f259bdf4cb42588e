"""report.json, defined once as pydantic models (schema_version 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["pass", "warn", "fail"]
CheckStatus = Literal["pass", "warn", "fail", "skipped"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelInfo(_Model):
    path: str
    sha256: str
    format: str


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
        description="rule exre: where the reported cluster was found, 'layer' (the clustered "
        "layer) or 'exre layer'",
    )
    spectral: SpectralReport | None = None
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


class CheckResult(_Model):
    name: str
    status: CheckStatus
    severity: str
    value: float | None = None
    threshold: float | None = None
    message: str


class Report(_Model):
    schema_version: Literal[1] = 1
    gate_version: str
    verdict: Verdict
    policy: str
    model: ModelInfo
    checks: list[CheckResult]
    fingerprint: FingerprintReport | None
    activation_clustering: ActivationClusteringReport | None
    reasons: list[str]
