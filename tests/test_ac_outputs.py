"""`gate ac` outputs (issues 4 and 7): cluster pictures, the activation cache, timing.json,
and suspicious.csv / clean_indices.npy agreeing with report.json."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate
from tests.test_ac import ENV, _poisoned_digits, _train_mlp


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One poisoned digits model (the paper's protocol, 15% of each class), `gate ac` twice
    on the same model and data with one cache directory."""
    work = tmp_path_factory.mktemp("ac-outputs")
    x, y, mask = _poisoned_digits(0.15)
    np.savez(work / "train.npz", x=x, y=y)
    model = _train_mlp(x, y, work / "model.pt")
    out = []
    for name in ("r1", "r2"):
        proc = run_gate(
            "ac", str(model), "--data", str(work / "train.npz"), "--report-dir",
            str(work / name), "--cache-dir", str(work / "cache"), "--quiet", env=ENV,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        out.append(work / name)
    return {"r1": out[0], "r2": out[1], "mask": mask, "work": work}


def _png(path: Path) -> tuple[int, int, int, bytes]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    idat = b""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    assert depth == 8
    return width, height, colour, zlib.decompress(idat)


def test_cluster_pictures_only_for_flagged_classes(runs: dict[str, Any]) -> None:
    report = json.loads((runs["r1"] / "report.json").read_text())
    classes = report["activation_clustering"]["classes"]
    flagged = {c["label"] for c in classes if c["flagged"]}
    assert len(flagged) >= 3, [(c["label"], c["separation"]) for c in classes]
    pictures = {int(p.name.split("-")[2]) for p in runs["r1"].glob("ac-class-*-clusters.png")}
    assert pictures == flagged
    for label in flagged:
        width, height, colour, raw = _png(runs["r1"] / f"ac-class-{label}-clusters.png")
        assert (width, height, colour) == (400, 400, 2)  # RGB
        assert len(raw) == height * (1 + 3 * width)
        rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
        pixels = rows[:, 1:].reshape(height, width, 3)
        assert (pixels == 255).all(axis=2).mean() > 0.5  # a white canvas
        red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
        assert red.any()  # the suspicious cluster is drawn


def test_summary_links_the_pictures(runs: dict[str, Any]) -> None:
    summary = (runs["r1"] / "summary.md").read_text()
    report = json.loads((runs["r1"] / "report.json").read_text())
    for c in report["activation_clustering"]["classes"]:
        link = f"(ac-class-{c['label']}-clusters.png)"
        assert (link in summary) == c["flagged"]
        if c["flagged"]:
            assert f"(ac-class-{c['label']}-suspicious.png)" in summary
            assert (runs["r1"] / f"ac-class-{c['label']}-suspicious.png").is_file()


def test_second_run_hits_the_cache_and_is_byte_identical(runs: dict[str, Any]) -> None:
    first = json.loads((runs["r1"] / "timing.json").read_text())
    second = json.loads((runs["r2"] / "timing.json").read_text())
    # Two cache entries: the clustered layer and the ExRe layer (rule "exre").
    assert first["cache"] == {"hits": 0, "misses": 2}
    assert second["cache"] == {"hits": 2, "misses": 0}
    assert set(second["seconds"]) >= {"load", "extract", "cluster", "report", "total"}
    report = (runs["r1"] / "report.json").read_bytes()
    assert (runs["r2"] / "report.json").read_bytes() == report
    assert b"seconds" not in report
    for name in ("suspicious.csv", "clean_indices.npy"):
        assert (runs["r2"] / name).read_bytes() == (runs["r1"] / name).read_bytes()


def test_csv_and_clean_indices_agree_with_the_report(runs: dict[str, Any]) -> None:
    ac = json.loads((runs["r1"] / "report.json").read_text())["activation_clustering"]
    by_label = {c["label"]: c for c in ac["classes"]}
    suspicious = {i for c in ac["classes"] if c["flagged"] for i in c["suspicious_indices"]}
    lines = (runs["r1"] / "suspicious.csv").read_text().splitlines()
    assert lines[0].split(",")[:2] == ["index", "label"]
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == sorted(suspicious)
    for r in rows:
        assert int(r[0]) in by_label[int(r[1])]["suspicious_indices"]
    keep = np.load(runs["r1"] / "clean_indices.npy", allow_pickle=False)
    assert keep.dtype == np.int64
    everything = set(range(ac["n_samples"]))
    assert keep.tolist() == sorted(everything - suspicious)
    assert runs["mask"][sorted(suspicious)].mean() >= 0.9  # they really are the poison


# Class-split jobs need rule exre (rule calibrated's null spans every class): the shipped
# policy for them.
SPLIT = ("--policy", "split")


def _ac_part(
    runs: dict[str, Any], classes: str | None, name: str, *extra: str, policy: bool = True
) -> Any:
    work = runs["work"]
    split = ("--classes", classes) if classes is not None else ()
    chosen = SPLIT if policy else ()
    return run_gate(
        "ac", str(work / "model.pt"), "--data", str(work / "train.npz"), *split, *chosen,
        "--report-dir", str(work / name), "--cache-dir", str(work / "cache"), "--quiet", *extra,
        env=ENV,
    )  # fmt: skip


def test_class_split_jobs_merge_into_the_single_run_report(runs: dict[str, Any]) -> None:
    """Three `--classes I/3` jobs plus `gate ac-merge` give the single run's report, CSV,
    clean indices and pictures, byte for byte (rule exre: the jobs' policy)."""
    work = runs["work"]
    single = _ac_part(runs, None, "single")
    assert single.returncode == 1, single.stderr
    parts = []
    for i in (1, 2, 3):
        proc = _ac_part(runs, f"{i}/3", f"part{i}")
        assert proc.returncode in (0, 1), proc.stderr
        part = json.loads((work / f"part{i}" / "report.json").read_text())["activation_clustering"]
        assert part["class_subset"] == f"{i}/3"
        assert [c["label"] for c in part["classes"]] == list(range(i - 1, 10, 3))
        parts.append(str(work / f"part{i}"))
    assert "Partial run" in (work / "part1" / "summary.md").read_text()
    merged = work / "merged"
    proc = run_gate(
        "ac-merge", *reversed(parts), *SPLIT, "--report-dir", str(merged), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # the single run fails too
    for name in ("report.json", "suspicious.csv", "clean_indices.npy", "summary.md"):
        assert (merged / name).read_bytes() == (work / "single" / name).read_bytes(), name
    pictures = sorted(p.name for p in (work / "single").glob("ac-class-*.png"))
    assert pictures and sorted(p.name for p in merged.glob("ac-class-*.png")) == pictures


def test_class_split_refusals(runs: dict[str, Any]) -> None:
    work = runs["work"]
    # The default policy's rule calibrated needs every class at once.
    calibrated = _ac_part(runs, "1/3", "bad", policy=False)
    assert_one_line_error(calibrated, "--classes 1/3", "rule 'calibrated'", "rule: exre")
    assert not (work / "bad").exists()
    assert_one_line_error(_ac_part(runs, "42", "bad"), "--classes 42", "labels present")
    assert_one_line_error(_ac_part(runs, "0/3", "bad"), "--classes")
    assert_one_line_error(_ac_part(runs, "1,x", "bad"), "--classes")
    for i, classes in enumerate(("0,1,2,3,4", "5,6,7,8", "9")):
        proc = _ac_part(runs, classes, f"list{i}")
        assert proc.returncode in (0, 1), proc.stderr
    lists = [str(work / f"list{i}") for i in range(3)]
    out = str(work / "merge-bad")
    missing = run_gate("ac-merge", *lists[:2], *SPLIT, "--report-dir", out)
    assert_one_line_error(missing, "no part clustered class(es) 9")
    twice = run_gate("ac-merge", *lists, lists[2], *SPLIT, "--report-dir", out)
    assert_one_line_error(twice, "class 9 is in both")
    policy = run_gate("ac-merge", *lists, "--policy", "strict", "--report-dir", out)
    assert_one_line_error(policy, "policy 'split'")
    onto_part = run_gate("ac-merge", *lists, *SPLIT, "--report-dir", lists[0])
    assert_one_line_error(onto_part, "is one of the parts")
    not_a_report = run_gate("ac-merge", str(work), *SPLIT, "--report-dir", out)
    assert_one_line_error(not_a_report, "no report.json")
    assert not Path(out).exists()
