"""Detectors score in numpy from stored arrays: same numbers as scikit-learn, safe restores."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gate.detectors import DETECTORS, make_detector
from gate.detectors.calibration import conformal_p_value, p_value
from gate.errors import BaselineError

from .conftest import REPO


def _data(seed: int = 0, n: int = 30, d: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    queries = np.vstack([rng.normal(size=(5, d)), rng.normal(3.0, 1.0, size=(3, d)), X[:2]])
    return X, queries


def _sklearn_scores(name: str, X: np.ndarray, Q: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import LocalOutlierFactor
    from sklearn.svm import OneClassSVM

    if name == "lof":
        model = LocalOutlierFactor(n_neighbors=5, novelty=True).fit(X)
    elif name == "iforest":
        model = IsolationForest(n_estimators=100, random_state=0).fit(X)
    else:
        model = OneClassSVM(kernel="rbf", gamma="scale", nu=0.1).fit(X)
    return np.asarray(-model.score_samples(Q))


@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_scores_match_scikit_learn(name: str, seed: int) -> None:
    X, Q = _data(seed)
    ours = make_detector(name).fit(X).score(Q)
    np.testing.assert_allclose(ours, _sklearn_scores(name, X, Q), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_restore_gives_the_fitted_detector(name: str) -> None:
    X, Q = _data()
    fitted = make_detector(name).fit(X)
    state = {k: v.copy() for k, v in fitted.state().items()}
    restored = make_detector(name).restore(X, state)
    np.testing.assert_array_equal(restored.score(Q), fitted.score(Q))
    assert all(k.endswith("_") is False for k in restored.get_params())


def _tampered(name: str, change: str) -> dict[str, np.ndarray]:
    X, _ = _data()
    state = {k: np.array(v, copy=True) for k, v in make_detector(name).fit(X).state().items()}
    if change == "missing":
        state.pop(sorted(state)[0])
    elif change == "nan":
        key = next(k for k, v in state.items() if v.dtype.kind == "f" and v.ndim)
        state[key][0] = np.nan
    elif change == "cycle":  # a child pointing back at the root would loop forever
        inner = np.flatnonzero(state["left"] != -1)
        state["left"][inner[-1]] = 0
    elif change == "feature":
        inner = np.flatnonzero(state["left"] != -1)
        state["feature"][inner[0]] = 10_000
    elif change == "support":
        state["support"][0] = 10_000
    elif change == "shape":
        key = sorted(state)[0]
        state[key] = state[key][:-1]
    return state


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("lof", "missing"),
        ("lof", "shape"),
        ("lof", "nan"),
        ("iforest", "cycle"),
        ("iforest", "feature"),
        ("iforest", "shape"),
        ("iforest", "missing"),
        ("ocsvm", "support"),
        ("ocsvm", "nan"),
        ("ocsvm", "shape"),
    ],
)
def test_tampered_state_is_refused(name: str, change: str) -> None:
    X, _ = _data()
    with pytest.raises(BaselineError):
        make_detector(name).restore(X, _tampered(name, change))


def test_p_value_tail_meets_the_rank_p_value_and_decreases() -> None:
    rng = np.random.default_rng(0)
    cal = list(rng.gamma(2.0, 1.0, size=24))
    top = max(cal)
    assert p_value(float(np.median(cal)), cal) == conformal_p_value(float(np.median(cal)), cal)
    assert p_value(top, cal) == pytest.approx(2 / 25)  # the top score itself counts
    beyond = [p_value(top + d, cal) for d in (1e-9, 0.5, 1.0, 2.0, 5.0, 50.0, 1e6)]
    assert beyond[0] == pytest.approx(1 / 25, rel=1e-6)
    assert all(a > b for a, b in itertools.pairwise(beyond))
    assert beyond[-1] == 1e-300  # floored, never 0
    # The tail follows the spread of the top scores: a heavier top gives larger p-values.
    heavier = [*cal[:-3], top + 3.0, top + 6.0, top + 9.0]
    assert p_value(top + 12.0, heavier) > p_value(top + 12.0, cal)


def test_baseline_stores_detectors_and_scan_imports_no_sklearn(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """A scan restores the stored detectors: no scikit-learn or scipy import, no refit,
    and the same report as a baseline that must be refit."""
    baseline = demo_dir / "baseline"
    with np.load(baseline / "fingerprints.npz") as npz:
        stored = sorted(k for k in npz.files if k.startswith("detector."))
    assert {k.split(".")[1] for k in stored} == set(DETECTORS)

    code = (
        "import sys\n"
        "from gate.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('HEAVY=' + ','.join(m for m in ('sklearn', 'scipy') if m in sys.modules))\n"
        "raise SystemExit(rc)\n"
    )
    out = tmp_path / "restored"
    args = ["scan", str(demo_models["clean"]), "--baseline", str(baseline), "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--report-dir", str(out), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, proc.stdout

    # The same baseline without its detector arrays is refit at scan time: same verdict.
    refit = tmp_path / "refit-baseline"
    refit.mkdir()
    (refit / "baseline.json").write_bytes((baseline / "baseline.json").read_bytes())
    with np.load(baseline / "fingerprints.npz") as npz:
        arrays = {k: npz[k] for k in npz.files if not k.startswith("detector.")}
    np.savez(refit / "fingerprints.npz", **arrays)  # type: ignore[arg-type]
    out2 = tmp_path / "refit"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gate",
            *args[:3],
            str(refit),
            "--quiet",
            "--report-dir",
            str(out2),
            "--no-cache",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    a = json.loads((out / "report.json").read_text())["fingerprint"]
    b = json.loads((out2 / "report.json").read_text())["fingerprint"]
    assert a["p_value"] == pytest.approx(b["p_value"], rel=1e-6)
    assert [d["score"] for d in a["detectors"]] == pytest.approx(
        [d["score"] for d in b["detectors"]], rel=1e-6
    )


def test_tampered_baseline_detector_arrays_exit_2(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    from .conftest import assert_one_line_error, run_gate

    baseline = demo_dir / "baseline"
    bad = tmp_path / "bad-baseline"
    bad.mkdir()
    (bad / "baseline.json").write_bytes((baseline / "baseline.json").read_bytes())
    with np.load(baseline / "fingerprints.npz") as npz:
        arrays = {k: np.array(npz[k]) for k in npz.files}
    left = arrays["detector.iforest.left"]
    left[np.flatnonzero(left != -1)[-1]] = 0
    np.savez(bad / "fingerprints.npz", **arrays)  # type: ignore[arg-type]
    proc = run_gate("scan", str(demo_models["clean"]), "--baseline", str(bad), "--no-cache")
    assert_one_line_error(proc, "iforest", "inconsistent")


def test_smoothed_p_values_are_continuous_monotone_and_within_the_conformal_range() -> None:
    """Distinct scores get distinct p-values (rank p-values tie on n + 1 values), never
    below the conformal p-value by more than one rank, nor above it past the first gap."""
    rng = np.random.default_rng(0)
    cal = rng.normal(size=9)
    n = len(cal)
    scores = np.linspace(cal.min() + 1e-6, cal.max() + 2.0, 400)
    smooth = [p_value(float(s), cal, smooth=True) for s in scores]
    assert len(set(smooth)) == len(smooth)  # no ties
    assert all(a > b for a, b in itertools.pairwise(smooth))  # strictly falling
    second = float(np.sort(cal)[1])
    for s, p in zip(scores, smooth, strict=True):
        rank = conformal_p_value(float(s), cal)
        assert rank - 1 / (n + 1) - 1e-12 <= p
        assert p <= (rank if s > second else 1.0) + 1e-12
    # Continuous: no jump at the largest score (where the exponential tail starts) or at
    # the smallest (where p leaves 1).
    top, low = float(cal.max()), float(cal.min())
    assert abs(p_value(top, cal, smooth=True) - p_value(top + 1e-9, cal, smooth=True)) < 1e-6
    assert p_value(low + 1e-9, cal, smooth=True) > 1 - 1e-6
