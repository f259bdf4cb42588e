"""The policy schema. Unknown keys are rejected; everything is frozen after validation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CheckName = Literal["fingerprint", "activation_clustering", "trigger_search"]
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


class TriggerSearchPolicy(_Strict):
    fail_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Fail when the trigger search's p-value (within-model null without a "
        "baseline, each class against the same class of the references' searches with one) "
        "is below this.",
    )
    warn_alpha: float = Field(
        0.05, gt=0, lt=1, description="Warn when the trigger search's p-value is below this."
    )

    @model_validator(mode="after")
    def _alphas_ordered(self) -> TriggerSearchPolicy:
        if self.warn_alpha < self.fail_alpha:
            raise ValueError("warn_alpha must be >= fail_alpha")
        return self


class ActivationClusteringPolicy(_Strict):
    rule: Literal["exre", "calibrated", "separation", "silhouette"] = Field(
        "calibrated",
        description=(
            "How a class's clusters are judged: 'calibrated' (the default: each class's "
            "best candidate against a null from the same model's candidates, with ExRe in "
            "an earlier layer and a neighbour vote in the input, a p-value per class, "
            "flagged below alpha or at ExRe log-odds above exre_log_odds; "
            "bench/results/ac-cases.md), 'exre' (the previous default: a small, separated "
            "k-means cluster that the fast ExRe classifier in an earlier layer confidently "
            "puts in one other class), 'separation' (the default before that: the smaller "
            "2-means cluster lies far from the rest) or the paper's 'silhouette' threshold."
        ),
    )
    separation_threshold: float | None = Field(
        None,
        gt=0,
        description=(
            "A suspicious cluster must lie this many within-cluster spreads away from the "
            "rest of its class. Unset: 3.0 for rule 'exre' (one blob cut in two gives 2.65; "
            "the ExRe evidence does the rest) and 5.5 for 'separation'/'silhouette' (clean "
            "digit classes measured up to 6.5, isolated poison 5.5-15)."
        ),
    )
    exre_log_odds: float = Field(
        7.0,
        gt=0,
        description=(
            "Rule 'exre': flag a cluster when the median over its members of "
            "log p(best other class) - log p(class) under the fast ExRe classifier exceeds "
            "this (k-means clusters of 16 clean digit CNNs measured at most 4.42, the poison "
            "cluster of 90 poisoned classes 10.5-26; bench/results/ac-margins.md)."
        ),
    )
    isolated_separation: float = Field(
        7.0,
        gt=0,
        description=(
            "Rule 'exre': a cluster this far from the rest of its class (in within-cluster "
            "spreads) needs only half of exre_log_odds (clusters of 16 clean digit CNNs: none "
            "had separation > 6.6 and log-odds > 2.5 together)."
        ),
    )
    silhouette_threshold: float = Field(
        0.15,
        ge=-1,
        le=1,
        description="Flag a class whose silhouette exceeds this (rule: silhouette only).",
    )
    max_poison_fraction: float = Field(
        0.6,
        gt=0,
        lt=1,
        description=(
            "A suspicious cluster holds at most this fraction of its class. Rule 'exre' "
            "judges both sides of a split (ExRe must confirm either), so it may exceed 0.5: "
            "all-to-one poisoning of 10% of a 10-class set makes the target class about half "
            "poison. Other rules judge the smaller side only (at most 0.5)."
        ),
    )
    min_cluster_size: int = Field(
        5, ge=1, description="Ignore suspicious clusters smaller than this."
    )
    alpha: float = Field(
        1e-6,
        gt=0,
        lt=1,
        description=(
            "Rule 'calibrated': flag a class whose p-value is below this. The p-value is "
            "nominal (a normal reference for the robust z of the class's best candidate "
            "among the model's candidates, Bonferroni over the class's candidates), hence "
            "small; the lowest class p-value of 20 clean models of the benchmark is "
            "2.2e-5 (bench/results/ac-cases.md)."
        ),
    )
    transfer_alpha: float = Field(
        0.01,
        gt=0,
        lt=1,
        description=(
            "Rule 'calibrated', once a class is flagged: an unflagged class whose rows "
            "along the flagged classes' trigger (in the input) ExRe moves to another class "
            "is flagged below this p-value (Holm over the classes offered). It runs only on "
            "a model that already has a flagged class, so it never fails a model that would "
            "otherwise pass; it finds the rest of an all-to-all poisoning."
        ),
    )
    n_components: int = Field(
        10,
        ge=1,
        le=256,
        description="Components of the per-class reduction (PCA by default, or ICA).",
    )


def _default_severity() -> dict[CheckName, Severity]:
    return {"fingerprint": "fail", "activation_clustering": "fail", "trigger_search": "fail"}


class Policy(_Strict):
    name: str = "custom"
    description: str = ""
    fingerprint: FingerprintPolicy = FingerprintPolicy()
    activation_clustering: ActivationClusteringPolicy = ActivationClusteringPolicy()
    trigger_search: TriggerSearchPolicy = TriggerSearchPolicy()
    required_checks: tuple[CheckName, ...] = ("fingerprint",)
    severity: dict[CheckName, Severity] = Field(default_factory=_default_severity)
    timeout_seconds: float = Field(
        900.0,
        gt=0,
        le=7 * 86400,
        description=(
            "Wall-clock limit for the sandboxed process that runs the model (each model of a "
            "command has its own); past it the model is stopped and gate exits 2. --timeout "
            "overrides it."
        ),
    )
    not_analysed: Severity = Field(
        "fail",
        description=(
            "A required check that ran but analysed nothing (activation clustering with every "
            "class below the minimum size, a fingerprint whose p-value is not a number) is "
            "reported as not_analysed, never as a pass; this is what it does to the verdict "
            "(at most the check's own severity). A check that is not required is reported "
            "as not_analysed and does not change the verdict."
        ),
    )

    def severity_of(self, check: CheckName) -> Severity:
        return self.severity.get(check, "fail")
