"""Turning detector scores into p-values against clean references (split-free conformal).

Each reference is scored by detectors fit on the *other* references (leave-one-out), so
the calibration scores are what a clean, unseen model of the family looks like. A
candidate's p-value is its conformal rank among them. Rank p-values cannot go below
1/(n+1), so beyond the largest calibration score we extrapolate with a Student-t tail
fitted to the calibration scores, scaled to meet the rank p-value at that point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def conformal_p_value(score: float, calibration: Sequence[float]) -> float:
    cal = np.asarray(calibration, dtype=np.float64)
    return float((1 + np.sum(cal >= score)) / (len(cal) + 1))


def _as_list(cal: np.ndarray) -> list[float]:
    return [float(v) for v in cal]


def p_value(score: float, calibration: Sequence[float]) -> float:
    """Conformal rank p-value inside the calibration range, t-tail extrapolation beyond it."""
    cal = np.asarray(calibration, dtype=np.float64)
    n = len(cal)
    top = float(cal.max())
    if score <= top:
        return conformal_p_value(score, _as_list(cal))
    sd = float(cal.std(ddof=1)) if n > 1 else 0.0
    scale = max(sd * math.sqrt(1 + 1 / n), 1e-12, abs(top) * 1e-9)
    mean = float(cal.mean())
    df = max(n - 1, 1)
    ratio = student_t_sf((score - mean) / scale, df) / max(
        student_t_sf((top - mean) / scale, df), 1e-300
    )
    return float(min(1.0, max(ratio / (n + 1), 1e-300)))


def student_t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom.

    Written out (regularised incomplete beta by continued fraction) so that scoring a
    candidate needs no scipy import, which costs more than the rest of a small scan; a
    test checks it against ``scipy.stats.t.sf``.
    """
    x = df / (df + t * t)
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, x)
    return tail if t > 0 else 1.0 - tail


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (Numerical Recipes' betai)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction for the incomplete beta, by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return h


def cauchy_combine(p_values: Sequence[float]) -> float:
    """Cauchy combination test (Liu & Xie, 2020): valid under arbitrary dependence.

    Detectors scoring one fingerprint are strongly correlated, which rules out Fisher's
    method; the Cauchy combination stays calibrated and is driven by the smallest p-values.
    """
    p = np.clip(np.asarray(p_values, dtype=np.float64), 1e-300, 1.0)
    if len(p) == 0:
        return 1.0
    # tan((0.5 - p) * pi) == 1 / tan(p * pi), which stays accurate for tiny p.
    terms = np.where(p < 1e-15, 1.0 / (p * math.pi), np.tan((0.5 - p) * math.pi))
    t = float(np.mean(terms))
    if t > 1e15:
        return float(min(1.0, 1.0 / (t * math.pi)))
    return float(min(1.0, max(0.5 - math.atan(t) / math.pi, 1e-300)))
