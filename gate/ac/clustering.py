"""Per-class Activation Clustering (Chen et al., 2018) and spectral signatures (Tran et al., 2018).

Each class's activations are reduced (PCA or FastICA, fitted on a seeded subsample and
applied to every row in chunks) and split with seeded k-means. Per class we report:

* **relative size** of the suspicious cluster;
* **silhouette** of the 2-means split (kept for reference: on small CNNs it does not
  separate poisoned from clean classes, see ``bench/README.md``);
* **separation**: the distance between a cluster's centroid and the rest of the class along
  the line joining them, in units of the pooled within-cluster standard deviation.
  Splitting one Gaussian blob in two gives about 2.65 whatever the dimension;
* **fast ExRe** (exclusionary reclassification): a logistic regression trained on a
  class-balanced sample of every class without the cluster classifies the cluster. ``l/p``
  counts votes for the class itself vs the most voted other class (the suspected source);
  the **ExRe log-odds** is the median over the cluster of ``log p(c) - log p(l)``, ``c``
  each member's most probable other class;
* **spectral signature**: outlier scores along the top singular vector of the centred
  class activations, and the same separation statistic on that 1-D projection.

Rules (``ACConfig.rule``):

* ``"exre"`` (default): candidate clusters are every k-means cluster, k = 2 ..
  ``max_clusters``, of the clustered layer and, when one is given, of the ExRe layer (an
  earlier layer), each against the rest of its class. A candidate is poison when it is small
  (``max_poison_fraction``), not a cut through one blob (``separation_threshold``) and the
  ExRe classifier *in the ExRe layer* confidently puts it in other classes (log-odds >
  ``exre_log_odds``, or half that for a cluster lying ``isolated_separation`` away from the
  rest). Of the passing candidates the one with the strongest ExRe evidence is
  flagged. Why: poison is a source-class input with a trigger, so before the backdoor has
  mapped it (in an earlier layer) it looks like its source class; a natural sub-population
  of a class (a handwriting style) is at most ambiguous there. Measured in bench/README.md.
* ``"separation"`` (the previous default): the smaller 2-means cluster is flagged when it is
  small and its separation exceeds the threshold (5.5 on digit CNNs); failing that, 3-means
  cluster-vs-rest with ExRe l/p < 1.

Silhouette and spectral signatures are reported but do not flag by default.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Literal, TypeVar

import numpy as np
import numpy.typing as npt

from gate.ac import numeric

_F = TypeVar("_F", bound=np.generic)
Reduction = Literal["ica", "pca"]
Detector = Literal["ac", "spectral", "either"]
Rule = Literal["exre", "separation"]
ExreHook = Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]], npt.ArrayLike
]

# Rows used to fit the reduction, k-means and the spectral direction per class (seeded
# subsample); every row is then transformed / assigned. A 10 % cluster of a 4,000-row
# sample still has ~400 rows, and fitting cost stays flat as classes grow (bench_scale.py).
FIT_SUBSAMPLE = 4000
# k-means restarts. bench_ac.py: the default rule's F1 is the same with 4 as with 10 (it
# tries k = 2-4 in two spaces anyway); the paper's single ICA 2-means split needs 10.
N_INIT = 4
SILHOUETTE_SAMPLE = 2000
CHUNK = 8192
EXRE_PER_CLASS = 300  # training rows per class for the fast ExRe classifier
# Measured on load_digits (bench/README.md): clean classes split at 2.8-5.2, isolated poison
# at 5.5-15. One blob split in two gives ~2.65 in theory. Used by rule "separation" and for
# spectral signatures.
SEPARATION_THRESHOLD = 5.5
# Rule "exre": separation only has to rule out a cut through one blob (2.65); the ExRe
# evidence does the rest.
EXRE_SEPARATION_THRESHOLD = 3.0
# Rule "exre": median over a cluster of log p(best other class) - log p(l) under the held-out
# classifier. Measured on digit CNNs (bench/results/ac-margins.md): the k-means clusters of 16
# clean models at most 4.42 (a style of "1"), the pure poison cluster of each of 90 poisoned
# classes 10.5-26.
EXRE_LOG_ODDS = 7.0
# Rule "exre": a cluster this far from the rest of its class needs only half the ExRe
# log-odds. Measured (bench/README.md): of the k-means clusters of 16 clean digit CNNs, none
# had both separation > 6.6 and log-odds > 2.5 (max log-odds 4.4 at separation 5.6, max
# separation 8.4 at log-odds 1.6); a planted cluster in a 512-wide MLP had log-odds 4.96 at
# separation 9.15 (bench_scale.py), below EXRE_LOG_ODDS alone.
ISOLATED_SEPARATION = 7.0


@dataclass(frozen=True)
class ACConfig:
    n_components: int = 10
    reduction: Reduction = "pca"
    rule: Rule = "exre"
    # Rule "exre" looks at both sides of a split: all-to-one poisoning of 10 % of a 10-class
    # set makes the target class about half poison (the demo's BadNets model: 51 %).
    max_poison_fraction: float = 0.6
    silhouette_threshold: float = 0.15
    min_cluster_size: int = 5
    separation_threshold: float = EXRE_SEPARATION_THRESHOLD
    exre_log_odds: float = EXRE_LOG_ODDS
    isolated_separation: float = ISOLATED_SEPARATION
    spectral_threshold: float = SEPARATION_THRESHOLD
    exre_threshold: float = 0.0  # rule "separation": require l/p below this (0: report only)
    detector: Detector = "ac"
    use_silhouette: bool = False
    max_clusters: int = 4
    n_init: int = N_INIT
    search_exre_layer: bool = True  # rule "exre": also look for clusters in the ExRe layer
    seed: int = 0


# The previous default (rule "separation"), kept for comparison and as a policy choice.
SEPARATION_RULE = ACConfig(
    rule="separation",
    max_poison_fraction=0.35,
    separation_threshold=SEPARATION_THRESHOLD,
    max_clusters=3,
    n_init=10,
)


@dataclass(frozen=True)
class _TopDirection:
    vector: npt.NDArray[np.float64]  # unit top principal direction of a class's activations
    ratio: float  # first over second principal variance


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
    exre_log_odds: float | None = None
    found_in: str | None = None  # rule "exre": "layer" or "exre layer" (where k-means ran)
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
    on_class: Callable[[ClassClustering], None] | None = None,
) -> list[ClassClustering]:
    """Cluster each class's activations; ``suspicious_indices`` are rows of the data.

    ``exre_x`` is the ExRe layer: the space the fast ExRe classifier works in (default:
    ``activations``) and, with rule ``"exre"``, a second space to look for clusters in.
    ``exre_hook`` replaces the linear classifier with the user's own retraining (full ExRe).
    ``on_class`` is called with each class's result as it is done (progress).
    """
    present = sorted(int(c) for c in np.unique(labels))
    wanted = present if classes is None else classes
    training = ExreTraining(activations if exre_x is None else exre_x, labels, config.seed)
    out = []
    for c in wanted:
        out.append(_one_class(activations, labels, c, config, training, exre_hook, exre_x))
        if on_class is not None:
            on_class(out[-1])
    return out


def _skip(label: int, n: int, why: str) -> ClassClustering:
    return ClassClustering(label, n, None, False, (), (), skipped=why)


def _one_class(
    acts: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    label: int,
    cfg: ACConfig,
    training: ExreTraining,
    hook: ExreHook | None,
    exre_layer: npt.NDArray[np.float32] | None = None,
) -> ClassClustering:
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
    rows = _class_rows(acts, idx, cfg.seed)
    if rows.width < 2:
        return _skip(label, n, "activations are constant")
    reduced, top = _reduce(rows, min(k, rows.width, n - 1), cfg.reduction, cfg.seed)
    assign = kmeans(reduced, 2, cfg.seed, cfg.n_init)
    sizes = np.bincount(assign, minlength=2)
    spectral = _spectral(rows.x, idx, cfg, top)
    del rows
    if sizes.min() == 0:
        return ClassClustering(
            label, n, 0.0, False, (), tuple(int(s) for s in sizes), spectral=spectral
        )
    sil = numeric.silhouette(reduced, assign, min(n, SILHOUETTE_SAMPLE), cfg.seed)
    ev = _Evidence(training, label, hook)
    if cfg.rule == "exre":
        pick = _exre_rule(cfg, idx, reduced, assign, exre_layer, ev)
    else:
        pick = _separation_rule(cfg, sil, idx, reduced, assign, ev)
    ac_flag = pick.flagged
    reasons = pick.reasons
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
        suspicious = tuple(int(i) for i in pick.members)
    else:
        suspicious = spectral.suspicious_indices
    shown = pick.reduced if ac_flag else reduced
    return ClassClustering(
        label,
        n,
        round(sil, 6),
        flagged,
        suspicious,
        pick.sizes,
        separation=round(pick.separation, 4),
        small_fraction=round(len(pick.members) / n, 6),
        exre_score=None if pick.exre is None else round(pick.exre, 4),
        suspected_source=pick.source,
        spectral=spectral,
        reasons=reasons if flagged else (),
        cluster_of=pick.assign if ac_flag else assign,
        plane=plane(shown) if flagged else None,
        exre_log_odds=None if pick.log_odds is None else round(pick.log_odds, 4),
        found_in=pick.found_in,
    )


@dataclass(frozen=True)
class ClassRows:
    """A class's rows (flattened) and the columns that vary on the rows the reduction is
    fitted on (:func:`_fit_rows`; None: all of them). Constant columns get no weight in the
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


