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

* ``"calibrated"`` (opt-in, issue 15): the same candidates, with ExRe also in a PCA of the
  input; each class's best candidate is scored against a null of the model's other
  candidates (each class's strongest cluster left out) and gets a p-value; flagged below
  ``alpha`` or at log-odds > ``exre_log_odds`` (:mod:`gate.ac.calibrated`).

Silhouette and spectral signatures are reported but do not flag by default.

Layout: :mod:`gate.ac.config` (settings and thresholds), :mod:`gate.ac.reduction` (PCA/ICA,
k-means, fit subsamples), :mod:`gate.ac.candidates` (candidate clusters, separation),
:mod:`gate.ac.exre` (fast exclusionary reclassification), :mod:`gate.ac.rules` (rules
``exre`` and ``separation``), :mod:`gate.ac.calibrated`, :mod:`gate.ac.spectral`; this module
runs them per class and assembles the results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from gate.ac import calibrated, numeric, transfer
from gate.ac.candidates import Candidate, candidates, separation
from gate.ac.config import (
    CHUNK,
    EXRE_LOG_ODDS,
    EXRE_PER_CLASS,
    EXRE_SEPARATION_THRESHOLD,
    FIT_SUBSAMPLE,
    ISOLATED_SEPARATION,
    N_INIT,
    SEPARATION_RULE,
    SEPARATION_THRESHOLD,
    SILHOUETTE_SAMPLE,
    ACConfig,
    Detector,
    ExreHook,
    Reduction,
    Rule,
)
from gate.ac.exre import Evidence, ExreTraining, Reclassified
from gate.ac.reduction import ClassRows, class_rows, kmeans, plane, reduce, reduce_with_top
from gate.ac.rules import Pick, exre_rule, search_spaces, separation_rule
from gate.ac.spectral import SpectralResult, spectral_signature

__all__ = [
    "CHUNK",
    "EXRE_LOG_ODDS",
    "EXRE_PER_CLASS",
    "EXRE_SEPARATION_THRESHOLD",
    "FIT_SUBSAMPLE",
    "ISOLATED_SEPARATION",
    "N_INIT",
    "SEPARATION_RULE",
    "SEPARATION_THRESHOLD",
    "SILHOUETTE_SAMPLE",
    "ACConfig",
    "Candidate",
    "ClassClustering",
    "ClassRows",
    "Detector",
    "Evidence",
    "ExreHook",
    "ExreTraining",
    "Reduction",
    "Rule",
    "SpectralResult",
    "candidates",
    "class_rows",
    "cluster_classes",
    "kmeans",
    "plane",
    "reduce",
    "separation",
]


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
    # Flagged by the AC rule: (row, class ExRe put it in) per suspicious row, for repair.
    relabels: tuple[tuple[int, int], ...] = field(default=(), repr=False, compare=False)
    p_value: float | None = None  # rule "calibrated": the class's p-value (gate.ac.calibrated)


def cluster_classes(
    activations: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    config: ACConfig,
    classes: list[int] | None = None,
    exre_x: npt.NDArray[np.float32] | None = None,
    exre_hook: ExreHook | None = None,
    on_class: Callable[[ClassClustering], None] | None = None,
    input_x: npt.NDArray[np.floating] | None = None,
    input_order: npt.NDArray[np.int64] | None = None,
    input_tokens: bool = False,
    early: Mapping[int, Callable[[], ClassClustering | Split]] | None = None,
) -> list[ClassClustering]:
    """Cluster each class's activations; ``suspicious_indices`` are rows of the data.

    ``exre_x`` is the ExRe layer: the space the fast ExRe classifier works in (default:
    ``activations``) and, with rules ``"exre"`` and ``"calibrated"``, a second space to look
    for clusters in. ``input_x`` (rule ``"calibrated"``): the model's inputs, rows
    ``input_order`` of it in the order of ``labels``; ExRe also runs in a PCA of them
    (of their bags of words with ``input_tokens``: a text model's token ids and mask).
    ``exre_hook`` replaces the linear classifier with the user's own retraining (full ExRe).
    ``on_class`` is called with each class's result as it is done (progress; with rule
    ``"calibrated"`` before the model-wide decision, which needs every class). ``early``
    gives classes already reduced and split (:func:`prepare_class`, run while extraction
    was still going; :mod:`gate.ac.early`); the others are prepared here.
    """
    present = sorted(int(c) for c in np.unique(labels))
    wanted = present if classes is None else classes
    training = ExreTraining(activations if exre_x is None else exre_x, labels, config.seed)
    trainings = [training]
    space = None
    if config.rule == "calibrated" and exre_hook is None and input_x is not None:
        space = calibrated.input_space(input_x, labels, config.seed, input_order, input_tokens)
        if space is not None:
            trainings.append(ExreTraining(space, labels, config.seed, "knn"))
    done: list[ClassClustering | _Prepared] = []
    for c in wanted:
        split = early[c]() if early is not None and c in early else None
        if split is None:
            split = prepare_class(activations, np.flatnonzero(labels == c), c, config)
        prep = split if isinstance(split, ClassClustering) else split.prepared(
            Evidence(training, c, exre_hook)
        )
        if isinstance(prep, _Prepared):
            if config.rule == "calibrated":
                evs = [prep.ev, *(Evidence(t, c, None) for t in trainings[1:])]
                prep = replace(prep, scored=_score(config, prep, exre_x, evs))
            else:
                prep = _finish(config, prep, _rule_pick(config, prep, exre_x))
        done.append(prep)
        if on_class is not None:
            on_class(prep if isinstance(prep, ClassClustering) else _skip(c, prep.n, ""))
    if config.rule != "calibrated":
        return [d for d in done if isinstance(d, ClassClustering)]
    preps = [d for d in done if isinstance(d, _Prepared)]
    null = calibrated.fit_null(
        [d.scored for d in preps], [t.classifier for t in trainings], config.combine
    )
    adjusted = dict(
        zip(
            (d.label for d in preps),
            calibrated.holm([calibrated.raw_p(d.scored, null) for d in preps]),
            strict=True,
        )
    )
    out = [
        d
        if isinstance(d, ClassClustering)
        else _calibrated(config, d, null, adjusted[d.label], len(preps))
        for d in done
    ]
    if space is None:
        return out
    return _transferred(config, out, preps, null, space, labels, trainings[1:])


def _transferred(
    cfg: ACConfig,
    results: list[ClassClustering],
    preps: list[_Prepared],
    null: calibrated.Null,
    space: npt.NDArray[np.float32],
    labels: npt.NDArray[np.int64],
    more: list[ExreTraining],
) -> list[ClassClustering]:
    """Rule "calibrated", last pass (:mod:`gate.ac.transfer`): each unflagged class's rows
    along the flagged classes' trigger in the input (``space``), one more candidate judged
    against the same ``null`` (ExRe in the ExRe layer and the ``more`` spaces), Holm over
    the classes it is offered in."""
    flagged = [r for r in results if r.flagged]
    moved = [(row, dest) for r in flagged for row, dest in r.relabels if dest != r.label]
    done = {r.label for r in flagged}
    open_ = [p for p in preps if p.label not in done]
    offers = transfer.offers(
        cfg,
        space,
        labels,
        moved,
        [(p.idx, p.reduced, [p.ev, *(Evidence(m, p.label, None) for m in more)]) for p in open_],
    )
    offered = [(p, s) for p, s in zip(open_, offers, strict=True) if s is not None]
    ps = calibrated.holm(
        [calibrated.p_value(null.score(s, moved_only=True), null.n_spaces) for _, s in offered]
    )
    teachers = ", ".join(str(r.label) for r in flagged)
    new = {}
    for (prep, s), p in zip(offered, ps, strict=True):
        if p >= cfg.transfer_alpha:
            continue
        found = (
            f"{len(s.members) / prep.n:.0%} of the class lies beyond half the trigger's shift "
            f"along the trigger of flagged classes {teachers} (in the input)",
            f"separation {s.cand.separation:.2f}",
        )
        new[prep.label] = _picked(
            cfg,
            prep,
            s,
            null.best_space(s, moved_only=True),
            True,
            null,
            p,
            found,
            ("transfer_alpha", cfg.transfer_alpha, f"the {len(offered)} classes offered"),
        )
    return [new.get(r.label, r) for r in results]


def _skip(label: int, n: int, why: str) -> ClassClustering:
    return ClassClustering(label, n, None, False, (), (), skipped=why)


@dataclass(frozen=True)
class Split:
    """A class reduced and split in two (:func:`prepare_class`), before any rule."""

    label: int
    idx: npt.NDArray[np.int64]
    reduced: npt.NDArray[np.float64]
    assign: npt.NDArray[np.int64]
    sil: float
    spectral: SpectralResult

    @property
    def n(self) -> int:
        return len(self.idx)

    def prepared(self, ev: Evidence) -> _Prepared:
        return _Prepared(
            self.label, self.idx, self.reduced, self.assign, self.sil, self.spectral, ev
        )


@dataclass(frozen=True)
class _Prepared(Split):
    """A split class with its ExRe evidence, waiting for a rule's decision."""

    ev: Evidence
    scored: tuple[calibrated.Scored, ...] = ()


def prepare_class(
    acts: npt.NDArray[np.float32],
    idx: npt.NDArray[np.int64],
    label: int,
    cfg: ACConfig,
    rows_of: npt.NDArray[np.int64] | None = None,
) -> ClassClustering | Split:
    """Reduce class ``label`` (rows ``idx``) and split it in two. ``acts[rows_of]`` are its
    activations when ``acts`` holds only this class (default: ``acts[idx]``); needs nothing
    of the other classes, so it can run before they are extracted."""
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
    rows = class_rows(acts, idx if rows_of is None else rows_of, cfg.seed)
    if rows.width < 2:
        return _skip(label, n, "activations are constant")
    reduced, top = reduce_with_top(rows, min(k, rows.width, n - 1), cfg.reduction, cfg.seed)
    assign = kmeans(reduced, 2, cfg.seed, cfg.n_init)
    sizes = np.bincount(assign, minlength=2)
    spectral = spectral_signature(rows.x, idx, cfg, top)
    del rows
    if sizes.min() == 0:
        return ClassClustering(
            label, n, 0.0, False, (), tuple(int(s) for s in sizes), spectral=spectral
        )
    sil = numeric.silhouette(reduced, assign, min(n, SILHOUETTE_SAMPLE), cfg.seed)
    return Split(label, idx, reduced, assign, sil, spectral)


def _rule_pick(
    cfg: ACConfig, prep: _Prepared, exre_layer: npt.NDArray[np.float32] | None
) -> Pick:
    if cfg.rule == "exre":
        return exre_rule(cfg, prep.idx, prep.reduced, prep.assign, exre_layer, prep.ev)
    return separation_rule(cfg, prep.sil, prep.idx, prep.reduced, prep.assign, prep.ev)


def _score(
    cfg: ACConfig,
    prep: _Prepared,
    exre_layer: npt.NDArray[np.float32] | None,
    evs: list[Evidence],
) -> tuple[calibrated.Scored, ...]:
    """Rule "calibrated", first pass: every candidate and its ExRe verdict in each space."""
    spaces = search_spaces(cfg, prep.idx, prep.reduced, exre_layer)
    out = []
    for cand in candidates(cfg, spaces, cfg.separation_threshold, first=prep.assign):
        members = prep.idx[cand.mask]
        out.append(calibrated.Scored(cand, members, tuple(ev.full(members) for ev in evs)))
    return tuple(out)


def _calibrated(
    cfg: ACConfig, prep: _Prepared, null: calibrated.Null, p: float, n_classes: int
) -> ClassClustering:
    """Rule "calibrated", second pass: the class's best candidate against the model's null
    (``p``: the class's p-value, Holm-adjusted over the ``n_classes`` classes)."""
    best, space, flagged = calibrated.decide(cfg, prep.scored, null, p, n_classes)
    if best is None:
        small = int(np.argmin(np.bincount(prep.assign, minlength=2)))
        mask = prep.assign == small
        members = prep.idx[mask]
        lp, source, odds = prep.ev(members)
        sep = separation(prep.reduced, mask.astype(np.int64))
        sizes = tuple(int(s) for s in np.bincount(prep.assign, minlength=2))
        pick = Pick(False, (), members, sep, sizes, lp, source, odds, prep.assign, prep.reduced)
        return replace(_finish(cfg, prep, replace(pick, found_in="layer")), p_value=_p6(p))
    cand = best.cand
    found = (
        f"k-means cluster (k={cand.k}, {cand.where}) holds {len(best.members) / prep.n:.0%} "
        "of the class",
        f"separation {cand.separation:.2f} > {cfg.separation_threshold}",
    )
    return _picked(cfg, prep, best, space, flagged, null, p, found)


def _picked(
    cfg: ACConfig,
    prep: _Prepared,
    best: calibrated.Scored,
    space: int,
    flagged: bool,
    null: calibrated.Null,
    p: float,
    found: tuple[str, ...],
    level: tuple[str, float, str] | None = None,
) -> ClassClustering:
    """The class's result for candidate ``best`` on the verdict of ``space`` (``found``: the
    reasons that say where the candidate came from; ``level``: the significance level its
    ``p`` is held to, by name, and what Holm ran over; default ``alpha``, the classes)."""
    name, alpha, over = level or ("alpha", cfg.alpha, "the classes")
    cand, verdict = best.cand, best.verdicts[space]
    size, n = len(best.members), prep.n
    reasons: tuple[str, ...] = (
        *found,
        f"{_evidence_text(best)} (source {verdict.source}); "
        f"this model's null (its candidates, each class's strongest left out): "
        f"{null.describe()}",
        f"calibrated score {null.score(best, moved_only=True):.2f}, p {p:.2g} "
        f"(Holm over {over}) "
        f"({'<' if p < alpha else '>='} {name} {alpha:g})",
    )
    if flagged and p >= alpha:
        reasons = (*reasons, "flagged on rule exre's thresholds for the ExRe layer")
    pick = Pick(
        flagged,
        reasons,
        best.members,
        cand.separation,
        (n - size, size),
        verdict.lp,
        verdict.source,
        verdict.log_odds,
        cand.mask.astype(np.int64),
        cand.reduced,
        cand.where,
    )
    return replace(_finish(cfg, prep, pick, verdict), p_value=_p6(p))


def _p6(p: float) -> float:
    return float(f"{p:.6g}")


def _evidence_text(best: calibrated.Scored) -> str:
    """What ExRe said in each space, as the reasons show it."""
    layer, *rest = best.verdicts
    parts = ["ExRe log-odds " + ("-" if layer.log_odds is None else f"{layer.log_odds:.1f}")]
    for v in rest:
        if v.unanimous is not None:
            parts.append(f"input neighbours put {v.unanimous:.0%} of it in another class")
        elif v.log_odds is not None:
            parts.append(f"input ExRe log-odds {v.log_odds:.1f}")
    return "; ".join(parts)


def _finish(
    cfg: ACConfig, prep: _Prepared, pick: Pick, relabel_from: Reclassified | None = None
) -> ClassClustering:
    """The class's result; repair labels from ``relabel_from`` (the verdict the rule went by
    for ``pick.members``) or else from the ExRe layer."""
    label, n, spectral = prep.label, prep.n, prep.spectral
    assign, reduced = prep.assign, prep.reduced
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
        round(prep.sil, 6),
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
        relabels=_relabels(prep.ev, pick.members, relabel_from) if ac_flag and flagged else (),
    )


def _relabels(
    ev: Evidence, members: npt.NDArray[np.int64], verdict: Reclassified | None = None
) -> tuple[tuple[int, int], ...]:
    """Each member's class under the ExRe classifier trained without its cluster (``verdict``
    or the ExRe layer's, memoised: the rule already asked)."""
    predicted = (verdict if verdict is not None else ev.full(members)).predicted
    if predicted is None:
        return ()
    pairs = zip(members.tolist(), predicted.tolist(), strict=True)
    return tuple((int(m), int(p)) for m, p in pairs)
