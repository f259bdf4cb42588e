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

With a baseline each class is compared with the same class of the references
(:func:`against_references`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

# Divides the robust z-scores before the Gaussian tail (heavier tail; see module docstring).
Z_SCALE = 2.2
STATISTICS = ("max_margin", "mask_l1")
# Against references: the statistics of each test (see against_references). A class's
# flip mask is about its inputs as a *source*, so it is tested apart from the target side.
TESTS = {"target": ("max_margin", "mask_l1"), "source": ("flip_l1",)}
# Leave-one-out needs at least two others per reference.
MIN_REFERENCES = 3


def _sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def class_scores(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """Per class, higher = easier to reach = more suspicious, in log units."""
    margin = np.maximum(np.asarray(result["max_margin"], dtype=np.float64), 1e-3)
    l1 = np.asarray(result["target_mask_l1"], dtype=np.float64)
    out = {
        "max_margin": [float(v) for v in np.log(margin)],
        "mask_l1": [float(v) for v in -np.log(l1 + 0.5)],
    }
    flip = result.get("flip_mask_l1")
    if flip is not None:
        out["flip_l1"] = [float(v) for v in -np.log(np.asarray(flip, dtype=np.float64) + 0.5)]
    return out


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


def profile(result: Mapping[str, Any]) -> dict[str, list[float]]:
    """What a baseline stores per reference: every per-class score (see class_scores)."""
    return {name: [_f(v) for v in values] for name, values in class_scores(result).items()}


def against_references(
    result: Mapping[str, Any], references: Sequence[Mapping[str, Sequence[float]]]
) -> dict[str, Any]:
    """The candidate's per-class scores against the same classes of clean references.

    References share the candidate's classes and data, so class c of the candidate is
    compared with class c of every reference: a naturally easy class (a wide-margin digit)
    is easy in the references too and cancels out, which the within-model null cannot do.
    Per statistic the deviations are scaled by the references' spread pooled over classes,
    summed over a test's statistics, and split into a model-wide shift (the median over
    classes) and each class's excess over it. Both are scaled by the same quantities
    computed for every reference left out in turn, so the null is the references' own
    spread. Three tests:

    * **target** (max margin + target mask): the largest class excess, Student-t tail,
      Bonferroni over K classes. All-to-one backdoors make their target abnormally easy;
    * **source** (flip mask): the same on how easily each class's inputs leave it.
      Source-specific and all-to-all backdoors make their sources abnormally easy;
    * **shift**: the target statistics' model-wide shift, two-sided t with n - 1 degrees
      of freedom (a blend or all-to-all poisoning can move every class at once).

    The p-value is the smallest of the three, times three (Bonferroni).
    """
    cand = class_scores(result)
    k = int(result["n_classes"])
    if len(references) < MIN_REFERENCES:
        raise ValueError(f"at least {MIN_REFERENCES} references are needed")
    tests = {}
    for test, names in TESTS.items():
        if not all(n in cand and all(n in r for r in references) for n in names):
            continue
        ref = np.asarray([[list(r[n]) for n in names] for r in references], dtype=np.float64)
        if ref.shape[2] != k:
            raise ValueError(f"the references have {ref.shape[2]} classes, the candidate {k}")
        tests[test] = _excess(np.asarray([cand[n] for n in names], dtype=np.float64), ref)
    if "target" not in tests:
        raise ValueError("the references lack the target statistics")
    p: dict[str, float] = {}
    for test, (z, _z_shift) in tests.items():
        p[test] = min(1.0, k * _t_sf(float(np.max(z)), len(references) * (k - 1)))
    z_target, z_shift = tests["target"]
    p["shift"] = min(1.0, 2.0 * _t_sf(abs(z_shift), len(references) - 1))
    best = int(np.argmax(z_target))
    out = {
        "p_value": min(1.0, len(p) * min(p.values())),
        "suspect": best,
        "z": [_f(v) for v in z_target],
        "class_p": [_f(_t_sf(float(v), len(references) * (k - 1))) for v in z_target],
        "z_shift": _f(z_shift),
        "tests": {name: _f(v) for name, v in sorted(p.items())},
    }
    if "source" in tests:
        out["z_source"] = [_f(v) for v in tests["source"][0]]
    return out


def _t_sf(z: float, dof: int) -> float:
    from scipy.special import stdtr

    return float(stdtr(max(dof, 1), -z))


def _excess(
    v: npt.NDArray[np.float64], ref: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], float]:
    """Per-class excess z and model-wide shift z of ``v`` (statistics x classes) against
    ``ref`` (references x statistics x classes), scaled by the references' leave-one-out."""
    n = len(ref)
    loo = [_deviation(ref[j], np.delete(ref, j, axis=0)) for j in range(n)]
    sd_excess = max(float(np.sqrt(np.mean([e**2 for e, _ in loo]))), 1e-9)
    sd_shift = max(float(np.sqrt(np.mean([g**2 for _, g in loo]))), 1e-9)
    excess, shift = _deviation(v, ref)
    return excess / sd_excess, shift / sd_shift


def _deviation(
    v: npt.NDArray[np.float64], others: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], float]:
    """``v`` (statistics x classes) against ``others`` (models x statistics x classes): the
    per-class excess over the model-wide shift, and the shift."""
    mu = others.mean(0)
    dof = others.shape[2] * max(len(others) - 1, 1)
    sd = np.sqrt(((others - mu) ** 2).sum(axis=(0, 2)) / dof)
    u = ((v - mu) / np.maximum(sd, 1e-9)[:, None]).sum(0)
    shift = float(np.median(u))
    return u - shift, shift


def _f(v: float) -> float:
    return float(f"{float(v):.6g}")
