from __future__ import annotations

from typing import Self

import numpy as np

from gate.detectors.base import Detector, Matrix, _bad_state


class OneClassSVMDetector(Detector):
    """One-class SVM with an RBF kernel: distance outside the references' support.

    Trained with scikit-learn's ``OneClassSVM``; the baseline keeps which references are
    support vectors, their dual coefficients and the kernel width, and scoring is the
    kernel expansion in numpy (the same value as ``-OneClassSVM.score_samples``).
    """

    name = "ocsvm"
    state_keys = ("support", "dual_coef", "gamma")

    def __init__(self, nu: float = 0.1, seed: int = 0) -> None:
        self.nu = nu
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        from sklearn.svm import OneClassSVM

        X = np.asarray(X, dtype=np.float64)
        var = float(X.var())
        # gamma="scale", computed here so the value is ours to store.
        self.gamma_ = np.float64(1.0 / (X.shape[1] * var) if var > 0 else 1.0)
        svm = OneClassSVM(kernel="rbf", gamma=float(self.gamma_), nu=self.nu).fit(X)
        self.support_ = np.asarray(svm.support_, dtype=np.int64)
        self.dual_coef_ = np.asarray(svm.dual_coef_[0], dtype=np.float64)
        self.support_vectors_ = X[self.support_]
        return self

    def _restore(self, X: Matrix) -> None:
        s = self.support_
        if (
            s.ndim != 1
            or s.dtype.kind not in "iu"
            or self.dual_coef_.shape != s.shape
            or (len(s) and (s.min() < 0 or s.max() >= len(X)))
            or self.gamma_.shape != ()
        ):
            raise _bad_state(self.name, "support vectors")
        self.support_vectors_ = X[s]

    def score(self, X: Matrix) -> Matrix:
        X = np.asarray(X, dtype=np.float64)
        sq = np.stack([np.sum((self.support_vectors_ - x) ** 2, axis=1) for x in X])
        kernel = np.exp(-float(self.gamma_) * sq)
        return np.asarray(-(kernel @ self.dual_coef_), dtype=np.float64)
