"""gate.ac.numeric against scikit-learn, whose results the AC thresholds were measured with."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score, silhouette_score
from sklearn.preprocessing import StandardScaler

from gate.ac import numeric


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def _wide_tall(rows: int, cols: int) -> np.ndarray:
    """Random rows with a planted low-rank structure (a clear top-10 subspace)."""
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(10, cols))
    scores = rng.normal(size=(rows, 10)) * np.linspace(6, 2, 10)
    return (scores @ basis + rng.normal(size=(rows, cols))).astype(np.float32)


# (rows, columns) picking each of scikit-learn's PCA solvers: full, randomized (wide),
# randomized (tall) and covariance_eigh.
@pytest.mark.parametrize("shape", [(180, 64), (180, 512), (1500, 512), (4000, 128)])
def test_pca_matches_sklearn(shape: tuple[int, int]) -> None:
    x = _wide_tall(*shape)
    ours = numeric.fit_pca(x, 10, seed=0)
    theirs = PCA(10, random_state=0).fit(x)
    scale = float(np.abs(theirs.transform(x)).max())
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), atol=1e-4 * scale)
    np.testing.assert_allclose(ours.explained_variance, theirs.explained_variance_, rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_kmeans_matches_sklearn(k: int) -> None:
    x, y = _digits()
    for label in (1, 8):
        z = PCA(10, random_state=0).fit_transform(x[y == label]).astype(np.float64)
        centres, labels = numeric.kmeans_fit(z, k, seed=0, n_init=4)
        theirs = KMeans(k, n_init=4, random_state=0).fit(z)
        assert adjusted_rand_score(labels, theirs.labels_) == 1.0
        np.testing.assert_array_equal(numeric.kmeans_predict(z, centres), labels)


def test_kmeans_is_deterministic_and_seeded() -> None:
    z = _wide_tall(600, 10).astype(np.float64)
    a = numeric.kmeans_fit(z, 3, seed=5, n_init=4)[1]
    b = numeric.kmeans_fit(z, 3, seed=5, n_init=4)[1]
    np.testing.assert_array_equal(a, b)


def test_kmeans_with_more_clusters_than_distinct_points(recwarn: pytest.WarningsRecorder) -> None:
    # Two distinct points, three clusters: Lloyd's update leaves a cluster empty and has to
    # refill it; the result is still a partition, the one scikit-learn finds.
    z = np.repeat(np.array([[0.0, 0.0], [10.0, 10.0]]), 50, axis=0)
    centres, labels = numeric.kmeans_fit(z, 3, seed=0, n_init=2)
    theirs = KMeans(3, n_init=2, random_state=0).fit(z).labels_
    assert adjusted_rand_score(labels, theirs) == 1.0
    assert np.isfinite(centres).all()


def test_silhouette_matches_sklearn() -> None:
    x, y = _digits()
    z = PCA(10, random_state=0).fit_transform(x).astype(np.float64)
    for sample in (len(z), 500):
        ours = numeric.silhouette(z, y, sample, seed=2)
        theirs = silhouette_score(z, y, sample_size=sample, random_state=2)
        assert ours == pytest.approx(theirs, abs=1e-9)


def test_logistic_regression_matches_sklearn() -> None:
    x, y = _digits()
    train, test = x[::2], x[1::2]
    classes, proba = numeric.logistic_proba(train, y[::2], test)
    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(max_iter=300, C=1.0).fit(scaler.transform(train), y[::2])
    theirs = clf.predict_proba(scaler.transform(test))
    np.testing.assert_array_equal(classes, clf.classes_)
    # Log-probabilities, what the ExRe log-odds thresholds are measured in.
    np.testing.assert_allclose(np.log(proba + 1e-12), np.log(theirs + 1e-12), atol=0.02)


def test_prefetch_solver_imports_the_optimizer_in_the_background() -> None:
    # In a fresh interpreter: here scipy.optimize is likely imported already.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gate.ac.numeric import prefetch_solver\n"
        "assert 'scipy.optimize' not in sys.modules\n"
        "t = prefetch_solver()\n"
        "assert t.daemon\n"
        "t.join(60)\n"
        "assert 'scipy.optimize' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
