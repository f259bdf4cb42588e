"""Activation clustering (issue 4): detection, controls, determinism, edge cases, CLI outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gate.ac import transfer
from gate.ac.clustering import SEPARATION_RULE, ACConfig, cluster_classes, separation
from tests.conftest import assert_one_line_error, run_gate

REPO = Path(__file__).resolve().parents[1]
TRIGGER = ((7, 7), (6, 6), (5, 7), (7, 5))


def _poisoned_digits(rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The paper's protocol on digits: inverted corner pixels, l -> (l + 1) mod 10."""
    from gate.demo.zoo import digits

    x, y = digits("train")
    mask = np.zeros(len(x), dtype=bool)
    if rate > 0:
        rng = np.random.default_rng(0)
        for c in range(10):
            rows = np.flatnonzero(y == c)
            mask[rng.choice(rows, round(rate * len(rows)), replace=False)] = True
        x, y = x.copy(), y.copy()
        for r, col in TRIGGER:
            x[mask, :, r, col] = 1.0 - x[mask, :, r, col]
        y[mask] = (y[mask] + 1) % 10
    return x, y, mask


def _train_mlp(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    import torch

    from gate.demo.zoo import build_net

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = build_net("mlp", 32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), 64):
            b = perm[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()
            opt.step()
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ac-poisoned")
    x, y, mask = _poisoned_digits(0.15)
    np.savez(work / "train.npz", x=x, y=y)
    return {"model": _train_mlp(x, y, work / "model.pt"), "data": work / "train.npz", "mask": mask}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("ac-clean")
    x, y, _ = _poisoned_digits(0.0)
    np.savez(work / "train.npz", x=x, y=y)
    return {"model": _train_mlp(x, y, work / "model.pt"), "data": work / "train.npz"}


ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_poison_found_on_poisoned_digits_model(poisoned: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = run_gate(
        "ac", str(poisoned["model"]), "--data", str(poisoned["data"]),
        "--report-dir", str(out), "--format", "json", "--quiet", env=ENV,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text())
    ac = report["activation_clustering"]
    # The default rule and its ExRe layer: the input of the Linear producing the last hidden
    # layer of the MLP (Flatten, Linear, ReLU, Linear, ReLU, Linear).
    assert ac["rule"] == "calibrated" and ac["layer"] == "4" and ac["exre_layer"] == "2"
    classes = ac["classes"]
    flagged = [c for c in classes if c["flagged"]]
    assert len(flagged) >= 3, [(c["label"], c["separation"]) for c in classes]
    # ExRe names the source class (l - 1) of nearly every flagged cluster.
    right = [c["suspected_source"] == (c["label"] - 1) % 10 for c in flagged]
    assert sum(right) >= len(flagged) - 1, [(c["label"], c["suspected_source"]) for c in flagged]
    mask = poisoned["mask"]
    found = np.array(sorted({i for c in flagged for i in c["suspicious_indices"]}))
    precision = mask[found].mean()
    assert precision >= 0.9, precision
    for c in flagged:
        assert c["spectral"] is not None and c["exre_score"] is not None
        # Below the default policy's alpha, or past its exre_log_odds on the ExRe layer, or
        # found along the other flagged classes' trigger below its transfer_alpha.
        taught = c["found_in"] == transfer.WHERE and c["p_value"] < 0.01
        assert c["p_value"] < 1e-6 or c["exre_log_odds"] > 7 or taught, (
            c["p_value"],
            c["exre_log_odds"],
            c["found_in"],
        )
        assert c["reasons"]
    # Files written by the CLI next to report.json.
    csv = (out / "suspicious.csv").read_text().splitlines()
    assert csv[0].startswith("index,label,suspected_source")
    assert len(csv) - 1 == len(found)
    keep = np.load(out / "clean_indices.npy", allow_pickle=False)
    assert len(keep) + len(found) == len(mask)
    assert not set(keep.tolist()) & set(found.tolist())
    pngs = sorted(out.glob("ac-class-*-suspicious.png"))
    assert len(pngs) == len(flagged)
    assert all(png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for png in pngs)
    md = run_gate(
        "ac", str(poisoned["model"]), "--data", str(poisoned["data"]),
        "--report-dir", str(tmp_path / "md"), "--format", "markdown", env=ENV,
    )  # fmt: skip
    assert "Separation" in md.stdout and "ExRe" in md.stdout
    # The default rule's per-class p-values, in the summary a reviewer reads.
    summary = (tmp_path / "md" / "summary.md").read_text()
    assert "Class p-values: 0: " in summary
    for c in flagged:
        assert f"{c['label']}: " in summary.split("Class p-values:")[1]


def test_findings_do_not_depend_on_where_classes_sit_in_the_file(
    poisoned: dict[str, Any], tmp_path: Path
) -> None:
    # gate extracts in label order and maps rows back; data already sorted by label (no
    # reordering) must give the same findings, row for row.
    with np.load(poisoned["data"]) as d:
        x, y = d["x"], d["y"]
    order = np.argsort(y, kind="stable")
    np.savez(tmp_path / "sorted.npz", x=x[order], y=y[order])
    found = {}
    for name, data in (("shuffled", poisoned["data"]), ("sorted", tmp_path / "sorted.npz")):
        run_gate(
            "ac", str(poisoned["model"]), "--data", str(data),
            "--report-dir", str(tmp_path / name), "--format", "json", "--quiet", env=ENV,
        )  # fmt: skip
        classes = json.loads((tmp_path / name / "report.json").read_text())[
            "activation_clustering"
        ]["classes"]
        found[name] = {c["label"]: c["suspicious_indices"] for c in classes if c["flagged"]}
    assert found["sorted"] and found["sorted"].keys() == found["shuffled"].keys()
    for label, rows in found["shuffled"].items():
        assert rows == sorted(rows)
        assert sorted(order[found["sorted"][label]].tolist()) == rows


def test_default_ac_path_does_not_import_scikit_learn(
    poisoned: dict[str, Any], tmp_path: Path
) -> None:
    # Its import alone cost ~2 s per run (bench/bench_scale.py); gate.ac.numeric replaces it.
    code = (
        "import sys\n"
        "from gate.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(code, sorted(m for m in ('sklearn', 'scipy.optimize') if m in sys.modules))\n"
    )
    args = [str(poisoned["model"]), "--data", str(poisoned["data"]), "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-c", code, "ac", *args, "--report-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV},
    )  # fmt: skip
    # Exit 1 (poison found): the ExRe classifier ran, through SciPy's optimiser.
    assert proc.stdout.split("\n")[-2] == "1 ['scipy.optimize']", (proc.stdout, proc.stderr)


def test_clean_model_on_clean_data_flags_nothing(clean: dict[str, Any], tmp_path: Path) -> None:
    proc = run_gate(
        "ac", str(clean["model"]), "--data", str(clean["data"]),
        "--report-dir", str(tmp_path), "--format", "json", "--quiet", env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert not [c["label"] for c in report["activation_clustering"]["classes"] if c["flagged"]]
    assert (tmp_path / "suspicious.csv").read_text().count("\n") == 1
    assert (
        len(np.load(tmp_path / "clean_indices.npy")) == report["activation_clustering"]["n_samples"]
    )


# Class means for _planted: 3 along four dimensions of each class's own.
_MEANS = np.kron(3.0 * np.eye(3, 8, dtype=np.float32), np.ones((1, 4), dtype=np.float32))


def _planted(n: int = 600, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Three Gaussian classes (means 3 apart along four dimensions of their own); 30 rows of
    class 1 are poison: drawn like class 2 (the source), shifted by a trigger in four other
    dimensions, labelled 1."""
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((n, d)).astype(np.float32)
    y = np.repeat(np.arange(3), n // 3).astype(np.int64)
    acts += _MEANS[y]
    planted = np.flatnonzero(y == 1)[:30]
    acts[planted] += _MEANS[2] - _MEANS[1]
    acts[planted, 24:28] += 6.0
    return acts, y, planted


def test_planted_cluster_is_found_and_results_are_deterministic() -> None:
    acts, y, planted = _planted()
    a = cluster_classes(acts, y, ACConfig())
    b = cluster_classes(acts.copy(), y.copy(), ACConfig())
    assert [c.label for c in a if c.flagged] == [1]
    assert set(a[1].suspicious_indices) == set(planted.tolist())
    assert a[1].suspected_source == 2 and a[1].exre_log_odds is not None
    assert a[1].exre_log_odds > ACConfig().exre_log_odds
    assert a[1].spectral is not None and a[1].spectral.flagged
    strip = [
        (c.silhouette, c.suspicious_indices, c.separation, c.exre_score, c.exre_log_odds) for c in a
    ]
    assert strip == [
        (c.silhouette, c.suspicious_indices, c.separation, c.exre_score, c.exre_log_odds) for c in b
    ]
    ica = cluster_classes(acts, y, ACConfig(reduction="ica"))
    assert [c.label for c in ica if c.flagged] == [1]
    old = cluster_classes(acts, y, SEPARATION_RULE)
    assert [c.label for c in old if c.flagged] == [1]
    assert set(old[1].suspicious_indices) == set(planted.tolist())


def test_exre_rule_needs_a_source_class() -> None:
    """A tight sub-population that looks like no other class (here: a class-1 cluster moved
    off along unused dimensions) is what the separation rule flags and the ExRe rule does
    not: ExRe asks whether the cluster belongs to another class, as relabelled poison does."""
    acts, y, planted = _planted()
    acts[planted] += _MEANS[1] - _MEANS[2]  # back to class 1's mean; the trigger stays
    assert [c.label for c in cluster_classes(acts, y, SEPARATION_RULE) if c.flagged] == [1]
    res = cluster_classes(acts, y, ACConfig())
    assert not [c.label for c in res if c.flagged]
    assert res[1].exre_log_odds is not None and res[1].exre_log_odds < ACConfig().exre_log_odds


def test_isolated_path_needs_half_the_log_odds() -> None:
    """A cluster far from the rest of its class is flagged on half of exre_log_odds; with the
    isolated path switched off the same cluster needs the full log-odds."""
    acts, y, planted = _planted()
    base = cluster_classes(acts, y, ACConfig())[1]
    assert base.exre_log_odds is not None and base.separation is not None
    odds, sep = base.exre_log_odds, base.separation
    # Full threshold above this cluster's log-odds, half of it below: only isolation flags it.
    strict = ACConfig(exre_log_odds=1.5 * odds, isolated_separation=sep - 1.0)
    flagged = cluster_classes(acts, y, strict)[1]
    assert flagged.flagged and set(flagged.suspicious_indices) == set(planted.tolist())
    iso = f"> {strict.isolated_separation}"
    assert any("separation" in r and iso in r for r in flagged.reasons), flagged.reasons
    off = cluster_classes(acts, y, ACConfig(exre_log_odds=1.5 * odds, isolated_separation=sep + 1))
    assert not off[1].flagged


def test_majority_poison_is_found_with_the_exre_rule() -> None:
    """All-to-one poisoning makes the target class mostly poison: the bigger side of the split
    is the poison and ExRe confirms it; the separation rule only judges the smaller side."""
    rng = np.random.default_rng(3)
    n, d = 900, 32
    y = np.repeat(np.arange(3), n // 3).astype(np.int64)
    acts = (rng.standard_normal((n, d)) + _MEANS[y]).astype(np.float32)
    target = np.flatnonzero(y == 0)
    planted = target[:165]  # 55 % of class 0: classes 1 and 2 with a trigger, labelled 0
    sources = np.where(np.arange(len(planted)) % 2 == 0, 1, 2)
    acts[planted] += _MEANS[sources] - _MEANS[0]
    acts[planted, 24:28] += 6.0
    res = cluster_classes(acts, y, ACConfig())
    assert [c.label for c in res if c.flagged] == [0]
    assert set(res[0].suspicious_indices) == set(planted.tolist())
    assert res[0].small_fraction is not None and res[0].small_fraction > 0.5
    old = cluster_classes(acts, y, SEPARATION_RULE)
    assert set(old[0].suspicious_indices).isdisjoint(planted.tolist())


def test_default_exre_layer_is_the_input_of_the_layer_producing_the_clustered_one() -> None:
    from gate.ac.layers import default_exre_layer

    class Fake:
        def __init__(self, kinds: dict[str, str]) -> None:
            self.kinds = kinds

        def layer_names(self) -> list[str]:
            return list(self.kinds)

        def layer_kinds(self) -> dict[str, str]:
            return dict(self.kinds)

    cnn = Fake(
        {
            "features.0": "Conv2d",
            "features.1": "ReLU",
            "features": "Sequential",
            "features.4": "MaxPool2d",
            "@flatten_0": "aten::flatten",
            "fc": "Linear",
            "@relu_0": "aten::relu",
            "head": "Linear",
        }
    )
    assert default_exre_layer(cnn, "@relu_0") == "@flatten_0"  # type: ignore[arg-type]
    assert default_exre_layer(cnn, "features.1") is None  # type: ignore[arg-type]
    mlp = Fake(
        {"0": "Flatten", "1": "Linear", "2": "ReLU", "3": "Linear", "4": "ReLU", "5": "Linear"}
    )
    assert default_exre_layer(mlp, "4") == "2"  # type: ignore[arg-type]
    eager = Fake({**mlp.kinds, "@penultimate": "input of last Linear"})
    assert default_exre_layer(eager, "@penultimate") == "2"  # type: ignore[arg-type]
    assert default_exre_layer(eager, "missing") is None  # type: ignore[arg-type]


def test_gaussian_classes_are_not_flagged() -> None:
    rng = np.random.default_rng(3)
    acts = rng.standard_normal((900, 32)).astype(np.float32)
    y = np.repeat(np.arange(3), 300).astype(np.int64)
    res = cluster_classes(acts, y, ACConfig(detector="either"))
    assert not [c.label for c in res if c.flagged]
    assert all(c.separation is not None and c.separation < 4 for c in res)


def test_separation_of_one_blob_split_in_two() -> None:
    z = np.random.default_rng(0).standard_normal((20000, 1))
    assert separation(z, (z[:, 0] > 0).astype(np.int64)) == pytest.approx(2.65, abs=0.1)


def test_small_and_empty_classes_are_skipped_with_a_reason() -> None:
    acts, y, _ = _planted()
    acts = np.concatenate([acts, np.ones((5, acts.shape[1]), np.float32)])
    y = np.concatenate([y, np.full(5, 7, np.int64)])
    res = {c.label: c for c in cluster_classes(acts, y, ACConfig(), classes=[0, 1, 2, 5, 7])}
    assert res[5].skipped == "no samples" and res[5].size == 0 and not res[5].flagged
    assert res[7].skipped is not None and "too small" in res[7].skipped
    assert not res[7].flagged


def test_exre_hook_replaces_the_linear_classifier() -> None:
    acts, y, _ = _planted()
    calls: list[int] = []

    def hook(x_train: np.ndarray, y_train: np.ndarray, x_cluster: np.ndarray) -> np.ndarray:
        calls.append(len(x_cluster))
        return np.full(len(x_cluster), 2)

    res = cluster_classes(acts, y, ACConfig(exre_threshold=1.0), exre_hook=hook)
    assert calls and res[1].flagged and res[1].suspected_source == 2 and res[1].exre_score == 0


def test_bad_exre_hook_and_wrong_input_shape_exit_2(clean: dict[str, Any], tmp_path: Path) -> None:
    proc = run_gate("ac", str(clean["model"]), "--data", str(clean["data"]), "--exre-hook", "nope")
    assert_one_line_error(proc, "exre-hook")
    proc = run_gate(
        "ac", str(clean["model"]), "--data", str(clean["data"]), "--exre-hook", "no_such_mod:f"
    )
    assert_one_line_error(proc, "cannot import")
    bad = tmp_path / "shape.npz"
    np.savez(bad, x=np.zeros((20, 1, 5, 5), np.float32), y=np.zeros(20, np.int64))
    proc = run_gate("ac", str(clean["model"]), "--data", str(bad))
    assert_one_line_error(proc, "data")
    bad = tmp_path / "dtype.npz"
    np.savez(bad, x=np.full((20, 1, 8, 8), "a"), y=np.zeros(20, np.int64))
    proc = run_gate("ac", str(clean["model"]), "--data", str(bad))
    assert_one_line_error(proc, "numeric")


def test_cli_exposes_the_new_flags() -> None:
    proc = run_gate("ac", "--help")
    for flag in ("--reduction", "--segment-by", "--pool", "--exre-hook", "--detector"):
        assert flag in proc.stdout


def test_png_writer_and_mosaic() -> None:
    import struct
    import zlib

    from gate.ac.pictures import png_gray, suspicious_mosaic

    img = np.arange(12, dtype=np.uint8).reshape(3, 4)
    png = png_gray(img)
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (4, 3)
    idat = png[png.index(b"IDAT") + 4 : png.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    assert raw == b"".join(b"\x00" + img[r].tobytes() for r in range(3))
    x = np.random.default_rng(0).random((30, 1, 8, 8)).astype(np.float32)
    assert suspicious_mosaic(x, list(range(25))) is not None
    assert suspicious_mosaic(x.reshape(30, 64), [1, 2]) is None
    assert suspicious_mosaic(x, []) is None
