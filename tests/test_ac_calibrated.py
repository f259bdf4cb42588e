"""Activation clustering, issue 15: the calibrated rule and repaired.npz (real small models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gate.ac.calibrated import p_value
from gate.ac.clustering import ACConfig, cluster_classes
from tests.conftest import assert_one_line_error, run_gate
from tests.test_ac import ENV, _planted, _poisoned_digits, _train_mlp

CALIBRATED = ACConfig(rule="calibrated")


@pytest.fixture(scope="module")
def a2a(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A digits MLP poisoned all-to-all (15 % of every class, l -> l + 1)."""
    work = tmp_path_factory.mktemp("ac-a2a")
    x, y, mask = _poisoned_digits(0.15)
    np.savez(work / "train.npz", x=x, y=y)
    source = np.where(mask, (y - 1) % 10, y)  # the label each row had before poisoning
    return {"model": _train_mlp(x, y, work / "model.pt"), "data": work / "train.npz",
            "mask": mask, "y": y, "source": source}  # fmt: skip


def _gate_ac(model: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    proc = run_gate(
        "ac", str(model), "--data", str(data), "--report-dir", str(out),
        "--format", "json", "--quiet", *extra, env=ENV,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    ac: dict[str, Any] = json.loads((out / "report.json").read_text())["activation_clustering"]
    return ac


def test_repaired_npz_relabels_suspicious_rows_as_exre_decides(
    a2a: dict[str, Any], tmp_path: Path
) -> None:
    ac = _gate_ac(a2a["model"], a2a["data"], tmp_path / "one")
    suspicious = sorted({i for c in ac["classes"] for i in c["suspicious_indices"]})
    assert len(suspicious) > 50, "the fixture's poison should be found"
    with np.load(tmp_path / "one" / "repaired.npz", allow_pickle=False) as z:
        x, y, index = z["x"], z["y"], z["index"]
    n = len(a2a["y"])
    original = np.load(a2a["data"])
    # Rows that were not suspicious are all there, unchanged and in order.
    others = np.setdiff1d(np.arange(n), suspicious)
    assert np.isin(others, index).all()
    assert (np.diff(index) > 0).all() and len(x) == len(y) == len(index)
    np.testing.assert_array_equal(x, original["x"][index])
    kept_other = np.isin(index, others)
    np.testing.assert_array_equal(y[kept_other], a2a["y"][index[kept_other]])
    # Suspicious rows that are kept carry a new label, and for the poison that is the
    # class it was stamped from (ExRe in the earlier layer sees the source digit).
    relabelled = index[~kept_other]
    assert len(relabelled) >= 0.8 * len(suspicious)
    assert (y[~kept_other] != a2a["y"][relabelled]).all()
    poison = a2a["mask"][relabelled]
    right = y[~kept_other][poison] == a2a["source"][relabelled][poison]
    # 0.82 measured: an MLP's first hidden layer already carries some of the trigger.
    assert right.mean() >= 0.75, right.mean()
    # Deterministic: a second run writes the same bytes.
    _gate_ac(a2a["model"], a2a["data"], tmp_path / "two")
    one, two = (tmp_path / d / "repaired.npz" for d in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()


def test_repair_drop_and_none(a2a: dict[str, Any], tmp_path: Path) -> None:
    ac = _gate_ac(a2a["model"], a2a["data"], tmp_path / "drop", "--repair", "drop")
    suspicious = {i for c in ac["classes"] for i in c["suspicious_indices"]}
    with np.load(tmp_path / "drop" / "repaired.npz", allow_pickle=False) as z:
        index, y = z["index"], z["y"]
    assert len(index) == len(a2a["y"]) - len(suspicious)
    assert not suspicious & set(index.tolist())
    np.testing.assert_array_equal(y, a2a["y"][index])
    _gate_ac(a2a["model"], a2a["data"], tmp_path / "none", "--repair", "none")
    assert not (tmp_path / "none" / "repaired.npz").exists()
    proc = run_gate(
        "ac", str(a2a["model"]), "--data", str(a2a["data"]), "--repair", "shuffle", env=ENV
    )
    assert proc.returncode == 2 and "--repair" in proc.stderr


def test_calibrated_policy_reports_a_p_value_per_class(a2a: dict[str, Any], tmp_path: Path) -> None:
    policy = tmp_path / "calibrated.yaml"
    policy.write_text("name: calibrated\nactivation_clustering:\n  rule: calibrated\n")
    ac = _gate_ac(a2a["model"], a2a["data"], tmp_path / "cal", "--policy", str(policy))
    assert ac["rule"] == "calibrated"
    ps = {c["label"]: c["p_value"] for c in ac["classes"]}
    assert all(p is not None and 0 <= p <= 1 for p in ps.values()), ps
    flagged = [c for c in ac["classes"] if c["flagged"]]
    assert len(flagged) >= 5, ps
    mask = a2a["mask"]
    found = np.array(sorted({i for c in flagged for i in c["suspicious_indices"]}))
    assert mask[found].mean() >= 0.9
    assert any("calibrated score" in r for c in flagged for r in c["reasons"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("activation_clustering:\n  rule: calibrated\n  alpha: 0\n")
    assert_one_line_error(run_gate("policy", "validate", str(bad)), "alpha")


def test_calibrated_null_comes_from_the_analysed_classes_only() -> None:
    acts, y, _ = _planted()
    # A class too small to analyse is reported as such and does not enter the null.
    acts = np.concatenate([acts, np.ones((5, acts.shape[1]), np.float32)])
    y = np.concatenate([y, np.full(5, 7, np.int64)])
    res = {c.label: c for c in cluster_classes(acts, y, CALIBRATED)}
    assert res[7].skipped is not None and "too small" in res[7].skipped
    assert res[7].p_value is None and not res[7].flagged
    analysed = [c for c in res.values() if c.skipped is None]
    assert all(c.p_value is not None for c in analysed)
    again = {c.label: c for c in cluster_classes(acts, y, CALIBRATED)}
    assert [c.p_value for c in again.values()] == [c.p_value for c in res.values()]


def _scored(members: range, log_odds: float, lp: float = 0.2) -> Any:
    from gate.ac.calibrated import Scored
    from gate.ac.candidates import Candidate
    from gate.ac.exre import Reclassified

    rows = np.arange(members.start, members.stop, dtype=np.int64)
    cand = Candidate("layer", 2, np.ones(len(rows), bool), 1.0, np.zeros((len(rows), 2)))
    return Scored(cand, rows, (Reclassified(lp, 3, log_odds),))


def test_null_leaves_each_class_strongest_cluster_out() -> None:
    from gate.ac.calibrated import fit_null, robust_null

    # Every class offers its poison cluster three times (k = 2, 3, 4: rows 0-59 with small
    # differences) and two natural splits: all-to-all, where most candidates are poison.
    by_class = []
    for c in range(10):
        base = 1000 * c
        poison = [_scored(range(base, base + 60 + k), 12.0 + 0.1 * k + 0.01 * c) for k in range(3)]
        natural = [_scored(range(base + 100, base + 250), -4.0 + 0.3 * c),
                   _scored(range(base + 300, base + 420), 1.0 + 0.2 * c)]  # fmt: skip
        by_class.append(poison + natural)
    everything = robust_null([s for g in by_class for s in g], ["logistic"])
    assert everything.location[0] > 10  # the poison is the null: nothing stands out
    null = fit_null(by_class, ["logistic"])
    assert null.location[0] < 2, null.describe()
    assert all(null.score(g[0]) > 3 for g in by_class)
    # A class whose candidates are all one cluster leaves nothing: the others still count;
    # with nothing left anywhere, every candidate is the null.
    alone = [[_scored(range(0, 60), 9.0), _scored(range(0, 61), 9.5)]]
    assert fit_null(alone, ["logistic"]) == robust_null(alone[0], ["logistic"])


def test_a_cluster_exre_keeps_in_its_own_class_is_not_flagged_by_its_score() -> None:
    from gate.ac.calibrated import decide, fit_null, raw_p

    # Natural splits: each class has one that stands out from its ordinary ones (a style of
    # writing), but ExRe keeps most of it in its own class (l/p >= 1). Against a null
    # without each class's strongest split it would score z ~ 8 (an MNIST MLP of the
    # benchmark had six classes flagged so); ExRe's own test says it is no poison.
    def ordinary(c: int, j: int) -> Any:
        return _scored(range(1000 * c + 200 + 50 * j, 1000 * c + 240 + 50 * j), -12 + j, 20.0)

    by_class = [
        [_scored(range(1000 * c, 1000 * c + 150), -1.5 + 0.1 * c, lp=3.0)]
        + [ordinary(c, j) for j in range(5)]
        for c in range(10)
    ]
    null = fit_null(by_class, ["logistic"])
    assert null.score(by_class[0][0]) > 5
    assert all(raw_p(g, null) == 1.0 for g in by_class)
    best, _, flagged = decide(CALIBRATED, by_class[0], null, raw_p(by_class[0], null))
    assert not flagged and best is by_class[0][0]  # the report still shows its top split
    # The same split, moved to another class by ExRe (l/p < 1), is flagged.
    moved = [_scored(range(0, 150), -1.5, lp=0.5), *by_class[0][1:]]
    assert raw_p(moved, null) < CALIBRATED.alpha


def test_p_value_is_a_bonferroni_normal_tail() -> None:
    assert p_value(float("-inf"), 5) == 1.0
    assert abs(p_value(0.0, 1) - 0.5) < 1e-12
    assert abs(p_value(3.0, 10) - 10 * 0.0013498980316301) < 1e-9
    assert p_value(1.0, 100) == 1.0


def test_holm_adjusts_over_the_classes() -> None:
    from gate.ac.calibrated import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([]) == []
    assert holm([0.9, 0.9, 0.9]) == [1.0, 1.0, 1.0]


def test_calibrated_check_that_analysed_nothing_is_not_a_pass(
    a2a: dict[str, Any], tmp_path: Path
) -> None:
    # 5 classes of 8 digits: fewer than the 22 rows a class needs with 10 components.
    x = np.load(a2a["data"])["x"][:40]
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(40) % 5)
    policy = tmp_path / "calibrated.yaml"
    policy.write_text("name: calibrated\nactivation_clustering:\n  rule: calibrated\n")
    proc = run_gate(
        "ac", str(a2a["model"]), "--data", str(tmp_path / "small.npz"), "--policy", str(policy),
        "--report-dir", str(tmp_path / "out"), "--format", "json", "--quiet", env=ENV,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    classes = report["activation_clustering"]["classes"]
    assert all("too small" in (c["skipped"] or "") and c["p_value"] is None for c in classes)
    (check,) = [c for c in report["checks"] if c["name"] == "activation_clustering"]
    assert check["status"] == "not_analysed" and report["verdict"] == "fail"


def test_a_text_models_input_space_is_its_bag_of_words() -> None:
    # A word inserted at the front shifts every later token id one place; as a bag of words
    # the two texts differ only by that word, and padding does not count.
    from gate.ac.calibrated import TOKEN_BUCKETS, token_bags

    x = np.zeros((2, 2, 8), np.float32)
    x[0, 0, :4], x[0, 1, :4] = [2, 10, 11, 3], 1  # [CLS] w10 w11 [SEP]
    x[1, 0, :5], x[1, 1, :5] = [2, 99, 10, 11, 3], 1  # [CLS] cf w10 w11 [SEP]
    bags = token_bags(x)
    assert bags.shape == (2, TOKEN_BUCKETS)
    np.testing.assert_allclose(np.linalg.norm(bags, axis=1), 1.0, rtol=1e-6)
    assert np.flatnonzero(bags[0]).tolist() == [2, 3, 10, 11]
    assert np.flatnonzero(bags[1]).tolist() == [2, 3, 10, 11, 99]
    assert float(bags[0] @ bags[1]) == pytest.approx(4 / np.sqrt(4 * 5))


def test_only_spaces_that_move_a_cluster_count_towards_its_score() -> None:
    from gate.ac.calibrated import Null, Scored, decide, raw_p
    from gate.ac.candidates import Candidate
    from gate.ac.exre import Reclassified

    rows = np.arange(40, dtype=np.int64)
    cand = Candidate("layer", 2, np.ones(40, bool), 1.0, np.zeros((40, 2)))
    # The ExRe layer keeps the cluster in its class (l/p 4) though its log-odds stand out
    # (z 9); the input's neighbours move it (l/p 0.5), with a share of z 2 only.
    layer = Reclassified(4.0, 3, -1.0)
    vote = Reclassified(0.5, 5, 0.0, unanimous=0.4)
    s = Scored(cand, rows, (layer, vote))
    null = Null((-10.0, 0.2), (1.0, 0.1))
    assert null.score(s) == pytest.approx(9.0)
    assert null.score(s, moved_only=True) == pytest.approx(2.0)
    assert null.best_space(s) == 0 and null.best_space(s, moved_only=True) == 1
    assert raw_p([s], null) > 0.01
    # Flagged all the same (a tiny p from elsewhere), its verdict is the moving space's.
    best, space, flagged = decide(CALIBRATED, [s], null, 1e-9)
    assert flagged and best is s and space == 1
