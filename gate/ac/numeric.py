"""The estimators Activation Clustering needs, in numpy (and scipy for the classifier).

Why not scikit-learn: importing it costs ~2 s per ``gate ac`` process (it pulls in
``scipy.stats``), more than all clustering work at 200,000 rows (bench/bench_scale.py).
These follow scikit-learn 1.9's algorithms and random draws (``PCA`` with the ``auto``
solver, ``KMeans`` with k-means++ and Lloyd, ``silhouette_score`` with ``sample_size``,
``StandardScaler`` + ``LogisticRegression`` through scipy's L-BFGS-B, 0.5 s to import), so
results match it to rounding: ``tests/test_ac_numeric.py`` compares them. FastICA, an
option, still uses scikit-learn.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.floating]
F64 = npt.NDArray[np.float64]

KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
PCA_OVERSAMPLES = 10
CHUNK = 8192  # test rows scored at a time
SILHOUETTE_BLOCK = 256
LOGREG_C = 1.0
LOGREG_MAX_ITER = 300
LOGREG_GTOL = 1e-4  # scikit-learn's tol


@dataclass(frozen=True)
class PCAFit:
    mean: F64
    components: F64  # (n_components, n_features), rows unit length
    explained_variance: F64

    def transform(self, x: Floats) -> F64:
        # In the data's precision, as scikit-learn does: no float64 copy of a float32 chunk.
        proj = x @ self.components.T.astype(x.dtype)
        return np.asarray(proj, dtype=np.float64) - self.mean @ self.components.T


def fit_pca(x: Floats, n_components: int, seed: int) -> PCAFit:
    """Principal components as ``sklearn.decomposition.PCA(n_components, random_state=seed)``
    finds them: covariance eigendecomposition for tall data, exact SVD for small data,
    randomized SVD (7 power iterations) otherwise; signs fixed the same way."""
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    centred = x - mean.astype(x.dtype)  # float32 stays float32, as in scikit-learn
    if d <= 1000 and n >= 10 * d:
        vals, vecs = np.linalg.eigh(centred.T @ centred)
        order = np.argsort(vals)[::-1][:n_components]
        vt = vecs[:, order].T
        sing = np.sqrt(np.clip(vals[order], 0.0, None))
    elif max(n, d) <= 500 or n_components >= 0.8 * min(n, d):
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        sing, vt = sing[:n_components], vt[:n_components]
    else:
        sing, vt = _randomized_svd(centred, n_components, seed)
    vt = vt * np.where(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    vt = np.asarray(vt, dtype=np.float64)
    return PCAFit(mean, np.ascontiguousarray(vt), np.asarray(sing, np.float64) ** 2 / max(n - 1, 1))


def _randomized_svd(a: Floats, k: int, seed: int) -> tuple[Floats, Floats]:
    """Halko et al.'s range finder with power iterations (QR-normalised)."""
    rng = np.random.RandomState(seed)
    n_iter = 7 if k < 0.1 * min(a.shape) else 4
    q = a @ rng.normal(size=(a.shape[1], k + PCA_OVERSAMPLES)).astype(a.dtype)
    for _ in range(n_iter):
        q, _ = np.linalg.qr(q)
        q, _ = np.linalg.qr(a.T @ q)
        q = a @ q
    q, _ = np.linalg.qr(q)
    _, sing, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    return sing[:k], vt[:k]


