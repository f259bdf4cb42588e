"""Classes prepared while extraction runs (gate.ac.early) equal those prepared afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from gate.ac.clustering import ACConfig, ClassClustering, Split, cluster_classes, prepare_class
from gate.ac.early import EarlyPrepare


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [120, 7, 200, 90]  # class 1 is too small to cluster (skipped, not prepared)
    labels = np.repeat(np.arange(4), sizes).astype(np.int64)
    x = rng.normal(0, 1, (len(labels), 16)).astype(np.float32)
    x[np.flatnonzero(labels == 2)[:60]] += 4.0  # a sub-cluster: the split is not arbitrary
    return x, labels


def _same(a: ClassClustering | Split, b: ClassClustering | Split) -> None:
    assert type(a) is type(b)
    if isinstance(a, Split) and isinstance(b, Split):
        assert a.label == b.label and a.sil == b.sil
        for name in ("idx", "reduced", "assign"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), name
        assert a.spectral == b.spectral
    else:
        assert a == b


@pytest.mark.parametrize("batch", [1, 13, 64, 1000])
def test_batches_of_any_size_give_what_the_clustering_stage_computes(batch: int) -> None:
    x, labels = _data()
    cfg = ACConfig()
    with EarlyPrepare(labels, [0, 1, 2, 3], cfg) as early:
        for s in range(0, len(x), batch):
            early(s, x[s : s + batch].copy())
    ready = early.results()
    assert sorted(ready) == [0, 1, 2, 3]
    for c in range(4):
        _same(ready[c](), prepare_class(x, np.flatnonzero(labels == c), c, cfg))
    # ... and the whole stage's verdicts are the same with and without them.
    assert cluster_classes(x, labels, cfg, early=ready) == cluster_classes(x, labels, cfg)


def test_only_wanted_classes_complete_before_the_end_are_prepared() -> None:
    x, labels = _data()
    with EarlyPrepare(labels, [2, 3], ACConfig()) as early:
        early(0, x[:400].copy())  # class 3 (rows 327..416) is still incomplete
    assert sorted(early.results()) == [2]


def test_rows_out_of_label_order_are_refused() -> None:
    with pytest.raises(ValueError, match="label order"):
        EarlyPrepare(np.array([0, 1, 0], dtype=np.int64), [0, 1], ACConfig())
