"""Per-class Activation Clustering (Chen et al., 2018) and spectral signatures (Tran et al., 2018).

Each class's activations are reduced (FastICA or PCA, fitted on a seeded subsample and
applied to every row in chunks) and split with seeded 2-means. Per class we report:

* **relative size** of the smaller cluster;
* **silhouette** of the split (kept for reference: on small CNNs it does not separate
  poisoned from clean classes, see ``bench/README.md``);
* **separation**: the distance between the two centroids along the line joining them, in
  units of the pooled within-cluster standard deviation. Splitting one Gaussian blob in
  two gives about 2.65 whatever the dimension; a planted sub-population sits far above;
* **fast ExRe**: a linear classifier trained on every other class (and this class without
  the cluster) classifies the cluster; ``l/p`` counts votes for the class itself vs the
  most voted other class (the suspected source);
* **spectral signature**: outlier scores along the top singular vector of the centred
  class activations, and the same separation statistic on that 1-D projection.

A class is flagged when the smaller 2-means cluster is small (``max_poison_fraction``) and
well separated (``separation_threshold``); failing that, each 3-means cluster is tried
against the rest of the class with the same tests plus ExRe l/p < 1. Silhouette and
spectral signatures are reported but do not flag by default (measured in bench/README.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import numpy.typing as npt

Reduction = Literal["ica", "pca"]
Detector = Literal["ac", "spectral", "either"]
ExreHook = Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]], npt.ArrayLike
]

FIT_SUBSAMPLE = 4000  # rows used to fit the reduction per class; all rows are transformed
SILHOUETTE_SAMPLE = 2000
CHUNK = 8192
EXRE_PER_CLASS = 300  # training rows per class for the fast ExRe classifier
# Measured on load_digits (bench/README.md): clean classes split at 2.8-5.2, isolated poison
# at 5.5-15. One blob split in two gives ~2.65 in theory.
SEPARATION_THRESHOLD = 5.5


@dataclass(frozen=True)
class ACConfig:
    n_components: int = 10
    reduction: Reduction = "pca"
    max_poison_fraction: float = 0.35
    silhouette_threshold: float = 0.15
    min_cluster_size: int = 5
    separation_threshold: float = SEPARATION_THRESHOLD
    spectral_threshold: float = SEPARATION_THRESHOLD
    exre_threshold: float = 0.0
    detector: Detector = "ac"
    use_silhouette: bool = False
    max_clusters: int = 3
    seed: int = 0


@dataclass(frozen=True)
class SpectralResult:
    separation: float
    top_ratio: float  # top singular value^2 over the second: share of the leading direction
    suspicious_indices: tuple[int, ...]
    flagged: bool


@dataclass(frozen=True)
class ClassClustering:
    label: int
    size: int
    silhouette: float | None
    flagged: bool
    suspicious_indices: tuple[int, ...]
    cluster_sizes: tuple[int, ...]
    skipped: str | None = None
    separation: float | None = None
    small_fraction: float | None = None
    exre_score: float | None = None
    suspected_source: int | None = None
    spectral: SpectralResult | None = None
    reasons: tuple[str, ...] = ()
    cluster_of: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)
    # Flagged classes only: the class's rows in the first two principal directions of the
    # reduction (N x 2, in the order of the class's rows), for the cluster picture.
    plane: npt.NDArray[np.float64] | None = field(default=None, repr=False, compare=False)


def cluster_classes(
    activations: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    config: ACConfig,
    classes: list[int] | None = None,
    exre_x: npt.NDArray[np.float32] | None = None,
    exre_hook: ExreHook | None = None,
) -> list[ClassClustering]:
    """Cluster each class's activations in two; ``suspicious_indices`` are rows of the data.

    ``exre_x`` is the space the fast ExRe classifier works in (default: ``activations``);
    ``exre_hook`` replaces it with the user's own retraining (full ExRe).
    """
    present = sorted(int(c) for c in np.unique(labels))
    wanted = present if classes is None else classes
    space = activations if exre_x is None else exre_x
    sample = _exre_sample(labels, config.seed)
    return [_one_class(activations, labels, c, config, space, sample, exre_hook) for c in wanted]


def _skip(label: int, n: int, why: str) -> ClassClustering:
    return ClassClustering(label, n, None, False, (), (), skipped=why)


def _one_class(
    acts: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    label: int,
    cfg: ACConfig,
    space: npt.NDArray[np.float32],
    exre_sample: npt.NDArray[np.int64],
    hook: ExreHook | None,
) -> ClassClustering:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    idx = np.flatnonzero(labels == label)
    n = len(idx)
    k = cfg.n_components
    if n == 0:
        return _skip(label, 0, "no samples")
    if n < 2 * k + 2:
        return _skip(
            label,
            n,
            f"too small to cluster ({n} samples; need at least {2 * k + 2} for {k} components)",
        )
    x = np.asarray(acts[idx], dtype=np.float32)
    keep = x.std(axis=0) > 1e-7
    x = x[:, keep]
    if x.shape[1] < 2:
        return _skip(label, n, "activations are constant")
    reduced = reduce(x, min(k, x.shape[1], n - 1), cfg.reduction, cfg.seed)
    assign = KMeans(n_clusters=2, n_init=10, random_state=cfg.seed).fit_predict(reduced)
    sizes = np.bincount(assign, minlength=2)
    spectral = _spectral(x, idx, cfg)
    if sizes.min() == 0:
        return ClassClustering(
            label, n, 0.0, False, (), tuple(int(s) for s in sizes), spectral=spectral
        )
    sil = float(
        silhouette_score(
            reduced, assign, sample_size=min(n, SILHOUETTE_SAMPLE), random_state=cfg.seed
        )
    )
    small = int(np.argmin(sizes))
    frac = float(sizes[small] / n)
    sep = separation(reduced, assign)
    members = idx[assign == small]
    exre, source = _exre(space, labels, label, members, exre_sample, hook)
    ac_flag, reasons = _ac_rule(cfg, sil, frac, int(sizes[small]), sep, exre)
    # Extra candidates must also pass ExRe (l/p < 1): k = 3 splits clean classes more often.
    strict = replace(cfg, exre_threshold=cfg.exre_threshold or 1.0)
    for k_more in range(3, cfg.max_clusters + 1):
        if ac_flag:
            break
        # Cluster-vs-rest: a k-means cluster that is small, far from the rest and (ExRe)
        # belongs to another class. Opt-in; see bench/README.md.
        more = KMeans(n_clusters=k_more, n_init=10, random_state=cfg.seed).fit_predict(reduced)
        for c in range(k_more):
            mask = (more == c).astype(np.int64)
            c_sep = separation(reduced, 1 - mask)
            c_frac = float(mask.mean())
            c_members = idx[mask == 1]
            c_exre, c_src = _exre(space, labels, label, c_members, exre_sample, hook)
            c_flag, c_reasons = _ac_rule(strict, sil, c_frac, len(c_members), c_sep, c_exre)
            if c_flag:
                ac_flag, reasons, members, exre, source = (
                    c_flag,
                    c_reasons,
                    c_members,
                    c_exre,
                    c_src,
                )
                sep, frac, sizes = c_sep, c_frac, np.array([n - len(c_members), len(c_members)])
                break
    if cfg.detector == "ac":
        flagged = ac_flag
    elif cfg.detector == "spectral":
        flagged = spectral.flagged
    else:
        flagged = ac_flag or spectral.flagged
    if cfg.detector != "ac" and spectral.flagged:
        reasons = (*reasons, f"spectral separation {spectral.separation:.2f}")
    if not flagged:
        suspicious: tuple[int, ...] = ()
    elif ac_flag:
        suspicious = tuple(int(i) for i in members)
    else:
        suspicious = spectral.suspicious_indices
    return ClassClustering(
        label,
        n,
        round(sil, 6),
        flagged,
        suspicious,
        tuple(int(s) for s in sizes),
        separation=round(sep, 4),
        small_fraction=round(frac, 6),
        exre_score=None if exre is None else round(exre, 4),
        suspected_source=source,
        spectral=spectral,
        reasons=reasons if flagged else (),
        cluster_of=assign,
        plane=plane(reduced) if flagged else None,
    )


def _ac_rule(
    cfg: ACConfig, sil: float, frac: float, small: int, sep: float, exre: float | None
) -> tuple[bool, tuple[str, ...]]:
    reasons: list[str] = []
    ok = frac <= cfg.max_poison_fraction and small >= cfg.min_cluster_size
    if ok:
        reasons.append(f"smaller cluster holds {frac:.0%} of the class")
    if cfg.use_silhouette:
        ok = ok and sil > cfg.silhouette_threshold
        reasons.append(f"silhouette {sil:.3f} > {cfg.silhouette_threshold}")
    ok = ok and sep > cfg.separation_threshold
    reasons.append(f"separation {sep:.2f} > {cfg.separation_threshold}")
    if exre is not None and cfg.exre_threshold > 0:
        ok = ok and exre < cfg.exre_threshold
        reasons.append(f"ExRe l/p {exre:.2f} < {cfg.exre_threshold}")
    return ok, tuple(reasons)


def reduce(
    x: npt.NDArray[np.float32], comps: int, how: Reduction, seed: int
) -> npt.NDArray[np.float64]:
    """Fit ICA/PCA on a seeded subsample; transform every row in chunks."""
    from sklearn.decomposition import PCA, FastICA

    rng = np.random.default_rng(seed)
    fit_rows = (
        x
        if len(x) <= FIT_SUBSAMPLE
        else x[np.sort(rng.choice(len(x), FIT_SUBSAMPLE, replace=False))]
    )
    model: PCA | FastICA
    if how == "pca":
        model = PCA(n_components=comps, random_state=seed)
        model.fit(fit_rows)
    else:
        model = FastICA(n_components=comps, random_state=seed, whiten="unit-variance", max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; the result is still used
            model.fit(fit_rows)
    out = np.empty((len(x), comps), dtype=np.float64)
    for s in range(0, len(x), CHUNK):
        out[s : s + CHUNK] = model.transform(x[s : s + CHUNK])
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


def separation(z: npt.NDArray[np.floating], assign: npt.NDArray[np.integer]) -> float:
    """Centroid distance over pooled within-cluster std, along the line joining the centroids."""
    a, b = z[assign == 0], z[assign == 1]
    if len(a) < 2 or len(b) < 2:
        return 0.0
    d = b.mean(axis=0) - a.mean(axis=0)
    norm = float(np.linalg.norm(d))
    if norm == 0:
        return 0.0
    u = d / norm
    pa, pb = a @ u, b @ u
    within = (pa.var() * len(pa) + pb.var() * len(pb)) / (len(pa) + len(pb))
    return float(norm / np.sqrt(max(within, 1e-12)))


def _spectral(
    x: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], cfg: ACConfig
) -> SpectralResult:
    """Tran et al.: scores along the top singular vector of the centred class activations."""
    from sklearn.cluster import KMeans

    mu = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for s in range(0, len(x), CHUNK):
        c = x[s : s + CHUNK] - mu
        cov += c.T @ c
    vals, vecs = np.linalg.eigh(cov)
    v = vecs[:, -1]
    proj = np.empty(len(x))
    for s in range(0, len(x), CHUNK):
        proj[s : s + CHUNK] = (x[s : s + CHUNK] - mu) @ v
    ratio = float(vals[-1] / max(vals[-2], 1e-12)) if len(vals) > 1 else 0.0
    assign = KMeans(n_clusters=2, n_init=10, random_state=cfg.seed).fit_predict(proj[:, None])
    sep = separation(proj[:, None], assign)
    sizes = np.bincount(assign, minlength=2)
    small = int(np.argmin(sizes))
    frac = sizes[small] / len(x)
    # Tran et al. remove the 1.5 * eps highest scores; eps = the policy's poison bound.
    scores = proj**2
    n_out = min(len(x) - 1, int(np.ceil(1.5 * cfg.max_poison_fraction * len(x))))
    top = np.sort(idx[np.argsort(-scores, kind="stable")[:n_out]])
    flagged = bool(
        sep > cfg.spectral_threshold
        and frac <= cfg.max_poison_fraction
        and sizes[small] >= cfg.min_cluster_size
    )
    members = np.sort(idx[assign == small]) if flagged else top
    return SpectralResult(round(sep, 4), round(ratio, 4), tuple(int(i) for i in members), flagged)


def _exre_sample(labels: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.int64]:
    """A seeded, class-balanced subsample of rows for training the fast ExRe classifier."""
    rng = np.random.default_rng(seed + 1)
    parts = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) > EXRE_PER_CLASS:
            rows = np.sort(rng.choice(rows, EXRE_PER_CLASS, replace=False))
        parts.append(rows)
    return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)


def _exre(
    space: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    label: int,
    members: npt.NDArray[np.int64],
    sample: npt.NDArray[np.int64],
    hook: ExreHook | None,
) -> tuple[float | None, int | None]:
    """Exclusionary reclassification: l/p and the most voted other class."""
    train = np.setdiff1d(sample, members, assume_unique=True)
    y_train = labels[train]
    if len(np.unique(y_train)) < 2 or len(members) == 0:
        return None, None
    x_train = _flat(space, train)
    x_cluster = _flat(space, members)
    if hook is not None:
        pred = np.asarray(hook(x_train, y_train, x_cluster)).astype(np.int64).ravel()
        if pred.shape != (len(members),):
            from gate.errors import UsageError

            raise UsageError(
                f"--exre-hook returned {pred.shape[0]} labels for {len(members)} samples"
            )
    else:
        pred = _linear_predict(x_train, y_train, x_cluster)
    votes = np.bincount(pred[pred >= 0], minlength=int(max(labels.max(), pred.max()) + 1))
    l_votes = int(votes[label]) if label < len(votes) else 0
    votes_other = votes.copy()
    if label < len(votes_other):
        votes_other[label] = -1
    source = int(np.argmax(votes_other))
    p_votes = int(max(votes_other[source], 0))
    return float(l_votes / max(p_votes, 1)), source


def _flat(space: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return np.asarray(space[rows], dtype=np.float32).reshape(len(rows), -1)


def _linear_predict(
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
) -> npt.NDArray[np.int64]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(x_train), y_train)
    return np.asarray(clf.predict(scaler.transform(x_test)), dtype=np.int64)