def kmeans_fit(x: Floats, k: int, seed: int, n_init: int) -> tuple[F64, npt.NDArray[np.int64]]:
    """(centres, labels) of the best of ``n_init`` k-means++ / Lloyd runs by inertia, as
    ``sklearn.cluster.KMeans(k, n_init=n_init, random_state=seed)``."""
    data = np.asarray(x, dtype=np.float64)
    mean = data.mean(axis=0)
    data = data - mean
    norms = np.einsum("ij,ij->i", data, data)
    tol = float(np.mean(np.var(data, axis=0))) * KMEANS_TOL
    rng = np.random.RandomState(seed)
    # Lloyd draws nothing at random, so every start can be seeded first (the same draws as
    # one start after the other) and the starts iterated together.
    starts = np.stack([_kmeans_plusplus(data, k, norms, rng) for _ in range(n_init)])
    best: tuple[float, F64, npt.NDArray[np.int64]] | None = None
    for labels, inertia, centres in _lloyd(data, starts, tol):
        if best is None or (inertia < best[0] and not _same_clustering(labels, best[2], k)):
            best = (inertia, centres, labels)
    assert best is not None
    return best[1] + mean, best[2]


def kmeans_predict(x: Floats, centres: F64) -> npt.NDArray[np.int64]:
    return np.asarray(_assign(np.asarray(x, dtype=np.float64).T, centres[None])[0], np.int64)


def _assign(
    xt: F64, centres: F64, work: npt.NDArray[np.float64] | None = None
) -> npt.NDArray[np.int64]:
    """Each column's nearest centre (first on ties), for each of several centre sets
    (``centres``: sets x k x features; ``xt``: the data transposed). ``work`` (at least sets
    x k x rows) holds the distances, so Lloyd's iterations reuse one buffer. With a handful
    of centres a running minimum is faster than ``argmin`` along a short axis."""
    m, k, _ = centres.shape
    dist = np.empty((m, k, xt.shape[1])) if work is None else work[:m]
    # One (sets * k) x rows product: a stack of small products is twice as slow.
    np.matmul(centres.reshape(m * k, -1), xt, out=dist.reshape(m * k, -1))
    dist *= -2.0
    dist += np.einsum("mkd,mkd->mk", centres, centres)[:, :, None]
    best = dist[:, 0].copy()
    labels = np.zeros(best.shape, dtype=np.int64)
    for c in range(1, k):
        closer = dist[:, c] < best
        np.copyto(labels, c, where=closer)
        np.minimum(best, dist[:, c], out=best)
    return labels


def _sq_dist(a: F64, b: F64, b_norms: F64) -> F64:
    d = np.einsum("ij,ij->i", a, a)[:, None] - 2.0 * (a @ b.T) + b_norms[None, :]
    return np.asarray(np.maximum(d, 0.0), dtype=np.float64)


def _kmeans_plusplus(x: F64, k: int, norms: F64, rng: np.random.RandomState) -> F64:
    n = len(x)
    trials = 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]))
    first = rng.choice(n, p=np.full(n, 1.0 / n))
    centres[0] = x[first]
    closest = _sq_dist(x[[first]], x, norms)[0]
    pot = float(closest.sum())
    for c in range(1, k):
        picks = np.searchsorted(np.cumsum(closest), rng.uniform(size=trials) * pot)
        np.clip(picks, None, n - 1, out=picks)
        dists = np.minimum(closest, _sq_dist(x[picks], x, norms))
        pots = dists.sum(axis=1)
        best = int(np.argmin(pots))
        pot, closest = float(pots[best]), dists[best]
        centres[c] = x[picks[best]]
    return centres


def _lloyd(x: F64, starts: F64, tol: float) -> list[tuple[npt.NDArray[np.int64], float, F64]]:
    """(labels, inertia, centres) of Lloyd's algorithm from each of ``starts`` (sets x k x
    features), iterated together (one set of numpy calls per iteration for all restarts).
    Each stops as scikit-learn's does: labels unchanged, or the centres moved less than
    ``tol`` (then the labels are recomputed)."""
    xt = np.ascontiguousarray(x.T)
    centres = starts.copy()
    old = np.full((len(starts), len(x)), -1, dtype=np.int64)
    work = np.empty((len(starts), starts.shape[1], len(x)))  # reused by every iteration
    done: dict[int, tuple[npt.NDArray[np.int64], float, F64]] = {}
    active = np.arange(len(starts))
    for _ in range(KMEANS_MAX_ITER):
        current = centres[active]
        labels = _assign(xt, current, work)
        new = _centres(x, labels, current, work)
        shift = ((new - current) ** 2).sum(axis=(1, 2))
        strict = (labels == old[active]).all(axis=1)
        centres[active] = new
        old[active] = labels
        finished = strict | (shift <= tol)
        for j in np.flatnonzero(finished):
            final = labels[j] if strict[j] else _assign(xt, new[j][None])[0]
            done[int(active[j])] = (final, _inertia(x, new[j], final), new[j])
        active = active[~finished]
        if not len(active):
            break
    for i in active:  # KMEANS_MAX_ITER reached
        final = _assign(xt, centres[i][None])[0]
        done[int(i)] = (final, _inertia(x, centres[i], final), centres[i])
    return [done[i] for i in range(len(starts))]


