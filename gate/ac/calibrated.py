"""Rule ``"calibrated"``: each class's best candidate against a null from the same model.

Fixed log-odds thresholds measured on digit CNNs do not transfer (issue 15): a natural
sub-population of one model (a style of "1" that looks like a "2") can reach log-odds that a
real poison cluster of another model (a blend on 28x28 MNIST) does not. What does transfer
is how far a candidate stands out from the *other candidates of the same model*: most
k-means clusters of most classes are natural splits, so their ExRe log-odds describe what
"natural" looks like for this model, dataset and layer.

For every ExRe space (the ExRe layer and, for numeric inputs, a PCA of the input itself:
MLPs carry the trigger into their first hidden layer, the input never does) the null is
the log-odds of every candidate of every class of the model: robust location (median) and
scale (1.4826 MAD, at least :data:`MIN_SCALE`), each class's strongest cluster left out
(:func:`fit_null`). A candidate's score is the largest of its robust z over the spaces
(``combine="max"``, Bonferroni over the spaces; the mean of them, ``"mean"``, missed every
MLP one-target case of the benchmark).

Why leave each class's strongest cluster out: k-means with k = 2, 3 and 4 in two spaces
finds a poison cluster again and again, so a poisoned class offers it several times. With
every class poisoned (all-to-all), 30 of the 48 candidates of an MNIST MLP were the same
ten poison clusters: the null was the poison (ExRe log-odds 7.7 +- 6.5), and no class
stood out (p = 1 for all ten). Without them the null is the natural splits of the model,
and every class's poison stands out (p <= 2e-6). The price: the null now describes a
class's ordinary splits, not its best one, so a class's strongest natural split stands out
more than before (the benchmark's lowest clean-model p fell from 1.9e-4 to 2.2e-5, alpha
1e-6), and where every class has a distinct style cluster it can stand out a lot (an
MNIST MLP: six classes' natural splits at z ~ 8). What tells those apart is ExRe's own
test, so only a candidate that ExRe moves to another class in some space (l/p < 1,
:func:`moves`) can be flagged by its score: those natural splits stayed in their class
(log-odds -1 to -2, 1-21 % of them put elsewhere by the input neighbours).

The class's p-value is that of its best moved candidate under a standard normal reference
for the score, Bonferroni-corrected for the number of candidates the class offered, then
Holm-adjusted over the classes analysed (:func:`holm`). It is a
nominal p-value (natural candidates have heavier tails than a normal), so ``alpha`` is
small; the benchmark measures what it gives on clean models (bench/results/ac.md).
A class is flagged when p < alpha, or when rule "exre"'s thresholds on the ExRe layer
alone flag it (confident reclassification needs no calibration; :func:`decide`). A flagged
candidate's suspected source and repair labels come from the space where it stands out
most: for an MLP flagged through the input, the input's verdict (its first hidden layer
already puts the poison in the target class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from gate.ac import numeric
from gate.ac.candidates import Candidate
from gate.ac.config import CHUNK, ACConfig, Classifier
from gate.ac.exre import Reclassified, exre_sample

# Input dimensions kept for ExRe in the input: PCA keeps the class structure and drops
# the low-variance pixels a patch trigger sits on (which, standardised, would dominate a
# linear classifier) and keeps the classifier cheap at any input size.
INPUT_COMPONENTS = 64
# Floor of a null's robust scale: a model whose candidates all score alike would otherwise
# turn a small difference into a huge z. Log-odds units for a logistic verdict; for the
# input's neighbour vote (a share of the cluster), a tenth of the cluster.
MIN_SCALE = 0.5
MIN_SHARE_SCALE = 0.1
_FLOORS: dict[Classifier, float] = {"logistic": MIN_SCALE, "knn": MIN_SHARE_SCALE}
# A candidate sharing at least this share of the smaller one's members with its class's
# strongest candidate is the same cluster found again (another k or space), or a larger
# one that holds most of it (a k = 2 half with the poison in it): both leave the null.
SAME_CLUSTER = 0.5
# Hash buckets of a text model's bag of words (token ids modulo this).
TOKEN_BUCKETS = 1024


@dataclass(frozen=True)
class Scored:
    """One candidate and what ExRe said about it in each space (first: the ExRe layer)."""

    cand: Candidate
    members: npt.NDArray[np.int64]
    verdicts: tuple[Reclassified, ...]

    @property
    def odds(self) -> tuple[float | None, ...]:
        return tuple(v.log_odds for v in self.verdicts)

    @property
    def stats(self) -> tuple[float | None, ...]:
        """Each space's statistic (:attr:`Reclassified.statistic`), what the null is of."""
        return tuple(v.statistic for v in self.verdicts)


