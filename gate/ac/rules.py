"""The rules that decide whether a class's candidate cluster is poison (``ACConfig.rule``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from gate.ac.candidates import candidates, separation
from gate.ac.config import ACConfig
from gate.ac.exre import Evidence
from gate.ac.reduction import class_rows, kmeans, reduce


@dataclass(frozen=True)
class Pick:
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


def exre_rule(
    cfg: ACConfig,
    idx: npt.NDArray[np.int64],
    reduced: npt.NDArray[np.float64],
    assign2: npt.NDArray[np.int64],
    exre_layer: npt.NDArray[np.float32] | None,
    ev: Evidence,
) -> Pick:
    """Candidates from k-means (k = 2 .. max_clusters) in the clustered layer and the ExRe
    layer; flag the one with the strongest ExRe evidence among those that pass."""

    n = len(idx)
    spaces = search_spaces(cfg, idx, reduced, exre_layer)
    best: tuple[float, ...] | None = None
    pick: Pick | None = None
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
        pick = Pick(
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
    return Pick(
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


def search_spaces(
    cfg: ACConfig,
    idx: npt.NDArray[np.int64],
    reduced: npt.NDArray[np.float64],
    exre_layer: npt.NDArray[np.float32] | None,
) -> list[tuple[str, npt.NDArray[np.float64]]]:
    """Where candidates are looked for: the class's reduced rows in the clustered layer and,
    unless switched off, in the ExRe layer."""
    spaces: list[tuple[str, npt.NDArray[np.float64]]] = [("layer", reduced)]
    if exre_layer is not None and cfg.search_exre_layer:
        xe = class_rows(exre_layer, idx, cfg.seed)
        if xe.width >= 2:
            comps = min(cfg.n_components, xe.width, len(idx) - 1)
            spaces.append(("exre layer", reduce(xe, comps, cfg.reduction, cfg.seed)))
        del xe
    return spaces


def _exre_reason(
    cfg: ACConfig, odds: float | None, sep: float, lp: float | None, source: int | None
) -> str:
    if odds is None:
        if lp is None:  # e.g. one-class data: no other class to relabel the cluster as
            return "ExRe not evaluated (no other class to compare with)"
        return f"ExRe l/p {lp:.2f} < {cfg.exre_threshold or 1.0} (hook)"
    if odds > cfg.exre_log_odds:
        return f"ExRe log-odds {odds:.1f} > {cfg.exre_log_odds} (source {source})"
    return (
        f"ExRe log-odds {odds:.1f} > {cfg.exre_log_odds / 2:g} (source {source}) with "
        f"separation {sep:.2f} > {cfg.isolated_separation}"
    )


def separation_rule(
    cfg: ACConfig,
    sil: float,
    idx: npt.NDArray[np.int64],
    reduced: npt.NDArray[np.float64],
    assign: npt.NDArray[np.int64],
    ev: Evidence,
) -> Pick:
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
    return Pick(
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