def _inertia(x: F64, centres: F64, labels: npt.NDArray[np.int64]) -> float:
    return float(((x - centres[labels]) ** 2).sum())


def _centres(x: F64, labels: npt.NDArray[np.int64], old: F64, work: F64 | None = None) -> F64:
    """Cluster means per centre set (``labels``: sets x rows); an empty cluster takes the
    point farthest from its centre, as in scikit-learn. ``work``: as in :func:`_assign`."""
    m, k = old.shape[:2]
    member = np.empty((m, k, len(x))) if work is None else work[:m]
    np.copyto(member, labels[:, None, :] == np.arange(k)[None, :, None])
    counts = member.sum(axis=2)
    sums = (member.reshape(m * k, -1) @ x).reshape(m, k, -1)
    refilled: dict[int, int] = {}  # per centre set, empty clusters refilled so far
    for one, cluster in zip(*np.nonzero(counts == 0), strict=True):
        far = np.argsort(((x - old[one][labels[one]]) ** 2).sum(axis=1), kind="stable")[::-1]
        taken = refilled.get(int(one), 0)
        refilled[int(one)] = taken + 1
        row = far[taken]
        sums[one, labels[one, row]] -= x[row]
        counts[one, labels[one, row]] -= 1
        sums[one, cluster], counts[one, cluster] = x[row], 1.0
    return np.asarray(sums / np.maximum(counts, 1.0)[:, :, None])


def _same_clustering(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], k: int) -> bool:
    """Whether two labellings are the same partition (up to renaming the clusters)."""
    mapping = np.full(k, -1, dtype=np.int64)
    _, first = np.unique(a, return_index=True)
    mapping[a[first]] = b[first]
    return bool(np.array_equal(mapping[a], b))


def silhouette(x: Floats, labels: npt.NDArray[np.integer], sample_size: int, seed: int) -> float:
    """Mean silhouette (Euclidean) of ``sample_size`` rows drawn as
    ``sklearn.metrics.silhouette_score(..., sample_size, random_state=seed)`` draws them."""
    rows = np.random.RandomState(seed).permutation(len(x))[:sample_size]
    z = np.asarray(x, dtype=np.float64)[rows]
    lab = np.asarray(labels)[rows]
    clusters, lab = np.unique(lab, return_inverse=True)
    norms = np.einsum("ij,ij->i", z, z)
    onehot = np.zeros((len(z), len(clusters)))
    onehot[np.arange(len(z)), lab] = 1.0
    # Distances to every cluster, summed a block of rows at a time: a 2,000 x 2,000 matrix
    # and its temporaries would be fresh 32 MB arrays (page faults, cache misses).
    sums = np.empty((len(z), len(clusters)))
    for s in range(0, len(z), SILHOUETTE_BLOCK):
        block = z[s : s + SILHOUETTE_BLOCK]
        sums[s : s + SILHOUETTE_BLOCK] = np.sqrt(_sq_dist(block, z, norms)) @ onehot
    sizes = onehot.sum(axis=0)
    own = sizes[lab]
    intra = sums[np.arange(len(z)), lab] / np.maximum(own - 1, 1)
    mean_other = sums / sizes
    mean_other[np.arange(len(z)), lab] = np.inf
    inter = mean_other.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (inter - intra) / np.maximum(intra, inter)
    score = np.nan_to_num(score)
    score[own == 1] = 0.0
    return float(score.mean())


