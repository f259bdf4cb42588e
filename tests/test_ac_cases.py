"""Activation clustering, issue 15: the benchmark's cases in process (real small models).

Apart from tests/test_ac_calibrated.py so that the two files, each several minutes of
training, run on different xdist workers (``--dist loadfile``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gate.ac.clustering import ACConfig, cluster_classes

CALIBRATED = ACConfig(rule="calibrated")

# Issue 15's cases, in process: the benchmark's own attacks and training recipe
# (bench/ac_cases.py) on the 8x8 digits, activations taken in the test.


def _bench_cases() -> Any:
    import importlib.util
    import sys

    if "_ac_cases" in sys.modules:
        return sys.modules["_ac_cases"]
    path = Path(__file__).resolve().parents[1] / "bench" / "ac_cases.py"
    spec = importlib.util.spec_from_file_location("_ac_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["_ac_cases"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _case_layers(**case: Any) -> tuple[dict[str, Any], np.ndarray]:
    import torch

    ac = _bench_cases()
    c = ac.Case("digits", **case)
    torch.set_num_threads(1)
    x, y, mask = ac.poisoned(c)
    net = ac.train(x, y, c.dataset, c.arch, c.seed)
    _, asr = ac.attack_success(net, c)
    d = ac.layers(net, x, c.arch)
    d["y"], d["asr"] = y, asr
    return d, mask


def _f1(res: list[Any], mask: np.ndarray) -> float:
    found = np.zeros(len(mask), dtype=bool)
    for c in res:
        found[list(c.suspicious_indices)] = True
    tp = int((found & mask).sum())
    return 2 * tp / max(2 * tp + int((found & ~mask).sum()) + int((~found & mask).sum()), 1)


def _calibrated(d: dict[str, Any]) -> list[Any]:
    return cluster_classes(d["hidden"], d["y"], CALIBRATED, exre_x=d["exre"], input_x=d["input"])


def _one_target_flagged(arch: str) -> tuple[Any, np.ndarray]:
    """45 sevens blended with a noise pattern and labelled 1 (~a third of class 1): only
    class 1 is flagged, at F1 >= 0.95, with source 7; (class 1's result, the poison mask)."""
    d, mask = _case_layers(arch=arch, attack="blend-1to1", n_poison=45, source=7, target=1)
    assert d["asr"] >= 0.8
    res = _calibrated(d)
    assert [c.label for c in res if c.flagged] == [1]
    assert _f1(res, mask) >= 0.95
    (one,) = [c for c in res if c.label == 1]
    assert one.suspected_source == 7
    return one, mask


def test_one_target_poisoning_from_one_source_class_is_flagged() -> None:
    one, mask = _one_target_flagged("cnn")
    assert one.p_value is not None
    # The relabels repair would apply send the poison back to its source class.
    relabels = dict(one.relabels)
    assert np.mean([relabels[i] == 7 for i in np.flatnonzero(mask)]) >= 0.9


def test_half_of_the_class_poisoned_all_to_one_is_flagged() -> None:
    # BadNets patch, 10 % of every class -> 0: class 0 ends up about half poison.
    d, mask = _case_layers(arch="cnn", attack="badnets-a2o", rate=0.10)
    share = mask[d["y"] == 0].mean()
    assert 0.35 < share < 0.6 and d["asr"] >= 0.8
    res = _calibrated(d)
    assert [c.label for c in res if c.flagged] == [0]
    assert _f1(res, mask) >= 0.95


def _source_labels(c: Any) -> np.ndarray:
    """The labels the case's training rows had before poisoning."""
    return _bench_cases().load(c.dataset, "train")[1]


def test_mlp_one_target_poisoning_is_flagged_through_the_input() -> None:
    # An MLP's first hidden layer already maps the blended sevens into class 1 (the ExRe
    # layer's log-odds are about -10), so only the input can show they are sevens.
    one, mask = _one_target_flagged("mlp")
    assert any("input neighbours put" in r for r in one.reasons), one.reasons
    relabels = dict(one.relabels)
    assert np.mean([relabels.get(i) == 7 for i in np.flatnonzero(mask)]) >= 0.9


def test_mlp_half_of_the_class_poisoned_all_to_one_is_flagged_and_sent_home() -> None:
    ac = _bench_cases()
    case = ac.Case("digits", "mlp", "badnets-a2o", rate=0.10)
    d, mask = _case_layers(arch="mlp", attack="badnets-a2o", rate=0.10)
    assert 0.35 < mask[d["y"] == 0].mean() < 0.6 and d["asr"] >= 0.8
    res = _calibrated(d)
    assert [c.label for c in res if c.flagged] == [0]
    assert _f1(res, mask) >= 0.95
    # Poison from nine source classes: each row goes back to its own digit, not one source.
    (zero,) = [c for c in res if c.label == 0]
    relabels, before = dict(zero.relabels), _source_labels(case)
    poison = np.flatnonzero(mask)
    assert np.mean([relabels.get(i) == before[i] for i in poison]) >= 0.9


def test_mlp_all_to_all_poisoning_is_flagged_in_every_class() -> None:
    # Every class holds its own poison cluster (inverted corner pixels, l -> l + 1), found
    # by k = 2, 3 and 4 alike. Judged on their own k-means candidates, 7 classes are flagged
    # (F1 0.83); the other three are found along the trigger the seven teach (the input's
    # direction from their moved rows to the classes ExRe put them in).
    from dataclasses import replace

    from gate.ac import transfer

    d, mask = _case_layers(arch="mlp", attack="invpix-a2a", rate=0.15)
    assert d["asr"] >= 0.8
    res = _calibrated(d)
    flagged = [c for c in res if c.flagged]
    assert len(flagged) == 10, [(c.label, c.p_value) for c in res]
    assert _f1(res, mask) >= 0.95
    found = np.array(sorted({i for c in flagged for i in c.suspicious_indices}))
    assert mask[found].mean() >= 0.95
    taught = [c for c in flagged if c.found_in == transfer.WHERE]
    assert taught, "every class was flagged on its own candidates: the pass was not tested"
    y = d["y"]
    for c in taught:
        assert c.p_value is not None and c.p_value < CALIBRATED.transfer_alpha
        assert any("transfer_alpha" in r and "classes offered" in r for r in c.reasons), c.reasons
        # The poison of class l came from l - 1. Repair must take every poison row out of
        # class l (that unlearns the trigger), and ExRe sends most of them back to l - 1;
        # the rest go to other digits (12 to 18 of about 20 go home here).
        relabels = dict(c.relabels)
        poison = np.flatnonzero(mask & (y == c.label))
        dest = [relabels.get(i) for i in poison]
        assert all(t is not None and t != c.label for t in dest), dest
        assert Counter(dest).most_common(1)[0][0] == (c.label - 1) % 10, dest
    # Without the pass (a level nothing reaches) those classes stay unflagged.
    off = replace(CALIBRATED, transfer_alpha=1e-300)
    alone = cluster_classes(d["hidden"], y, off, exre_x=d["exre"], input_x=d["input"])
    assert {c.label for c in alone if c.flagged} == {c.label for c in flagged} - {
        c.label for c in taught
    }


def test_input_vote_is_not_swung_by_poison_left_in_its_training_rows() -> None:
    # Class 0 holds 60 "ones" with a trigger; a candidate that misses 3 of them leaves those
    # in the ExRe training rows. A logistic fit learns the trigger from them and puts the
    # rest back into class 0; the neighbour vote still says they are ones.
    from gate.ac.exre import Evidence, ExreTraining

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (3, 8))
    x = np.concatenate([rng.normal(centres[c], 1.0, (200, 8)) for c in range(3)])
    x = np.concatenate([x, np.zeros((600, 1))], axis=1)  # a dimension clean rows never use
    y = np.repeat(np.arange(3), 200)
    poison = np.arange(200, 260)  # ones, stamped and labelled 0
    x[poison, 8] = 1.0  # the trigger: small next to how far apart the classes are
    y[poison] = 0
    x = x.astype(np.float32)
    missed = poison[:3]
    members = np.setdiff1d(poison, missed)
    logistic = Evidence(ExreTraining(x, y, 0, "logistic"), 0, None).full(members)
    knn = Evidence(ExreTraining(x, y, 0, "knn"), 0, None).full(members)
    assert knn.predicted is not None and (knn.predicted == 1).mean() >= 0.9
    assert knn.unanimous is not None and knn.unanimous >= 0.5
    assert logistic.predicted is not None and (logistic.predicted == 1).mean() < 0.5
    everything = Evidence(ExreTraining(x, y, 0, "logistic"), 0, None).full(poison)
    assert everything.predicted is not None and (everything.predicted == 1).mean() >= 0.9


def test_clean_twin_sub_populations_are_not_flagged() -> None:
    # The demo recipe's clean digit CNN (80 % subset): its '1's written with a foot and other
    # handwriting styles form k-means clusters of their own; neither rule may flag them.
    import torch

    from gate.demo import zoo

    ac = _bench_cases()
    torch.set_num_threads(1)
    spec = zoo.ZooSpec(seed=0)
    net = zoo.train(spec)
    x, y, _ = zoo.training_set(spec)
    d = ac.layers(net, x, "cnn")
    for cfg in (ACConfig(), CALIBRATED):
        res = cluster_classes(d["hidden"], y, cfg, exre_x=d["exre"], input_x=d["input"])
        assert [c.label for c in res if c.flagged] == [], cfg.rule
        assert all(c.skipped is None for c in res)
    ps = [c.p_value for c in res]  # the calibrated rule's
    assert all(p is not None and p >= CALIBRATED.alpha for p in ps), ps
