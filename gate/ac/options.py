"""How `gate ac` extracts, segments and judges activations (beyond the policy's thresholds)."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from gate.ac.clustering import Detector, ExreHook, Reduction
from gate.errors import UsageError

SegmentBy = str  # "label" or "predicted"
MAX_DEFAULT_THREADS = 4


@dataclass(frozen=True)
class ClassSelection:
    """Which classes one `gate ac --classes` job clusters: listed labels, or shard I of N
    (every N-th of the sorted labels present, so large and small classes spread evenly)."""

    spec: str
    labels: tuple[int, ...] = ()
    shard: tuple[int, int] | None = None

    def pick(self, present: list[int]) -> list[int]:
        if self.shard is not None:
            index, count = self.shard
            return present[index - 1 :: count]
        missing = [c for c in self.labels if c not in present]
        if missing:
            raise UsageError(
                f"--classes {self.spec}: no samples labelled {', '.join(map(str, missing))} "
                f"(labels present: {', '.join(map(str, present))})"
            )
        return sorted(self.labels)


def parse_class_selection(spec: str) -> ClassSelection:
    """``"0,3,7"`` (labels) or ``"2/4"`` (1-based shard of the labels present)."""
    text = spec.strip()
    try:
        if "/" in text:
            i, n = (int(part) for part in text.split("/"))
            if n < 1 or not 1 <= i <= n:
                raise ValueError
            return ClassSelection(text, shard=(i, n))
        labels = tuple(int(part) for part in text.split(","))
        if len(set(labels)) != len(labels):
            raise ValueError
        return ClassSelection(text, labels=labels)
    except ValueError:
        raise UsageError(
            f"--classes {spec!r}: expected labels like 0,3,7 or a shard I/N with 1 <= I <= N"
        ) from None


@dataclass(frozen=True)
class ACOptions:
    reduction: Reduction = "pca"
    segment_by: SegmentBy = "label"
    pool: bool = False
    detector: Detector = "ac"
    exre_threshold: float = 0.0  # 0 = report ExRe l/p, do not require it to flag
    exre_layer: str | None = None
    exre_hook: ExreHook | None = None
    threads: int | None = None  # OpenMP/BLAS threads for clustering (None: DEFAULT_THREADS)
    quiet: bool = True  # no extraction progress on stderr
    classes: ClassSelection | None = None  # None: every class
    # When given, receives a cluster picture (PNG bytes) per flagged class label.
    pictures: dict[int, bytes] | None = field(default=None, compare=False)
    # When given, receives row -> class for each suspicious row ExRe reclassified (repair).
    relabels: dict[int, int] | None = field(default=None, compare=False)


def clustering_threads(requested: int | None) -> int:
    """Threads for the per-class clustering: ``requested``, else half the CPUs (at most
    :data:`MAX_DEFAULT_THREADS`). sklearn's KMeans/FastICA otherwise start an OpenMP pool as
    wide as the machine, which on a loaded CI runner oversubscribes it badly."""
    if requested:
        return requested
    return max(1, min(MAX_DEFAULT_THREADS, (os.cpu_count() or 1) // 2))


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