@dataclass(frozen=True)
class Null:
    location: tuple[float, ...]
    scale: tuple[float, ...]

    combine: str = "max"  # "max" or "mean" of the spaces' z

    def score(self, s: Scored, moved_only: bool = False) -> float:
        """Mean (or max) over the spaces of the candidate's robust z (spaces without a
        verdict are left out, and with ``moved_only`` those whose verdict keeps it in its
        class, :func:`moves`; -inf when none is left)."""
        zs = [z for z in self._zs(s, moved_only) if math.isfinite(z)]
        if not zs:
            return -math.inf
        return float(max(zs)) if self.combine == "max" else float(np.mean(zs))

    def best_space(self, s: Scored, moved_only: bool = False) -> int:
        """The space where the candidate stands out most (``moved_only``: of those whose
        verdict moves it; 0 when none is left)."""
        zs = self._zs(s, moved_only)
        return int(np.argmax(zs)) if any(math.isfinite(z) for z in zs) else 0

    def _zs(self, s: Scored, moved_only: bool) -> list[float]:
        return [
            -math.inf
            if v.statistic is None or not math.isfinite(m) or (moved_only and not moves(v))
            else (v.statistic - m) / d
            for v, m, d in zip(s.verdicts, self.location, self.scale, strict=True)
        ]

    @property
    def n_spaces(self) -> int:
        return len(self.location)

    def describe(self) -> str:
        parts = [f"{m:.2f} +- {d:.2f}" for m, d in zip(self.location, self.scale, strict=True)]
        return ", ".join(parts)


def fit_null(
    by_class: Sequence[Sequence[Scored]],
    classifiers: Sequence[Classifier],
    combine: str = "max",
) -> Null:
    """The null of a model's candidates (``by_class``: each class's): :func:`robust_null` of
    them all without each class's strongest candidate (highest score under the null of all
    of them, in any space) and the candidates that share most of its members
    (:data:`SAME_CLUSTER`). All of them when nothing would be left; the scale's floor keeps
    a null of a few candidates from turning small differences into large scores."""
    everything = [s for group in by_class for s in group]
    first = robust_null(everything, classifiers, combine)
    natural = [s for group in by_class for s in _without_strongest(group, first)]
    return robust_null(natural or everything, classifiers, combine)


def _without_strongest(group: Sequence[Scored], null: Null) -> list[Scored]:
    if not group:
        return []
    top = max(group, key=null.score).members
    return [s for s in group if _overlap(s.members, top) < SAME_CLUSTER]


