"""How `gate ac` extracts, segments and judges activations (beyond the policy's thresholds)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from gate.ac.clustering import Detector, ExreHook, Reduction
from gate.errors import UsageError

SegmentBy = str  # "label" or "predicted"


@dataclass(frozen=True)
class ACOptions:
    reduction: Reduction = "pca"
    segment_by: SegmentBy = "label"
    pool: bool = False
    detector: Detector = "ac"
    exre_threshold: float = 0.0  # 0 = report ExRe l/p, do not require it to flag
    exre_layer: str | None = None
    exre_hook: ExreHook | None = None


def load_hook(spec: str) -> ExreHook:
    """Import ``package.module:function`` (a trusted import path given by the user)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"--exre-hook must be package.module:function, got {spec!r}")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"--exre-hook: cannot import {module!r} ({exc})") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise UsageError(f"--exre-hook: {module!r} has no function {name!r}")
    hook: ExreHook = fn
    return hook
