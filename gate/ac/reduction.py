"""Reducing a class's activations (PCA or FastICA) and splitting them with k-means.

Fits run on a seeded subsample of :data:`FIT_SUBSAMPLE` rows per class; every row is then
transformed / assigned in chunks, so fitting cost stays flat as classes grow.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from gate.ac import numeric
from gate.ac.config import CHUNK, FIT_SUBSAMPLE, N_INIT, Reduction

_F = TypeVar("_F", bound=np.generic)


@dataclass(frozen=True)
class TopDirection:
    vector: npt.NDArray[np.float64]  # unit top principal direction of a class's activations
    ratio: float  # first over second principal variance


@dataclass(frozen=True)
class ClassRows:
    """A class's rows (flattened) and the columns that vary on the rows the reduction is
    fitted on (:func:`fit_rows`; None: all of them). Constant columns get no weight in the
    reduction anyway, so they are skipped where it is fitted and applied instead of copying
    the class without them (a copy the size of the class, ~50 ms per class at 200k)."""

    x: npt.NDArray[np.float32]
    columns: npt.NDArray[np.int64] | None

    @property
    def width(self) -> int:
        return self.x.shape[1] if self.columns is None else len(self.columns)

    def varying(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """``x`` (some of the rows) without the constant columns."""
        return x if self.columns is None else np.take(x, self.columns, axis=1)

    def full_width(self, v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """A direction over the varying columns as one over all columns (0 elsewhere)."""
        if self.columns is None:
            return v
        out = np.zeros(self.x.shape[1])
        out[self.columns] = v
        return out


def class_rows(
    acts: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], seed: int = 0
) -> ClassRows:
    """The class's rows, one copy, and which columns vary on the fit sample."""
    x = np.asarray(acts[idx], dtype=np.float32).reshape(len(idx), -1)
    fit = fit_rows(x, seed)
    varying = (fit.max(axis=0) - fit.min(axis=0)) > 1e-6
    return ClassRows(x, None if varying.all() else np.flatnonzero(varying))



def reduce(rows: ClassRows, comps: int, how: Reduction, seed: int) -> npt.NDArray[np.float64]:
    """Fit ICA/PCA on a seeded subsample of the varying columns; transform every row in
    chunks."""
    return reduce_with_top(rows, comps, how, seed)[0]


def reduce_with_top(
    rows: ClassRows, comps: int, how: Reduction, seed: int
) -> tuple[npt.NDArray[np.float64], TopDirection | None]:
    """:func:`reduce`, and with PCA the top principal direction (over all columns) and the
    ratio of the first two variances (what spectral signatures need, without a second
    eigendecomposition)."""
    x = rows.x
    fitted = rows.varying(fit_rows(x, seed))
    if how == "pca":
        pca = numeric.fit_pca(fitted, comps, seed)
        transform: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]] = pca.transform
        var = pca.explained_variance
        ratio = float(var[0] / max(var[1], 1e-12)) if len(var) > 1 else 0.0
        top: TopDirection | None = TopDirection(rows.full_width(pca.components[0]), ratio)
    else:
        from sklearn.decomposition import FastICA

        ica = FastICA(n_components=comps, random_state=seed, whiten="unit-variance", max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; the result is still used
            ica.fit(fitted)
        transform, top = ica.transform, None
    out = np.empty((len(x), comps), dtype=np.float64)
    for s in range(0, len(x), CHUNK):
        out[s : s + CHUNK] = transform(rows.varying(x[s : s + CHUNK]))
    return out, top


def fit_rows(x: npt.NDArray[_F], seed: int) -> npt.NDArray[_F]:
    """All of ``x``, or a seeded subsample of :data:`FIT_SUBSAMPLE` rows (in row order)."""
    if len(x) <= FIT_SUBSAMPLE:
        return x
    return x[_fit_index(len(x), seed)]


@functools.lru_cache(maxsize=64)
def _fit_index(n: int, seed: int) -> npt.NDArray[np.int64]:
    # The same rows for every space and k of a class: drawn once (70 calls at 200k).
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, FIT_SUBSAMPLE, replace=False))
    index.flags.writeable = False
    return index


def kmeans(
    z: npt.NDArray[np.floating], k: int, seed: int, n_init: int = N_INIT
) -> npt.NDArray[np.int64]:
    """Seeded k-means (``n_init`` k-means++ restarts) fitted on :func:`fit_rows`; every
    row is assigned to its nearest centre."""
    centres, labels = numeric.kmeans_fit(fit_rows(z, seed), k, seed, n_init)
    if len(z) <= FIT_SUBSAMPLE:
        return labels
    out = np.empty(len(z), dtype=np.int64)
    for s in range(0, len(z), CHUNK):
        out[s : s + CHUNK] = numeric.kmeans_predict(z[s : s + CHUNK], centres)
    return out


def plane(z: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``z`` projected on its first two principal directions (sign fixed for determinism)."""
    c = np.asarray(z, dtype=np.float64) - z.mean(axis=0)
    if c.shape[1] < 2:
        return np.column_stack([c[:, 0] if c.shape[1] else np.zeros(len(c)), np.zeros(len(c))])
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    v = vt[:2].T
    v = v * np.where(v[np.abs(v).argmax(axis=0), [0, 1]] < 0, -1.0, 1.0)
    return np.asarray(c @ v, dtype=np.float64)

