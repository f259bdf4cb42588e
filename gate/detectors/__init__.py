"""Detector registry. To add one: a new module with a :class:`Detector` and one line here."""

from __future__ import annotations

from gate.detectors.base import Detector
from gate.detectors.iforest import IsolationForestDetector
from gate.detectors.lof import LOFDetector
from gate.detectors.ocsvm import OneClassSVMDetector
from gate.errors import UsageError

DETECTORS: dict[str, type[Detector]] = {
    LOFDetector.name: LOFDetector,
    IsolationForestDetector.name: IsolationForestDetector,
    OneClassSVMDetector.name: OneClassSVMDetector,
}

DEFAULT_DETECTORS: tuple[str, ...] = tuple(DETECTORS)


def make_detector(name: str, seed: int = 0) -> Detector:
    try:
        return DETECTORS[name](seed=seed)  # type: ignore[call-arg]
    except KeyError:
        raise UsageError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}") from None


__all__ = ["DEFAULT_DETECTORS", "DETECTORS", "Detector", "make_detector"]
