"""Activation clustering's settings: the thresholds, and why they are what they are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Reduction = Literal["ica", "pca"]
Detector = Literal["ac", "spectral", "either"]
Rule = Literal["exre", "separation", "calibrated"]
Classifier = Literal["logistic", "knn"]
# The rules that judge clusters with exclusionary reclassification (an ExRe layer and its
# classifier).
EXRE_RULES: frozenset[str] = frozenset({"exre", "calibrated"})
ExreHook = Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.int64], npt.NDArray[np.float32]], npt.ArrayLike
]

# Rows used to fit the reduction, k-means and the spectral direction per class (seeded
# subsample); every row is then transformed / assigned. A 10 % cluster of a 4,000-row
# sample still has ~400 rows, and fitting cost stays flat as classes grow (bench_scale.py).
FIT_SUBSAMPLE = 4000
# k-means restarts. bench_ac.py: the default rule's F1 is the same with 4 as with 10 (it
# tries k = 2-4 in two spaces anyway); the paper's single ICA 2-means split needs 10.
N_INIT = 4
SILHOUETTE_SAMPLE = 2000
CHUNK = 8192
EXRE_PER_CLASS = 300  # training rows per class for the fast ExRe classifier
# Rule "calibrated", ExRe in the input: neighbours voting (gate.ac.exre._knn_verdict).
KNN_NEIGHBOURS = 15
# Measured on load_digits (bench/README.md): clean classes split at 2.8-5.2, isolated poison
# at 5.5-15. One blob split in two gives ~2.65 in theory. Used by rule "separation" and for
# spectral signatures.
SEPARATION_THRESHOLD = 5.5
# Rule "exre": separation only has to rule out a cut through one blob (2.65); the ExRe
# evidence does the rest.
EXRE_SEPARATION_THRESHOLD = 3.0
# Rule "exre": median over a cluster of log p(best other class) - log p(l) under the held-out
# classifier. Measured on digit CNNs (bench/results/ac-margins.md): the k-means clusters of 16
# clean models at most 4.42 (a style of "1"), the pure poison cluster of each of 90 poisoned
# classes 10.5-26.
EXRE_LOG_ODDS = 7.0
# Rule "exre": a cluster this far from the rest of its class needs only half the ExRe
# log-odds. Measured (bench/README.md): of the k-means clusters of 16 clean digit CNNs, none
# had both separation > 6.6 and log-odds > 2.5 (max log-odds 4.4 at separation 5.6, max
# separation 8.4 at log-odds 1.6); a planted cluster in a 512-wide MLP had log-odds 4.96 at
# separation 9.15 (bench_scale.py), below EXRE_LOG_ODDS alone.
ISOLATED_SEPARATION = 7.0

# Rule "calibrated": see gate.ac.calibrated and bench/README.md for where it comes from.
CALIBRATED_ALPHA = 1e-6
TRANSFER_ALPHA = 0.01


@dataclass(frozen=True)
class ACConfig:
    n_components: int = 10
    reduction: Reduction = "pca"
    rule: Rule = "exre"
    # Rule "exre" looks at both sides of a split: all-to-one poisoning of 10 % of a 10-class
    # set makes the target class about half poison (the demo's BadNets model: 51 %).
    max_poison_fraction: float = 0.6
    silhouette_threshold: float = 0.15
    min_cluster_size: int = 5
    separation_threshold: float = EXRE_SEPARATION_THRESHOLD
    exre_log_odds: float = EXRE_LOG_ODDS
    isolated_separation: float = ISOLATED_SEPARATION
    spectral_threshold: float = SEPARATION_THRESHOLD
    exre_threshold: float = 0.0  # rule "separation": require l/p below this (0: report only)
    detector: Detector = "ac"
    use_silhouette: bool = False
    max_clusters: int = 4
    n_init: int = N_INIT
    search_exre_layer: bool = True  # rule "exre": also look for clusters in the ExRe layer
    # Rule "calibrated": flag a class whose best candidate has a p-value below this against
    # the model's own candidates (gate.ac.calibrated).
    alpha: float = CALIBRATED_ALPHA
    # Rule "calibrated", last pass (gate.ac.transfer): flag an unflagged class whose rows
    # along the flagged classes' trigger have a p-value below this. Looser than ``alpha``:
    # it runs only on a model that already has a flagged class, so it cannot fail a model
    # that would otherwise pass; it decides which rows are poison.
    transfer_alpha: float = TRANSFER_ALPHA
    # Rule "calibrated": how the spaces' z combine. "max" (Bonferroni over the spaces): an
    # MLP's poison can stand out in the input only (bench/README.md, issue 15).
    combine: Literal["mean", "max"] = "max"
    seed: int = 0


# The previous default (rule "separation"), kept for comparison and as a policy choice.
SEPARATION_RULE = ACConfig(
    rule="separation",
    max_poison_fraction=0.35,
    separation_threshold=SEPARATION_THRESHOLD,
    max_clusters=3,
    n_init=10,
)

