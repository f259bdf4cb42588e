from __future__ import annotations

from typing import Any, Self

import numpy as np

from gate.detectors.base import Detector, Matrix


class LOFDetector(Detector):
    """Local Outlier Factor in novelty mode: density relative to the nearest references."""

    name = "lof"

    def __init__(self, n_neighbors: int = 5, seed: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        from sklearn.neighbors import LocalOutlierFactor

        k = max(1, min(self.n_neighbors, len(X) - 1))
        self.model_: Any = LocalOutlierFactor(n_neighbors=k, novelty=True).fit(X)
        return self

    def score(self, X: Matrix) -> Matrix:
        return np.asarray(-self.model_.score_samples(X), dtype=np.float64)
