"""Per-class ICA + 2-means, flagged by silhouette and relative cluster size."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gate.policy.model import ActivationClusteringPolicy


@dataclass(frozen=True)
class ClassClustering:
    label: int
    size: int
    silhouette: float | None
    flagged: bool
    suspicious_indices: tuple[int, ...]
    cluster_sizes: tuple[int, ...]
    skipped: str | None = None


def cluster_classes(
    activations: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    policy: ActivationClusteringPolicy,
    seed: int = 0,
    classes: list[int] | None = None,
) -> list[ClassClustering]:
    """Cluster each class's activations in two; ``suspicious_indices`` are rows of the data."""
    wanted = sorted(int(c) for c in np.unique(labels)) if classes is None else classes
    return [_one_class(activations, labels, c, policy, seed) for c in wanted]


def _one_class(
    acts: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    label: int,
    policy: ActivationClusteringPolicy,
    seed: int,
) -> ClassClustering:
    from sklearn.cluster import KMeans
    from sklearn.decomposition import FastICA
    from sklearn.metrics import silhouette_score

    idx = np.flatnonzero(labels == label)
    n = len(idx)
    k = policy.n_components
    if n < 2 * k + 2:
        return ClassClustering(
            label,
            n,
            None,
            False,
            (),
            (),
            skipped=(
                f"too small to cluster ({n} samples; need at least {2 * k + 2} for {k} components)"
            ),
        )
    x = acts[idx].astype(np.float64)
    x = x[:, x.std(axis=0) > 1e-9]
    if x.shape[1] < 2:
        return ClassClustering(label, n, None, False, (), (), skipped="activations are constant")
    comps = min(k, x.shape[1], n - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastICA convergence chatter; the result is still used
        reduced = FastICA(
            n_components=comps, random_state=seed, whiten="unit-variance", max_iter=500
        ).fit_transform(x)
    assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
    sizes = np.bincount(assign, minlength=2)
    if sizes.min() == 0:
        return ClassClustering(label, n, 0.0, False, (), tuple(int(s) for s in sizes))
    sil = float(silhouette_score(reduced, assign))
    small = int(np.argmin(sizes))
    frac = sizes[small] / n
    flagged = bool(
        sil > policy.silhouette_threshold
        and frac <= policy.max_poison_fraction
        and sizes[small] >= policy.min_cluster_size
    )
    suspicious = tuple(int(i) for i in idx[assign == small]) if flagged else ()
    return ClassClustering(
        label, n, round(sil, 6), flagged, suspicious, tuple(int(s) for s in sizes)
    )
