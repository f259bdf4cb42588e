"""Turning a trigger search's per-class statistics into p-values (runs in the parent).

Without a baseline the null is *within the model*: a clean model's classes are about
equally easy to reach, a backdoored model has one class (the target) that is far easier
than the others. Per class and statistic we take a leave-one-out robust z-score (median
and MAD of the *other* classes, so the suspect cannot hide itself in the spread), turn the
statistics' Stouffer sum per class into a one-sided Gaussian tail probability, and correct
the smallest class p-value for the K classes tested (Bonferroni). The sums are divided by
``Z_SCALE`` first: with ten classes the MAD is itself noisy and clean models' classes are
not exchangeable, so a tail on raw z would be far too light (see
bench/results/trigger.md for the value's design and its held-out check).

With a baseline the candidate's model-level scores are ranked among the references'
(conformal, with the fingerprint's exponential tail beyond the largest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gate.detectors.calibration import cauchy_combine, p_value

# Divides the robust z-scores before the Gaussian tail (heavier tail; see module docstring).
Z_SCALE = 2.2
STATISTICS = ("max_margin", "mask_l1")
# Smallest tail scale per model-level score, in its own units: references often tie (every
# clean model's within-model p is 1, i.e. a score of 0), which would make the fitted tail
# infinitely steep. One decade of p-value for ``within``; 10% of the margin for ``margin``.
TAIL_FLOOR = {"within": 1.0, "margin": 0.1}


def _sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def class_scores(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per class, higher = easier to reach = more suspicious, in log units."""
    margin = np.maximum(np.asarray(result["max_margin"], dtype=np.float64), 1e-3)
    l1 = np.asarray(result["target_mask_l1"], dtype=np.float64)
    return {
        "max_margin": [float(v) for v in np.log(margin)],
        "mask_l1": [float(v) for v in -np.log(l1 + 0.5)],
    }


def loo_z(values: Sequence[float]) -> list[float]:
    """Leave-one-out robust z: each value against the median / MAD of the others."""
    v = np.asarray(values, dtype=np.float64)
    out = []
    for i in range(len(v)):
        rest = np.delete(v, i)
        med = float(np.median(rest))
        mad = 1.4826 * float(np.median(np.abs(rest - med)))
        scale = max(mad, 1e-6 * max(abs(med), 1.0))
        out.append(float((v[i] - med) / scale))
    return out


def within_model(
    result: Mapping[str, Any], statistics: Sequence[str] = STATISTICS
) -> dict[str, Any]:
    """The within-model null: p-value, per-class z and p, and the most suspicious class."""
    scores = class_scores(result)
    # Every class, not only those present in the inputs: max margin needs no inputs, and a
    # target's mask is stamped on the *other* classes' inputs.
    present = list(range(int(result["n_classes"])))
    k = len(present)
    z = {name: loo_z([scores[name][c] for c in present]) for name in statistics}
    # Stouffer's sum per class: a backdoor target is easy by *both* measures, a clean
    # class that is easy by one (a wide-margin digit, a class with a small natural mask)
    # rarely by the other; on the design models this separated better than the Cauchy
    # combination (driven by the single largest z) did.
    per_class_p = [
        _sf(sum(z[name][i] for name in statistics) / math.sqrt(len(statistics)) / Z_SCALE)
        for i in range(k)
    ]
    best = int(np.argmin(per_class_p))
    p = float(min(1.0, per_class_p[best] * k))
    return {
        "p_value": p,
        "suspect": int(present[best]),
        "z": {name: [_f(v) for v in z[name]] for name in statistics},
        "class_p": [_f(v) for v in per_class_p],
        "classes": present,
    }


def model_scores(result: Mapping[str, Any]) -> dict[str, float]:
    """Model-level scores (higher = more suspicious) for calibration against references.

    ``within`` is the within-model evidence; ``margin`` is the easiest class's absolute
    level, which catches backdoors that make *every* class easy (all-to-all),
    which the within-model null cannot see.
    """
    w = within_model(result)
    s = class_scores(result)
    # The easiest class's mask size was a third score; on the design models (references
    # scored leave-one-out) it added a false positive and no detection, so it is left out.
    return {
        "within": max(0.0, -math.log10(max(w["p_value"], 1e-300))),
        "margin": max(s["max_margin"]),
    }


def conformal(
    candidate: Mapping[str, float], references: Sequence[Mapping[str, float]]
) -> dict[str, Any]:
    """Each model-level score's p-value among the references', Cauchy-combined."""
    per = {
        name: p_value(
            float(candidate[name]), [float(r[name]) for r in references], TAIL_FLOOR[name]
        )
        for name in sorted(candidate)
    }
    return {"p_value": cauchy_combine(list(per.values())), "scores": per}


def _f(v: float) -> float:
    return float(f"{float(v):.6g}")
