from __future__ import annotations

import math
from typing import Self

import numpy as np

from gate.detectors.base import Detector, Matrix, _bad_state

_LEAF = -1


class IsolationForestDetector(Detector):
    """Isolation Forest: how few random splits isolate a fingerprint.

    Trained with scikit-learn's ``IsolationForest``; its trees are then flattened into
    arrays (all trees' nodes in one table, children as global node indices, features
    mapped back to fingerprint columns) and scored in numpy, exactly as
    ``-IsolationForest.score_samples`` does (a test checks they agree).
    """

    name = "iforest"
    state_keys = ("feature", "threshold", "left", "right", "leaf_depth", "roots", "normaliser")

    def __init__(self, n_estimators: int = 100, seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.seed = seed

    def fit(self, X: Matrix) -> Self:
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(X)
        feature, threshold, left, right, leaf_depth, roots = [], [], [], [], [], []
        offset = 0
        for est, cols in zip(forest.estimators_, forest.estimators_features_, strict=True):
            t = est.tree_
            leaf = t.children_left == _LEAF
            roots.append(offset)
            feature.append(np.where(leaf, _LEAF, np.asarray(cols)[np.maximum(t.feature, 0)]))
            threshold.append(t.threshold)
            left.append(np.where(leaf, _LEAF, t.children_left + offset))
            right.append(np.where(leaf, _LEAF, t.children_right + offset))
            depth = _node_depths(t.children_left, t.children_right)
            avg = np.array([_average_path_length(int(n)) for n in t.n_node_samples])
            leaf_depth.append(np.where(leaf, depth + avg, 0.0))
            offset += t.node_count
        self.feature_ = np.concatenate(feature).astype(np.int64)
        self.threshold_ = np.concatenate(threshold).astype(np.float64)
        self.left_ = np.concatenate(left).astype(np.int64)
        self.right_ = np.concatenate(right).astype(np.int64)
        self.leaf_depth_ = np.concatenate(leaf_depth).astype(np.float64)
        self.roots_ = np.asarray(roots, dtype=np.int64)
        self.normaliser_ = np.float64(_average_path_length(int(forest.max_samples_)))
        return self

    def _restore(self, X: Matrix) -> None:
        n = len(self.feature_)
        arrays = (self.threshold_, self.left_, self.right_, self.leaf_depth_)
        if any(a.shape != (n,) for a in (self.feature_, *arrays)) or self.roots_.ndim != 1:
            raise _bad_state(self.name, "node arrays differ in length")
        for key in ("feature", "left", "right", "roots"):
            if getattr(self, f"{key}_").dtype.kind not in "iu":
                raise _bad_state(self.name, f"{key} is not an integer array")
        inner = self.left_ != _LEAF
        nodes = np.arange(n)
        # Children after their parent (as scikit-learn numbers nodes) rules out cycles,
        # so scoring always reaches a leaf.
        if not (
            np.all((self.left_[inner] > nodes[inner]) & (self.left_[inner] < n))
            and np.all((self.right_[inner] > nodes[inner]) & (self.right_[inner] < n))
            and np.all(self.right_[~inner] == _LEAF)
            and np.all((self.feature_[inner] >= 0) & (self.feature_[inner] < X.shape[1]))
            and np.all((self.roots_ >= 0) & (self.roots_ < n))
            and self.normaliser_.shape == ()
            and float(self.normaliser_) > 0
        ):
            raise _bad_state(self.name, "tree structure")

    def score(self, X: Matrix) -> Matrix:
        # scikit-learn compares float32 inputs with float64 thresholds.
        X32 = np.asarray(X, dtype=np.float32).astype(np.float64)
        out = np.empty(len(X32))
        for i, x in enumerate(X32):
            nodes = self.roots_.copy()
            inner = self.left_[nodes] != _LEAF
            while inner.any():
                go_left = x[self.feature_[nodes]] <= self.threshold_[nodes]
                step = np.where(go_left, self.left_[nodes], self.right_[nodes])
                nodes = np.where(inner, step, nodes)
                inner = self.left_[nodes] != _LEAF
            mean_depth = float(np.mean(self.leaf_depth_[nodes]))
            out[i] = 2.0 ** (-mean_depth / float(self.normaliser_))
        return out


def _node_depths(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    depth = np.zeros(len(left))
    for node in range(len(left)):  # parents come before children
        if left[node] != _LEAF:
            depth[left[node]] = depth[right[node]] = depth[node] + 1
    return depth


def _average_path_length(n: int) -> float:
    """Expected depth of an unsuccessful search in a binary tree of ``n`` samples."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return 2.0 * (math.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n
