"""Candidate clusters of a class: k-means clusters, each against the rest of its class."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gate.ac.config import ACConfig
from gate.ac.reduction import kmeans


@dataclass(frozen=True)
class Candidate:
    """One k-means cluster of a class, against the rest of the class."""

    where: str  # the space it was found in: "layer" or "exre layer"
    k: int
    mask: npt.NDArray[np.bool_]  # over the class's rows
    separation: float
    reduced: npt.NDArray[np.float64]  # the class's rows in that space


def candidates(
    cfg: ACConfig,
    spaces: list[tuple[str, npt.NDArray[np.float64]]],
    min_separation: float,
    first: npt.NDArray[np.int64] | None = None,
) -> Iterator[Candidate]:
    """Every distinct cluster of k-means, k = 2 .. ``max_clusters``, in each of ``spaces``
    (the class's rows, reduced) that holds ``min_cluster_size`` rows to
    ``max_poison_fraction`` of the class and lies farther than ``min_separation`` from the
    rest. ``first``: the 2-means assignment of the first space, when already computed."""
    seen: set[bytes] = set()
    for i, (where, red) in enumerate(spaces):
        n = len(red)
        for k in range(2, max(cfg.max_clusters, 2) + 1):
            reuse = first is not None and i == 0 and k == 2
            assign = first if reuse else kmeans(red, k, cfg.seed, cfg.n_init)
            assert assign is not None
            for c in range(k):
                mask = assign == c
                size = int(mask.sum())
                if size < cfg.min_cluster_size or size / n > cfg.max_poison_fraction:
                    continue
                key = np.packbits(mask).tobytes()
                if key in seen:
                    continue
                seen.add(key)
                sep = separation(red, mask.astype(np.int64))
                if sep > min_separation:
                    yield Candidate(where, k, mask, sep, red)


def separation(z: npt.NDArray[np.floating], assign: npt.NDArray[np.integer]) -> float:
    """Centroid distance over pooled within-cluster std, along the line joining the centroids
    (``assign``: 0 or 1 per row)."""
    # Sums through a 0/1 vector instead of copying each cluster's rows (called for every
    # candidate on every row of a class).
    in_b = (np.asarray(assign) == 1).astype(z.dtype)
    nb = float(in_b.sum())
    na = len(z) - nb
    if na < 2 or nb < 2:
        return 0.0
    total = z.sum(axis=0)
    sum_b = in_b @ z
    mean_a, mean_b = (total - sum_b) / na, sum_b / nb
    d = mean_b - mean_a
    norm = float(np.linalg.norm(d))
    if norm == 0:
        return 0.0
    u = d / norm
    p = z @ u - float(mean_a @ u)  # centred on cluster a: no cancellation at large offsets
    pb = p * in_b
    s1b, s2b = float(pb.sum()), float(pb @ p)
    s1a, s2a = float(p.sum()) - s1b, float(p @ p) - s2b
    var_a = s2a / na - (s1a / na) ** 2
    var_b = s2b / nb - (s1b / nb) ** 2
    within = (var_a * na + var_b * nb) / (na + nb)
    return float(norm / np.sqrt(max(within, 1e-12)))
