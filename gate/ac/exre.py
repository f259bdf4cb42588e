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
from gate.ac.config import EXRE_PER_CLASS, ExreHook


class ExreTraining:
    """The rows the fast ExRe classifier trains on (:func:`exre_sample`), read from the ExRe
    layer once and shared by every class and candidate (each leaves its own members out)."""

    def __init__(
        self, space: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], seed: int
    ) -> None:
        self.space, self.labels = space, labels
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
    diff: npt.NDArray[np.float64] | None = None
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
    return Reclassified(float(l_votes / max(p_votes, 1)), source, odds, pred, diff)


def flat(space: npt.NDArray[np.float32], rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    return np.asarray(space[rows], dtype=np.float32).reshape(len(rows), -1)