def _class_rows(
    acts: npt.NDArray[np.float32], idx: npt.NDArray[np.int64], seed: int = 0
) -> ClassRows:
    """The class's rows, one copy, and which columns vary on the fit sample."""
    x = np.asarray(acts[idx], dtype=np.float32).reshape(len(idx), -1)
    fit = _fit_rows(x, seed)
    varying = (fit.max(axis=0) - fit.min(axis=0)) > 1e-6
    return ClassRows(x, None if varying.all() else np.flatnonzero(varying))


@dataclass(frozen=True)
class _Pick:
    """The cluster a rule settled on (flagged or, if none passed, the one reported)."""

    flagged: bool
    reasons: tuple[str, ...]
    members: npt.NDArray[np.int64]  # rows of the data
    separation: float
    sizes: tuple[int, ...]
    exre: float | None
    source: int | None
    log_odds: float | None
    assign: npt.NDArray[np.int64]  # cluster of each class row in the space it was found in
    reduced: npt.NDArray[np.float64]
    found_in: str | None = None


class ExreTraining:
    """The rows the fast ExRe classifier trains on (:func:`_exre_sample`), read from the ExRe
    layer once and shared by every class and candidate (each leaves its own members out)."""

    def __init__(
        self, space: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], seed: int
    ) -> None:
        self.space, self.labels = space, labels
        self.rows = _exre_sample(labels, seed)
        self._x: npt.NDArray[np.float32] | None = None

    def without(
        self, members: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """(rows, their activations) of the training rows that are not ``members``."""
        if self._x is None:
            self._x = _flat(self.space, self.rows)
        keep = ~np.isin(self.rows, members, assume_unique=True)
        return self.rows[keep], self._x[keep]


class _Evidence:
    """Fast ExRe for one class, memoised per candidate member set."""

    def __init__(self, training: ExreTraining, label: int, hook: ExreHook | None) -> None:
        self.training, self.label, self.hook = training, label, hook
        self._memo: dict[bytes, tuple[float | None, int | None, float | None]] = {}

    def __call__(
        self, members: npt.NDArray[np.int64]
    ) -> tuple[float | None, int | None, float | None]:
        """(l/p, suspected source, log-odds); log-odds is None with a hook."""
        key = np.ascontiguousarray(members).tobytes()
        if key not in self._memo:
            self._memo[key] = _exre(self.training, self.label, members, self.hook)
        return self._memo[key]


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


def _exre_rule(
    cfg: ACConfig,
    idx: npt.NDArray[np.int64],
    reduced: npt.NDArray[np.float64],
    assign2: npt.NDArray[np.int64],
    exre_layer: npt.NDArray[np.float32] | None,
    ev: _Evidence,
) -> _Pick:
    """Candidates from k-means (k = 2 .. max_clusters) in the clustered layer and the ExRe
    layer; flag the one with the strongest ExRe evidence among those that pass."""

    n = len(idx)
    spaces: list[tuple[str, npt.NDArray[np.float64]]] = [("layer", reduced)]
    if exre_layer is not None and cfg.search_exre_layer:
        xe = _class_rows(exre_layer, idx, cfg.seed)
        if xe.width >= 2:
            comps = min(cfg.n_components, xe.width, n - 1)
            spaces.append(("exre layer", reduce(xe, comps, cfg.reduction, cfg.seed)))
        del xe
    best: tuple[float, ...] | None = None
    pick: _Pick | None = None
    for cand in candidates(cfg, spaces, cfg.separation_threshold, first=assign2):
        mask, sep = cand.mask, cand.separation
        size = int(mask.sum())
        members = idx[mask]
        lp, source, odds = ev(members)
        if odds is not None:
            confident = odds > cfg.exre_log_odds
            isolated = odds > cfg.exre_log_odds / 2 and sep > cfg.isolated_separation
            passed = confident or isolated
            strength = odds
        else:  # a user hook gives labels only: the paper's l/p test
            limit = cfg.exre_threshold or 1.0
            passed = lp is not None and lp < limit
            strength = -(lp if lp is not None else np.inf)
        rank = (float(passed), strength, sep)
        if best is not None and rank <= best:
            continue
        best = rank
        reasons = (
            f"k-means cluster (k={cand.k}, {cand.where}) holds {size / n:.0%} of the class",
            f"separation {sep:.2f} > {cfg.separation_threshold}",
            _exre_reason(cfg, odds, sep, lp, source),
        )
        pick = _Pick(
            passed,
            reasons,
            members,
            sep,
            (n - size, size),
            lp,
            source,
            odds,
            mask.astype(np.int64),
            cand.reduced,
            cand.where,
        )
    if pick is not None:
        return pick
    # Nothing qualified as a candidate: report the 2-means split.
    small = int(np.argmin(np.bincount(assign2, minlength=2)))
    mask = assign2 == small
    members = idx[mask]
    lp, source, odds = ev(members)
    return _Pick(
        False,
        (),
        members,
        separation(reduced, mask.astype(np.int64)),
        tuple(int(s) for s in np.bincount(assign2, minlength=2)),
        lp,
        source,
        odds,
        assign2,
        reduced,
        "layer",
    )


def _exre_reason(
    cfg: ACConfig, odds: float | None, sep: float, lp: float | None, source: int | None
) -> str:
    if odds is None:
        return f"ExRe l/p {lp:.2f} < {cfg.exre_threshold or 1.0} (hook)"
    if odds > cfg.exre_log_odds:
        return f"ExRe log-odds {odds:.1f} > {cfg.exre_log_odds} (source {source})"
    return (
        f"ExRe log-odds {odds:.1f} > {cfg.exre_log_odds / 2:g} (source {source}) with "
        f"separation {sep:.2f} > {cfg.isolated_separation}"
    )


def _separation_rule(
    cfg: ACConfig,
    sil: float,
    idx: npt.NDArray[np.int64],
    reduced: npt.NDArray[np.float64],
    assign: npt.NDArray[np.int64],
    ev: _Evidence,
) -> _Pick:
    """The previous default: smaller 2-means cluster; failing that 3-means cluster-vs-rest
    with ExRe l/p < 1."""

    n = len(idx)
    sizes = np.bincount(assign, minlength=2)
    small = int(np.argmin(sizes))
    frac = float(sizes[small] / n)
    sep = separation(reduced, assign if small == 1 else 1 - assign)
    members = idx[assign == small]
    exre, source, odds = ev(members)
    ac_flag, reasons = _ac_rule(cfg, sil, frac, int(sizes[small]), sep, exre)
    out_sizes = tuple(int(s) for s in sizes)
    # Extra candidates must also pass ExRe (l/p < 1): k = 3 splits clean classes more often.
    strict = replace(cfg, exre_threshold=cfg.exre_threshold or 1.0)
    for k_more in range(3, cfg.max_clusters + 1):
        if ac_flag:
            break
        more = kmeans(reduced, k_more, cfg.seed, cfg.n_init)
        for c in range(k_more):
            mask = (more == c).astype(np.int64)
            c_sep = separation(reduced, mask)
            c_frac = float(mask.mean())
            c_members = idx[mask == 1]
            c_exre, c_src, c_odds = ev(c_members)
            c_flag, c_reasons = _ac_rule(strict, sil, c_frac, len(c_members), c_sep, c_exre)
            if c_flag:
                ac_flag, reasons, members, exre, source, odds = (
                    c_flag,
                    c_reasons,
                    c_members,
                    c_exre,
                    c_src,
                    c_odds,
                )
                sep, out_sizes = c_sep, (n - len(c_members), len(c_members))
                break
    return _Pick(
        ac_flag, reasons, members, sep, out_sizes, exre, source, odds, assign, reduced, "layer"
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


def reduce(rows: ClassRows, comps: int, how: Reduction, seed: int) -> npt.NDArray[np.float64]:
    """Fit ICA/PCA on a seeded subsample of the varying columns; transform every row in
    chunks."""
    return _reduce(rows, comps, how, seed)[0]


def _reduce(
    rows: ClassRows, comps: int, how: Reduction, seed: int
) -> tuple[npt.NDArray[np.float64], _TopDirection | None]:
    """:func:`reduce`, and with PCA the top principal direction (over all columns) and the
    ratio of the first two variances (what spectral signatures need, without a second
    eigendecomposition)."""
    x = rows.x
    fit_rows = rows.varying(_fit_rows(x, seed))
    if how == "pca":
        pca = numeric.fit_pca(fit_rows, comps, seed)
        transform: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float64]] = pca.transform
        var = pca.explained_variance
        ratio = float(var[0] / max(var[1], 1e-12)) if len(var) > 1 else 0.0
        top: _TopDirection | None = _TopDirection(rows.full_width(pca.components[0]), ratio)
    else:
        from sklearn.decomposition import FastICA

        ica = FastICA(n_components=comps, random_state=seed, whiten="unit-variance", max_iter=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence chatter; the result is still used
            ica.fit(fit_rows)
        transform, top = ica.transform, None
    out = np.empty((len(x), comps), dtype=np.float64)
    for s in range(0, len(x), CHUNK):
        out[s : s + CHUNK] = transform(rows.varying(x[s : s + CHUNK]))
    return out, top


def _fit_rows(x: npt.NDArray[_F], seed: int) -> npt.NDArray[_F]:
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
    """Seeded k-means (``n_init`` k-means++ restarts) fitted on :func:`_fit_rows`; every
    row is assigned to its nearest centre."""
    centres, labels = numeric.kmeans_fit(_fit_rows(z, seed), k, seed, n_init)
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


def _spectral(
    x: npt.NDArray[np.float32],
    idx: npt.NDArray[np.int64],
    cfg: ACConfig,
    top: _TopDirection | None = None,
) -> SpectralResult:
    """Tran et al.: scores along the top singular vector of the centred class activations
    (``top``, from the PCA of :func:`_reduce`, or computed here on :func:`_fit_rows`)."""

    mu = x.mean(axis=0, dtype=np.float64)
    if top is None:
        fit = _fit_rows(x, cfg.seed) - mu
        vals, vecs = np.linalg.eigh(fit.T @ fit)
        del fit
        ratio = float(vals[-1] / max(vals[-2], 1e-12)) if len(vals) > 1 else 0.0
        top = _TopDirection(vecs[:, -1], ratio)
    v, ratio = top.vector, top.ratio
    # x @ v in float32 (no float64 copy of the class), centred afterwards.
    proj = (x @ v.astype(np.float32)).astype(np.float64) - float(mu @ v)
    assign = kmeans(proj[:, None], 2, cfg.seed, cfg.n_init)
    sep = separation(proj[:, None], assign)
    sizes = np.bincount(assign, minlength=2)
    small = int(np.argmin(sizes))
    frac = sizes[small] / len(x)
    # Tran et al. remove the 1.5 * eps highest scores; eps = the policy's poison bound.
    scores = proj**2
    eps = min(cfg.max_poison_fraction, 0.5)
    n_out = min(len(x) - 1, int(np.ceil(1.5 * eps * len(x))))
    highest = np.sort(idx[np.argsort(-scores, kind="stable")[:n_out]])
    flagged = bool(
        sep > cfg.spectral_threshold
        and frac <= cfg.max_poison_fraction
        and sizes[small] >= cfg.min_cluster_size
    )
    members = np.sort(idx[assign == small]) if flagged else highest
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
    training: ExreTraining,
    label: int,
    members: npt.NDArray[np.int64],
    hook: ExreHook | None,
) -> tuple[float | None, int | None, float | None]:
    """Exclusionary reclassification of ``members`` (sorted rows): (l/p, the suspected
    source, log-odds).

    The classifier is trained on ``training`` without the members. ``l/p`` is the members'
    votes for ``label`` over the votes for the most voted other class (the suspected
    source). The log-odds is the median over the members of ``log p(c) - log p(label)``,
    ``c`` being each member's most probable other class: above zero, most members are put
    in some other class; far above, confidently so (None with a hook, which returns labels
    only). Each member's own best class, not one common source, so poison gathered from many
    source classes into one target (all-to-one) counts as well.
    """
    labels = training.labels
    train, x_train = training.without(members)
    y_train = labels[train]
    if len(np.unique(y_train)) < 2 or len(members) == 0:
        return None, None, None
    x_cluster = _flat(training.space, members)
    odds: float | None = None
    if hook is not None:
        pred = np.asarray(hook(x_train, y_train, x_cluster)).astype(np.int64).ravel()
        if pred.shape != (len(members),):
            from gate.errors import UsageError

            raise UsageError(
                f"--exre-hook returned {pred.shape[0]} labels for {len(members)} samples"
            )
    else:
        classes, proba = numeric.logistic_proba(x_train, y_train, x_cluster)
        pred = classes[proba.argmax(axis=1)]
        if label in classes:
            own = int(np.searchsorted(classes, label))
            other = proba.copy()
            other[:, own] = -1.0
            diff = np.log(other.max(axis=1) + 1e-12) - np.log(proba[:, own] + 1e-12)
            odds = float(np.median(diff))
    votes = np.bincount(pred[pred >= 0], minlength=int(max(labels.max(), pred.max()) + 1))
    l_votes = int(votes[label]) if label < len(votes) else 0
    votes_other = votes.copy()
    if label < len(votes_other):
        votes_other[label] = -1
    source = int(np.argmax(votes_other))
    p_votes = int(max(votes_other[source], 0))
    return float(l_votes / max(p_votes, 1)), source, odds


def _flat(space: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return np.asarray(space[rows], dtype=np.float32).reshape(len(rows), -1)
