"""The calibrated ensemble: standardise, score with every detector, combine p-values."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from gate.detectors import make_detector
from gate.detectors.base import Detector, Matrix, State
from gate.detectors.calibration import cauchy_combine, conformal_p_value, p_value


@dataclass(frozen=True)
class DetectorScore:
    name: str
    score: float
    p_value: float
    p_conformal: float


@dataclass(frozen=True)
class EnsembleVerdict:
    detectors: tuple[DetectorScore, ...]
    p_value: float
    anomaly_score: float
    nearest_reference: int
    nearest_distance: float
    # Mean squared z-score per row of ``shape`` (one row per probe).
    row_deviation: Matrix


class CalibratedEnsemble:
    """LOF / IsolationForest / OneClassSVM on standardised fingerprints, with conformal p-values.

    ``blocks`` gives the (rows, cols) shape of each representation block in a fingerprint;
    each block is down-weighted by the square root of its size so that a large block (a
    Gram matrix) does not drown a small one (logits).
    """

    def __init__(self, detectors: Sequence[str], blocks: Sequence[tuple[int, int]], seed: int = 0):
        self.detectors = tuple(detectors)
        self.blocks = tuple(blocks)
        self.seed = seed

    def fit(
        self, X: npt.NDArray[Any], calibration: Mapping[str, Sequence[float]] | None = None
    ) -> Self:
        Z = self._set_references(X)
        self.models_: dict[str, Detector] = {
            name: make_detector(name, self.seed).fit(Z) for name in self.detectors
        }
        if calibration is None:
            calibration = self.leave_one_out(np.asarray(X, dtype=np.float64))
        self._set_calibration(calibration)
        return self

    def state(self) -> State:
        """Every detector's learned arrays, keyed ``<detector>.<array>`` (see :meth:`restore`)."""
        return {
            f"{name}.{key}": arr
            for name, model in self.models_.items()
            for key, arr in model.state().items()
        }

    def restore(
        self,
        X: npt.NDArray[Any],
        calibration: Mapping[str, Sequence[float]],
        state: Mapping[str, npt.NDArray[Any]],
    ) -> Self:
        """The ensemble :meth:`fit` gave on ``X``, from its :meth:`state`: no refitting, and
        no scikit-learn import, which is most of a small scan's cost."""
        Z = self._set_references(X)
        self.models_ = {}
        for name in self.detectors:
            prefix = f"{name}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self.models_[name] = make_detector(name, self.seed).restore(Z, own)
        self._set_calibration(calibration)
        return self

    def _set_references(self, X: npt.NDArray[Any]) -> Matrix:
        X = np.asarray(X, dtype=np.float64)
        self.mean_, self.scale_ = self._standardiser(X)
        self.reference_z_ = (X - self.mean_) / self.scale_
        return self.reference_z_

    def _set_calibration(self, calibration: Mapping[str, Sequence[float]]) -> None:
        self.calibration_ = {name: [float(s) for s in calibration[name]] for name in self.detectors}

    def leave_one_out(self, X: Matrix) -> dict[str, list[float]]:
        """Score each reference with detectors fit on the others (cross-fitted scores)."""
        scores: dict[str, list[float]] = {name: [] for name in self.detectors}
        for i in range(len(X)):
            rest = np.delete(X, i, axis=0)
            mean, scale = self._standardiser(rest)
            z_rest = (rest - mean) / scale
            z_i = (X[i : i + 1] - mean) / scale
            for name in self.detectors:
                det = make_detector(name, self.seed).fit(z_rest)
                scores[name].append(float(det.score(z_i)[0]))
        return scores

    def evaluate(self, x: npt.NDArray[Any]) -> EnsembleVerdict:
        z = (np.asarray(x, dtype=np.float64).reshape(1, -1) - self.mean_) / self.scale_
        results = []
        for name, model in self.models_.items():
            s = float(model.score(z)[0])
            cal = self.calibration_[name]
            results.append(
                DetectorScore(name, s, p_value(s, cal, smooth=True), conformal_p_value(s, cal))
            )
        combined = cauchy_combine([r.p_value for r in results])
        dists = np.linalg.norm(self.reference_z_ - z, axis=1)
        return EnsembleVerdict(
            detectors=tuple(results),
            p_value=combined,
            anomaly_score=float(1.0 - combined),
            nearest_reference=int(np.argmin(dists)),
            nearest_distance=float(dists.min()),
            row_deviation=self._row_deviation(z[0]),
        )

    def _standardiser(self, X: Matrix) -> tuple[Matrix, Matrix]:
        mean = X.mean(axis=0)
        std = X.std(axis=0)
        # Features constant across references get the median spread, not infinite weight.
        floor = float(np.median(std[std > 0])) if np.any(std > 0) else 1.0
        std = np.maximum(std, floor * 0.1)
        weights = np.concatenate([np.full(r * c, np.sqrt(r * c)) for r, c in self.blocks])
        return mean, std * weights

    def _row_deviation(self, z: Matrix) -> Matrix:
        rows = self.blocks[0][0]
        dev = np.zeros(rows)
        start = 0
        for r, c in self.blocks:
            block = z[start : start + r * c].reshape(r, c) * np.sqrt(r * c)
            dev += np.mean(block**2, axis=1)
            start += r * c
        return dev / len(self.blocks)
