from __future__ import annotations

from typing import Any, Self

import numpy as np

from gate.detectors.base import Detector, Matrix


class OneClassSVMDetector(Detector):
    """One-class SVM with an RBF kernel: distance outside the references' support."""

    name = "ocsvm"

    def __init__(self, nu: float = 0.1, seed: int = 0) -> None:
        self.nu = nu
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        from sklearn.svm import OneClassSVM

        self.model_: Any = OneClassSVM(kernel="rbf", gamma="scale", nu=self.nu).fit(X)
        return self

    def score(self, X: Matrix) -> Matrix:
        return np.asarray(-self.model_.score_samples(X), dtype=np.float64)