def _overlap(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> float:
    """Members shared, over the smaller of the two (members are sorted row indices)."""
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / max(1, min(len(a), len(b)))


def robust_null(
    scored: Sequence[Scored], classifiers: Sequence[Classifier], combine: str = "max"
) -> Null:
    """Median and 1.4826 MAD of every candidate's statistic, per space (``classifiers``:
    each space's ExRe classifier, whose statistic sets the scale's floor)."""
    loc, scale = [], []
    for i, classifier in enumerate(classifiers):
        floor = _FLOORS[classifier]
        v = np.array([s.stats[i] for s in scored if s.stats[i] is not None], dtype=np.float64)
        if len(v) == 0:
            loc.append(math.nan)
            scale.append(1.0)
            continue
        m = float(np.median(v))
        loc.append(m)
        scale.append(max(1.4826 * float(np.median(np.abs(v - m))), floor))
    return Null(tuple(loc), tuple(scale), combine)


def p_value(score: float, n_tests: int) -> float:
    """Bonferroni-corrected upper normal tail of ``score``."""
    if not math.isfinite(score):
        return 1.0
    tail = 0.5 * math.erfc(score / math.sqrt(2.0))
    return float(min(1.0, max(n_tests, 1) * tail))


def raw_p(scored: Sequence[Scored], null: Null) -> float:
    """The class's p-value before the correction over classes: the upper normal tail of its
    strongest score over the spaces that move a candidate (:func:`moves`), Bonferroni over
    all its candidates (and over the spaces with ``max``)."""
    if not scored:
        return 1.0
    return p_value(max(_scores(scored, null)), _tests(scored, null))


def moves(v: Reclassified) -> bool:
    """Whether a space's ExRe verdict moves the candidate to another class: the paper's own
    test, l/p < 1 (one other class gets more of its members' votes than its own class).
    Only a space where it does counts towards the score that can flag the candidate."""
    return v.lp is not None and v.lp < 1.0


def _scores(scored: Sequence[Scored], null: Null) -> list[float]:
    """Each candidate's score over the spaces that move it (-inf where none does)."""
    return [null.score(s, moved_only=True) for s in scored]


def _tests(scored: Sequence[Scored], null: Null) -> int:
    """The tests a class's best score stands for: its candidates (times the spaces with
    ``max``)."""
    return len(scored) * (null.n_spaces if null.combine == "max" else 1)


def holm(ps: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of the classes' p-values (family-wise error over the
    classes analysed: a model with ten classes offers ten chances for a false flag)."""
    order = sorted(range(len(ps)), key=lambda i: (ps[i], i))
    out = [1.0] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def decide(
    cfg: ACConfig, scored: Sequence[Scored], null: Null, p: float, n_classes: int = 1
) -> tuple[Scored | None, int, bool]:
    """(the class's chosen candidate, the space whose verdict stands for it, flagged) given
    the class's adjusted p-value ``p`` (``n_classes``: how many classes were analysed).

    Below ``alpha`` the candidate with the highest score over the spaces that move it is
    flagged, on the verdict of the one of those where it stands out most. When that is the
    input's neighbour vote, the flagged candidate is, of those significant on their own
    (Bonferroni over the classes), the one with the most members put elsewhere unanimously:
    the top score goes to the purest cluster, often a third of the poison (an all-to-one
    target class holds poison from every source class, and k-means with k = 3 or 4 cuts it
    by source). Otherwise the rule "exre" thresholds still apply to the ExRe layer
    (log-odds above ``exre_log_odds``, or half that for a candidate farther than
    ``isolated_separation`` from the rest): confident reclassification needs no
    calibration, and the calibrated rule flags whatever rule "exre" flags.
    """
    if not scored:
        return None, 0, False
    scores = _scores(scored, null)
    best = int(np.argmax(scores))
    if p < cfg.alpha:
        space = null.best_space(scored[best], moved_only=True)
        if scored[best].verdicts[space].unanimous is not None:
            tests = _tests(scored, null) * n_classes
            best = max(
                (i for i, sc in enumerate(scores) if p_value(sc, tests) < cfg.alpha or i == best),
                key=lambda i: (_unanimous_count(scored[i], space), scores[i]),
            )
            space = null.best_space(scored[best], moved_only=True)
        return scored[best], space, True
    confident = [i for i, s in enumerate(scored) if _confident(cfg, s)]
    if confident:
        # As rule "exre" ranks them: strongest ExRe-layer evidence, then separation.
        pick = max(confident, key=lambda i: (scored[i].odds[0], scored[i].cand.separation))
        return scored[pick], 0, True
    top = max(scored, key=null.score)  # what the report shows of an unflagged class
    return top, null.best_space(top), False


def _unanimous_count(s: Scored, space: int) -> float:
    share = s.verdicts[space].unanimous
    return 0.0 if share is None else share * len(s.members)


def _confident(cfg: ACConfig, s: Scored) -> bool:
    """Rule "exre"'s thresholds on the ExRe layer; a candidate that passes only on the
    isolated path (half the log-odds, far from the rest) also needs the input's neighbours
    to put at least :data:`MIN_SHARE_SCALE` of it in another class, when they voted. The
    one clean-model false flag of the benchmark (8 "1"s of an MNIST CNN, log-odds 5.7 at
    separation > 7) had none put elsewhere; the poison that took this path 24-82 %."""
    odds = s.odds[0]
    if odds is None:
        return False
    if odds > cfg.exre_log_odds:
        return True
    if not (odds > cfg.exre_log_odds / 2 and s.cand.separation > cfg.isolated_separation):
        return False
    shares = [v.unanimous for v in s.verdicts[1:] if v.unanimous is not None]
    return not shares or max(shares) >= MIN_SHARE_SCALE


def token_bags(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Bags of words of a text model's inputs (``N x 2 x seq``: token ids, attention mask),
    token ids hashed into :data:`TOKEN_BUCKETS` counts, each row scaled to unit length.
    Why: the input space of a text model is which words a text holds, not the ids' values
    at each position (a word inserted anywhere shifts every later id)."""
    ids = np.asarray(x[:, 0, :], dtype=np.int64) % TOKEN_BUCKETS
    mask = np.asarray(x[:, 1, :]) > 0
    out = np.zeros((len(x), TOKEN_BUCKETS), dtype=np.float32)
    rows = np.broadcast_to(np.arange(len(x))[:, None], ids.shape)
    np.add.at(out, (rows[mask], ids[mask]), 1.0)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.asarray(out / np.maximum(norm, 1e-12), dtype=np.float32)


def input_space(
    x: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    seed: int,
    order: npt.NDArray[np.int64] | None = None,
    tokens: bool = False,
) -> npt.NDArray[np.float32] | None:
    """The inputs (rows ``order`` of ``x``, i.e. in the order of ``labels``) flattened (for
    a text model, ``tokens``: as :func:`token_bags`) and projected on their first
    :data:`INPUT_COMPONENTS` principal components, fitted on the ExRe training sample. None
    for inputs that are not numeric arrays."""
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or len(x) != len(labels):
        return None
    if tokens and (x.ndim != 3 or x.shape[1] != 2):
        return None
    n = len(x)
    pos = np.arange(n) if order is None else order

    def features(rows: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        part = x[rows]
        if tokens:
            return token_bags(part)
        return np.asarray(part.reshape(len(rows), -1), dtype=np.float32)

    fit_rows = pos[exre_sample(labels, seed)]
    sample = features(np.sort(fit_rows))
    comps = min(INPUT_COMPONENTS, sample.shape[1], max(len(sample) - 1, 1))
    if comps < 2:
        return None
    pca = numeric.fit_pca(sample, comps, seed)
    out = np.empty((n, comps), dtype=np.float32)
    for s in range(0, n, CHUNK):
        out[s : s + CHUNK] = pca.transform(features(pos[s : s + CHUNK]))
    return out
