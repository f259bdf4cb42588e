"""Rule ``"calibrated"``, last pass: the trigger of the flagged classes, looked for in the others.

An all-to-all poisoning puts the same trigger in every class, but each class's k-means
candidates are judged on their own, and a class whose candidates mix its poison with
natural rows can stay unflagged while its neighbours are flagged at p < 1e-12 (the MLP
cases of bench/results/ac-cases.md: two or three classes of ten missed, F1 0.83-0.88).
What the flagged classes teach is where the trigger sits in the input: their moved rows
(those ExRe put in another class) minus the mean of the class ExRe put them in. The poison
of a still unflagged class lies along that direction, far beyond the class's own rows
(AUROC 1.0 on those cases). So each unflagged class offers one more candidate, its rows
beyond half the trigger's shift along the direction, and it is judged exactly as a
k-means candidate is: ExRe in each space, against the model's own null, and only where ExRe
moves it to another class. A natural sub-population that happens to reach into the
trigger's pixels (strokes near a corner patch) stays in its class under ExRe, which is
what keeps an all-to-one model's other classes unflagged.

Nothing runs unless a class is already flagged, so on a model with no flagged class the
verdict is the one before this pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from gate.ac.calibrated import Scored
from gate.ac.candidates import Candidate, separation
from gate.ac.config import CHUNK, ACConfig
from gate.ac.exre import Evidence

# Where such a candidate was found (``found_in`` in the report).
WHERE = "input, along the flagged classes' trigger"


def direction(
    space: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    moved: Sequence[tuple[int, int]],
    min_rows: int,
) -> npt.NDArray[np.float64] | None:
    """The unit direction of the trigger in ``space`` (rows in the order of ``labels``):
    the mean over ``moved`` (row, class ExRe put it in) of the row minus that class's mean
    over the rows not moved. None with fewer than ``min_rows`` moved rows."""
    if len(moved) < min_rows:
        return None
    rows = np.fromiter((r for r, _ in moved), dtype=np.int64, count=len(moved))
    dest = np.fromiter((c for _, c in moved), dtype=np.int64, count=len(moved))
    kept = np.ones(len(labels), dtype=bool)
    kept[rows] = False
    total = np.zeros(space.shape[1], dtype=np.float64)
    for c in np.unique(dest):
        mine = rows[dest == c]
        ref = np.flatnonzero((labels == c) & kept)
        if len(ref) == 0:
            return None
        mean = np.asarray(space[ref], dtype=np.float64).mean(axis=0)
        total += (np.asarray(space[mine], dtype=np.float64) - mean).sum(axis=0)
    norm = float(np.linalg.norm(total))
    return None if norm == 0.0 else total / norm


def projection(
    space: npt.NDArray[np.floating], t: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    out = np.empty(len(space), dtype=np.float64)
    for s in range(0, len(space), CHUNK):
        out[s : s + CHUNK] = np.asarray(space[s : s + CHUNK], dtype=np.float64) @ t
    return out


def shift(
    proj: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    moved: Sequence[tuple[int, int]],
) -> float:
    """The trigger's typical shift along the direction: the median over the moved rows of
    their projection minus the median of the rows not moved of the class ExRe put them in."""
    rows = np.array([r for r, _ in moved], dtype=np.int64)
    dest = np.array([c for _, c in moved], dtype=np.int64)
    kept = np.ones(len(labels), dtype=bool)
    kept[rows] = False
    centre = {int(c): float(np.median(proj[(labels == c) & kept])) for c in np.unique(dest)}
    return float(np.median(proj[rows] - np.array([centre[int(c)] for c in dest])))


def min_share(labels: npt.NDArray[np.int64], moved: Sequence[tuple[int, int]]) -> float:
    """The smallest share of its class a candidate along the trigger may hold: half the
    median share of their class that the flagged classes' moved rows hold. One trigger
    planted across classes comes at a comparable rate in each; a handful of natural rows
    that reach into the trigger's pixels does not (an MNIST CNN's all-to-one patch: 7 "9"s
    along the patch, of which the input neighbours put 3 among the "3"s, p 2e-3; the
    poison of its target class is half of it)."""
    rows = np.array([r for r, _ in moved], dtype=np.int64)
    held = labels[rows]
    shares = [float(np.sum(held == c)) / float(np.sum(labels == c)) for c in np.unique(held)]
    return float(np.median(shares)) / 2


def beyond(
    proj: npt.NDArray[np.float64], idx: npt.NDArray[np.int64], cut: float
) -> npt.NDArray[np.bool_]:
    """Which of a class's rows (``idx``) lie more than ``cut`` above the class's median
    along the direction."""
    own = proj[idx]
    return np.asarray(own - float(np.median(own)) > cut)


def offers(
    cfg: ACConfig,
    space: npt.NDArray[np.floating],
    labels: npt.NDArray[np.int64],
    moved: Sequence[tuple[int, int]],
    classes: Sequence[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], list[Evidence]]],
) -> list[Scored | None]:
    """Per unflagged class (its rows, its reduced rows, its ExRe evidence in each space),
    the candidate of its rows along the trigger of the ``moved`` rows, with ExRe's verdict
    in each space; None where there is no trigger to follow or the candidate's size is
    outside what a k-means candidate may hold."""
    t = direction(space, labels, moved, cfg.min_cluster_size)
    if t is None:
        return [None] * len(classes)
    proj = projection(space, t)
    cut = shift(proj, labels, moved) / 2
    least = min_share(labels, moved)
    out: list[Scored | None] = []
    for idx, reduced, evs in classes:
        mask = beyond(proj, idx, cut)
        size = int(mask.sum())
        share = size / len(idx)
        big_enough = size >= cfg.min_cluster_size and share >= least
        if not cut > 0 or not big_enough or share > cfg.max_poison_fraction:
            out.append(None)
            continue
        members = idx[mask]
        cand = Candidate(WHERE, 0, mask, separation(reduced, mask.astype(np.int64)), reduced)
        out.append(Scored(cand, members, tuple(e.full(members) for e in evs)))
    return out
