"""The policy schema. Unknown keys are rejected; everything is frozen after validation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CheckName = Literal["fingerprint", "activation_clustering"]
Severity = Literal["fail", "warn", "off"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FingerprintPolicy(_Strict):
    fail_alpha: float = Field(
        0.01, gt=0, lt=1, description="Fail when the combined p-value is below this."
    )
    warn_alpha: float = Field(
        0.05, gt=0, lt=1, description="Warn when the combined p-value is below this."
    )
    min_references: int = Field(3, ge=3, description="Fewer references than this is a tool error.")
    recommended_references: int = Field(
        10, ge=3, description="Fewer references than this adds a warning."
    )

    @model_validator(mode="after")
    def _alphas_ordered(self) -> FingerprintPolicy:
        if self.warn_alpha < self.fail_alpha:
            raise ValueError("warn_alpha must be >= fail_alpha")
        return self


class ActivationClusteringPolicy(_Strict):
    rule: Literal["separation", "silhouette"] = Field(
        "separation",
        description=(
            "How a 2-means split is judged: 'separation' (gate's default, chosen on "
            "benchmark evidence) or the paper's 'silhouette' threshold."
        ),
    )
    separation_threshold: float = Field(
        5.5,
        gt=0,
        description=(
            "Flag a class whose smaller cluster lies this many within-cluster spreads away "
            "from the rest (clean digit classes measured 2.8-5.3, isolated poison 5.5-15)."
        ),
    )
    silhouette_threshold: float = Field(
        0.15,
        ge=-1,
        le=1,
        description="Flag a class whose silhouette exceeds this (rule: silhouette only).",
    )
    max_poison_fraction: float = Field(
        0.35,
        gt=0,
        le=0.5,
        description="The smaller cluster must hold at most this fraction of the class.",
    )
    min_cluster_size: int = Field(
        5, ge=1, description="Ignore suspicious clusters smaller than this."
    )
    n_components: int = Field(
        10,
        ge=1,
        le=256,
        description="Components of the per-class reduction (PCA by default, or ICA).",
    )


def _default_severity() -> dict[CheckName, Severity]:
    return {"fingerprint": "fail", "activation_clustering": "fail"}


class Policy(_Strict):
    name: str = "custom"
    description: str = ""
    fingerprint: FingerprintPolicy = FingerprintPolicy()
    activation_clustering: ActivationClusteringPolicy = ActivationClusteringPolicy()
    required_checks: tuple[CheckName, ...] = ("fingerprint",)
    severity: dict[CheckName, Severity] = Field(default_factory=_default_severity)

    def severity_of(self, check: CheckName) -> Severity:
        return self.severity.get(check, "fail")
