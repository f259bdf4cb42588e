from __future__ import annotations

from typing import Self

import numpy as np

from gate.detectors.base import Detector, Matrix, _bad_state

# scikit-learn adds this to the mean reachability distance so duplicates don't divide by 0.
_EPS = 1e-10


class LOFDetector(Detector):
    """Local Outlier Factor in novelty mode: density relative to the nearest references.

    The same computation as scikit-learn's ``LocalOutlierFactor(novelty=True)`` with
    euclidean distances (a test checks the scores agree), written in numpy: a baseline has
    tens to hundreds of references, where brute-force distances are the fastest anyway.
    """

    name = "lof"
    state_keys = ("k_distance", "lrd")

    def __init__(self, n_neighbors: int = 5, seed: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        X = np.asarray(X, dtype=np.float64)
        self.fit_X_ = X
        self.n_neighbors_ = max(1, min(self.n_neighbors, len(X) - 1))
        d = _distances(X, X)
        np.fill_diagonal(d, np.inf)  # a reference is not its own neighbour
        idx = np.argsort(d, axis=1, kind="stable")[:, : self.n_neighbors_]
        dist = np.take_along_axis(d, idx, axis=1)
        self.k_distance_ = dist[:, -1]
        self.lrd_ = self._lrd(dist, idx)
        return self

    def _restore(self, X: Matrix) -> None:
        n = len(X)
        if self.k_distance_.shape != (n,) or self.lrd_.shape != (n,):
            raise _bad_state(self.name, f"k_distance/lrd shapes for {n} references")
        self.fit_X_ = X
        self.n_neighbors_ = max(1, min(self.n_neighbors, n - 1))

    def score(self, X: Matrix) -> Matrix:
        d = _distances(np.asarray(X, dtype=np.float64), self.fit_X_)
        idx = np.argsort(d, axis=1, kind="stable")[:, : self.n_neighbors_]
        dist = np.take_along_axis(d, idx, axis=1)
        lrd = self._lrd(dist, idx)
        return np.asarray(np.mean(self.lrd_[idx], axis=1) / lrd, dtype=np.float64)

    def _lrd(self, dist: Matrix, idx: np.ndarray) -> Matrix:
        reach = np.maximum(dist, self.k_distance_[idx])
        return np.asarray(1.0 / (np.mean(reach, axis=1) + _EPS), dtype=np.float64)


def _distances(A: Matrix, B: Matrix) -> Matrix:
    # Row by row: exact differences (no |a|^2 + |b|^2 - 2ab cancellation), small memory.
    return np.stack([np.linalg.norm(B - a, axis=1) for a in A]).astype(np.float64)