def prefetch_solver() -> threading.Thread:
    """Import scipy's optimizer (0.5-0.7 s, more than any clustering step at 200,000 rows)
    on a daemon thread, so that it overlaps the wait for the model's sandbox to start (1-1.3
    s; the parent only waits then). The caller joins it before it imports anything that
    imports scipy. :func:`logistic_proba` imports it as usual; a failure here is left for
    that import to report."""

    def run() -> None:
        with contextlib.suppress(Exception):  # reported by the import in logistic_proba
            import scipy.optimize  # noqa: F401

    thread = threading.Thread(target=run, name="gate-prefetch-scipy", daemon=True)
    thread.start()
    return thread


def logistic_proba(
    x_train: Floats, y_train: npt.NDArray[np.int64], x_test: Floats
) -> tuple[npt.NDArray[np.int64], F64]:
    """(classes, probabilities of ``x_test``) from scikit-learn's ``StandardScaler`` +
    ``LogisticRegression(C=1, max_iter=300)``: features scaled by the training rows' mean and
    standard deviation (constant columns keep scale 1); multinomial, intercept unpenalised,
    mean cross-entropy + |W|^2 / (2 C n) minimised by scipy's L-BFGS-B with the same options.
    The ExRe log-odds thresholds were measured with that solver, and its stopping point
    (gradient 1e-4, not the exact optimum) is part of what they mean: a fully converged fit
    is more confident on separable data."""
    from scipy.optimize import minimize

    train = np.array(x_train, dtype=np.float64)
    mean = train.mean(axis=0)
    scale = train.std(axis=0)
    scale[scale < 10 * np.finfo(np.float64).eps] = 1.0
    train -= mean
    train /= scale
    classes, y = np.unique(y_train, return_inverse=True)
    n, d = train.shape
    k = len(classes)
    rows = np.arange(n)
    l2 = 1.0 / (LOGREG_C * n)

    def loss_grad(w: F64) -> tuple[float, F64]:
        coef = w.reshape(k, d + 1)
        weight = coef[:, :d]
        raw = train @ weight.T
        raw += coef[:, d]
        raw -= raw.max(axis=1, keepdims=True)
        expo = np.exp(raw)
        total = expo.sum(axis=1)
        loss = float(np.log(total).mean() - raw[rows, y].mean()) + 0.5 * l2 * float(
            np.vdot(weight, weight)
        )
        expo /= total[:, None]  # probabilities, then the gradient of the mean loss
        expo[rows, y] -= 1.0
        expo /= n
        grad = np.empty_like(coef)
        grad[:, :d] = expo.T @ train + l2 * weight
        grad[:, d] = expo.sum(axis=0)
        return loss, grad.ravel()

    fit = minimize(
        loss_grad,
        np.zeros(k * (d + 1)),
        jac=True,
        method="L-BFGS-B",
        options={
            "maxiter": LOGREG_MAX_ITER,
            "maxls": 50,
            "gtol": LOGREG_GTOL,
            "ftol": 64 * np.finfo(float).eps,
        },
    )
    coef = fit.x.reshape(k, d + 1)
    # The scaling folded into the coefficients: no standardised copy of the test rows.
    weight = coef[:, :d] / scale
    bias = coef[:, d] - weight @ mean
    proba = np.empty((len(x_test), k))
    for s in range(0, len(x_test), CHUNK):
        proba[s : s + CHUNK] = np.exp(_log_softmax(x_test[s : s + CHUNK] @ weight.T + bias))
    return classes.astype(np.int64), proba


def _log_softmax(raw: F64) -> F64:
    top = raw.max(axis=1, keepdims=True)
    shifted = raw - top
    return np.asarray(shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))
