from __future__ import annotations

from typing import Any, Self

import numpy as np

from gate.detectors.base import Detector, Matrix


class IsolationForestDetector(Detector):
    """Isolation Forest: how few random splits isolate a fingerprint."""

    name = "iforest"

    def __init__(self, n_estimators: int = 100, seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        from sklearn.ensemble import IsolationForest

        self.model_: Any = IsolationForest(
            n_estimators=self.n_estimators, random_state=self.seed
        ).fit(X)
        return self

    def score(self, X: Matrix) -> Matrix:
        return np.asarray(-self.model_.score_samples(X), dtype=np.float64)
