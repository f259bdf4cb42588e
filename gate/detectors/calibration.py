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
    from scipy import stats

    cal = np.asarray(calibration, dtype=np.float64)
    n = len(cal)
    top = float(cal.max())
    if score <= top:
        return conformal_p_value(score, _as_list(cal))
    sd = float(cal.std(ddof=1)) if n > 1 else 0.0
    scale = max(sd * math.sqrt(1 + 1 / n), 1e-12, abs(top) * 1e-9)
    mean = float(cal.mean())
    df = max(n - 1, 1)
    ratio = stats.t.sf((score - mean) / scale, df) / max(
        stats.t.sf((top - mean) / scale, df), 1e-300
    )
    return float(min(1.0, max(ratio / (n + 1), 1e-300)))


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
