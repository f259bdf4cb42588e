"""Fast exclusionary reclassification (ExRe): is a cluster confidently another class?

A classifier trained on a class-balanced sample of every class *without* the cluster
classifies the cluster's members (Chen et al.'s ExRe, with a logistic regression instead
of retraining the model; ``--exre-hook`` plugs in the user's own retraining).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from gate.ac import numeric
from gate.ac.config import EXRE_PER_CLASS, KNN_NEIGHBOURS, Classifier, ExreHook

# Distances computed at once in the kNN vote (test rows x training rows), bounding memory.
CHUNK_CELLS = 4_000_000


class ExreTraining:
    """The rows the fast ExRe classifier trains on (:func:`exre_sample`), read from the ExRe
    layer once and shared by every class and candidate (each leaves its own members out)."""

    def __init__(
        self,
        space: npt.NDArray[np.float32],
        labels: npt.NDArray[np.int64],
        seed: int,
        classifier: Classifier = "logistic",
    ) -> None:
        self.space, self.labels, self.classifier = space, labels, classifier
        self.rows = exre_sample(labels, seed)
        self._x: npt.NDArray[np.float32] | None = None

    def without(
        self, members: npt.NDArray[np.int64]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """(rows, their activations) of the training rows that are not ``members``."""
        if self._x is None:
            self._x = flat(self.space, self.rows)
        keep = ~np.isin(self.rows, members, assume_unique=True)
        return self.rows[keep], self._x[keep]


class Evidence:
    """Fast ExRe for one class, memoised per candidate member set."""

    def __init__(self, training: ExreTraining, label: int, hook: ExreHook | None) -> None:
        self.training, self.label, self.hook = training, label, hook
        self._memo: dict[bytes, Reclassified] = {}

    def __call__(
        self, members: npt.NDArray[np.int64]
    ) -> tuple[float | None, int | None, float | None]:
        """(l/p, suspected source, log-odds); log-odds is None with a hook."""
        got = self.full(members)
        return got.lp, got.source, got.log_odds

    def full(self, members: npt.NDArray[np.int64]) -> Reclassified:
        key = np.ascontiguousarray(members).tobytes()
        if key not in self._memo:
            self._memo[key] = reclassify(self.training, self.label, members, self.hook)
        return self._memo[key]


@dataclass(frozen=True)
class Reclassified:
    """What ExRe said about a cluster: l/p, the suspected source, the median log-odds, and
    each member's predicted class (what repair relabels it to)."""

    lp: float | None
    source: int | None
    log_odds: float | None
    predicted: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)
    # Each member's log p(best other class) - log p(own class) (None with a hook).
    member_odds: npt.NDArray[np.float64] | None = field(default=None, repr=False, compare=False)
    # kNN only: the share of members none of whose neighbours is of their own class and at
    # least two thirds of whose neighbours agree on one other class (:func:`_knn_verdict`).
    unanimous: float | None = None

    @property
    def statistic(self) -> float | None:
        """What rule "calibrated" compares across candidates: the unanimous share for a kNN
        verdict, else the log-odds."""
        return self.unanimous if self.unanimous is not None else self.log_odds



def exre_sample(labels: npt.NDArray[np.int64], seed: int) -> npt.NDArray[np.int64]:
    """A seeded, class-balanced subsample of rows for training the fast ExRe classifier."""
    rng = np.random.default_rng(seed + 1)
    parts = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) > EXRE_PER_CLASS:
            rows = np.sort(rng.choice(rows, EXRE_PER_CLASS, replace=False))
        parts.append(rows)
    return np.sort(np.concatenate(parts)) if parts else np.array([], dtype=np.int64)


def reclassify(
    training: ExreTraining,
    label: int,
    members: npt.NDArray[np.int64],
    hook: ExreHook | None,
) -> Reclassified:
    """Exclusionary reclassification of ``members`` (sorted rows): l/p, the suspected
    source, log-odds and each member's predicted class.

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
        return Reclassified(None, None, None)
    x_cluster = flat(training.space, members)
    odds: float | None = None
    unanimous: float | None = None
    diff: npt.NDArray[np.float64] | None = None
    if hook is not None:
        pred = np.asarray(hook(x_train, y_train, x_cluster)).astype(np.int64).ravel()
        if pred.shape != (len(members),):
            from gate.errors import UsageError

            raise UsageError(
                f"--exre-hook returned {pred.shape[0]} labels for {len(members)} samples"
            )
    elif training.classifier == "knn":
        pred, diff, agree = _knn_verdict(x_train, y_train, x_cluster, label)
        odds = float(np.median(diff))
        unanimous = float(np.mean(agree))
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
    return Reclassified(float(l_votes / max(p_votes, 1)), source, odds, pred, diff, unanimous)


def flat(space: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return np.asarray(space[rows], dtype=np.float32).reshape(len(rows), -1)


def _knn_verdict(
    x_train: npt.NDArray[np.float32],
    y_train: npt.NDArray[np.int64],
    x_test: npt.NDArray[np.float32],
    label: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(each test row's majority class, its log-odds, whether it is put elsewhere
    unanimously) among its :data:`KNN_NEIGHBOURS` nearest training rows (Euclidean; ties
    to the nearer row). The log-odds is ``log((v_c + 1/2) / (v_label + 1/2))``, ``v_c`` the
    votes of the most voted other class; unanimously: no vote for ``label`` and at least
    two thirds of the votes for ``c``.

    Why a vote and not a linear fit: a candidate cluster is never exactly the poison, and a
    logistic regression learns a trigger from the one or two poisoned rows left in its
    training set (the trigger's direction is otherwise constant there, so standardising
    blows it up); a vote of 15 neighbours cannot be swung by them (bench/README.md)."""
    k = min(KNN_NEIGHBOURS, len(x_train))
    classes, y_idx = np.unique(y_train, return_inverse=True)
    train = np.asarray(x_train, dtype=np.float64)
    sq_train = np.einsum("ij,ij->i", train, train)
    votes = np.zeros((len(x_test), len(classes)), dtype=np.float64)
    step = max(1, CHUNK_CELLS // max(len(train), 1))
    for s in range(0, len(x_test), step):
        block = np.asarray(x_test[s : s + step], dtype=np.float64)
        dist = sq_train[None, :] - 2.0 * block @ train.T
        if k < len(train):
            near = np.argpartition(dist, k - 1, axis=1)[:, :k]
        else:
            near = np.broadcast_to(np.arange(len(train)), dist.shape)
        # Order the k nearest (stable on the row index) so a tie goes to the nearest row.
        order = np.argsort(np.take_along_axis(dist, near, axis=1), axis=1, kind="stable")
        near = np.take_along_axis(near, order, axis=1)
        cls = y_idx[near]
        for j in range(k):
            # Later neighbours weigh a hair less: a tied vote goes to the nearer class.
            votes[s + np.arange(len(block)), cls[:, j]] += 1.0 - j * 1e-6
    own_col = np.searchsorted(classes, label)
    has_own = own_col < len(classes) and classes[own_col] == label
    own = votes[:, own_col] if has_own else np.zeros(len(x_test))
    other = votes.copy()
    if has_own:
        other[:, own_col] = -1.0
    pred = classes[votes.argmax(axis=1)].astype(np.int64)
    best, own = np.round(other.max(axis=1)), np.round(own)
    diff = np.log((best + 0.5) / (own + 0.5))
    agree = (own == 0) & (3 * best >= 2 * k)
    return pred, diff, agree
