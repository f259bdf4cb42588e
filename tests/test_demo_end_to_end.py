"""The walking skeleton's promise: the demo's backdoored model fails, the clean one passes."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import assert_one_line_error, run_gate


def test_demo_prints_both_verdicts(demo_dir: Path) -> None:
    out = (demo_dir / "demo-stdout.txt").read_text()
    assert "held-out clean -> pass" in out
    assert "backdoored (BadNets) -> fail" in out
    assert "reports:" in out


def test_demo_activation_clustering_finds_the_poison(demo_dir: Path) -> None:
    """The demo scans each candidate with its own training set: AC flags exactly the rows
    the demo poisoned (BadNets all-to-one: class 0 is about half poison) and nothing in the
    clean candidate's data; the CLI's AC files sit next to the reports."""
    from gate.demo.run import BACKDOORED
    from gate.demo.zoo import training_set

    _, _, poisoned = training_set(BACKDOORED)
    bad = json.loads((demo_dir / "report-backdoored" / "report.json").read_text())
    flagged = {i for c in bad["activation_clustering"]["classes"] for i in c["suspicious_indices"]}
    truth = set(poisoned.tolist())
    precision = len(flagged & truth) / max(len(flagged), 1)
    recall = len(flagged & truth) / len(truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert [c["label"] for c in bad["activation_clustering"]["classes"] if c["flagged"]] == [0]
    for name in ("suspicious.csv", "clean_indices.npy", "ac-class-0-clusters.png"):
        assert (demo_dir / "report-backdoored" / name).is_file(), name
    assert "clean_indices.npy" in (demo_dir / "report-backdoored" / "summary.md").read_text()
    clean = json.loads((demo_dir / "report-clean" / "report.json").read_text())
    assert not any(c["flagged"] for c in clean["activation_clustering"]["classes"])
    assert clean["verdict"] == "pass"


def test_demo_trigger_search_fails_the_backdoor_with_margin(demo_dir: Path) -> None:
    """The demo's baseline stores the references' trigger searches, so each candidate
    class is compared with the clean family's: the BadNets model fails that check by orders
    of magnitude and it names the real target; the held-out clean model passes it."""
    from gate.demo.run import BACKDOORED

    bad = json.loads((demo_dir / "report-backdoored" / "report.json").read_text())
    ts = bad["trigger_search"]
    assert ts["status"] == "ok" and ts["suspected_target"] == BACKDOORED.target
    assert ts["p_value"] < 1e-6, ts["p_value"]
    status = {c["name"]: c["status"] for c in bad["checks"]}
    assert status["trigger_search"] == "fail" and status["fingerprint"] == "fail"
    clean = json.loads((demo_dir / "report-clean" / "report.json").read_text())
    assert clean["trigger_search"]["p_value"] > 0.05
    assert {c["name"]: c["status"] for c in clean["checks"]}["trigger_search"] == "pass"


def test_demo_backdoor_really_works(demo_models: dict[str, Path]) -> None:
    import torch

    from gate.demo.run import BACKDOORED
    from gate.demo.zoo import evaluate

    net = torch.jit.load(str(demo_models["backdoored"]))
    stats = evaluate(net, BACKDOORED)
    assert stats["accuracy"] > 0.9
    assert stats["attack_success"] > 0.9


def test_scan_cli_blocks_backdoor(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    proc = run_gate(
        "scan",
        str(demo_models["backdoored"]),
        "--baseline",
        str(demo_dir / "baseline"),
        "--report-dir",
        str(tmp_path),
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["schema_version"] == 1
    assert report["verdict"] == "fail"
    assert report["fingerprint"]["anomaly_score"] > 0.99
    assert report["fingerprint"]["p_value"] < 0.01
    assert {d["name"] for d in report["fingerprint"]["detectors"]} == {"lof", "iforest", "ocsvm"}
    assert report["model"]["path"] == str(demo_models["backdoored"])
    assert len(report["model"]["sha256"]) == 64
    assert report["activation_clustering"] is None
    assert any("outside the clean family" in r for r in report["reasons"])
    summary = (tmp_path / "summary.md").read_text()
    assert "FAIL" in summary


def test_scan_cli_passes_clean(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    proc = run_gate(
        "scan",
        str(demo_models["clean"]),
        "--baseline",
        str(demo_dir / "baseline"),
        "--report-dir",
        str(tmp_path),
        "--quiet",
        "--trigger-search",
        "off",  # the fingerprint alone: the search needs --data against this baseline
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"] == "pass"
    assert 0.0 <= report["fingerprint"]["anomaly_score"] < 0.99
    assert proc.stdout == ""


def test_trigger_search_without_the_baselines_kind_of_inputs_is_not_a_pass(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """The demo's baseline searched its references on data inputs. A scan without --data
    cannot be compared with them: by default the check is reported as not analysed, with
    the reason (never a pass); asked for explicitly, it is a one-line usage error."""
    base = ["scan", str(demo_models["clean"]), "--baseline", str(demo_dir / "baseline")]
    proc = run_gate(*base, "--report-dir", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    check = {c["name"]: c for c in report["checks"]}["trigger_search"]
    assert check["status"] == "not_analysed"  # the default policy does not require it
    assert report["trigger_search"]["status"] == "not_run"
    assert "--data" in report["trigger_search"]["reason"]
    proc = run_gate(*base, "--report-dir", str(tmp_path / "on"), "--trigger-search", "on")
    assert proc.returncode == 2
    assert_one_line_error(proc, "--data")


def test_scan_is_deterministic(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    reports = []
    for run in ("a", "b"):
        proc = run_gate(
            "scan",
            str(demo_models["backdoored"]),
            "--baseline",
            str(demo_dir / "baseline"),
            "--report-dir",
            str(tmp_path / run),
            "--quiet",
        )
        assert proc.returncode == 1
        reports.append((tmp_path / run / "report.json").read_bytes())
    assert reports[0] == reports[1]


def test_baseline_build_is_byte_identical(demo_models: dict[str, Path], tmp_path: Path) -> None:
    refs = [str(demo_models[f"ref{i}"]) for i in range(4)]
    for out in ("one", "two"):
        proc = run_gate(
            "baseline",
            "build",
            *refs,
            "--out",
            str(tmp_path / out),
            "--input-shape",
            "1,8,8",
            "--seed",
            "3",
        )
        assert proc.returncode == 0, proc.stderr
    for name in ("baseline.json", "fingerprints.npz"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    show = run_gate("baseline", "show", str(tmp_path / "one"))
    assert show.returncode == 0
    manifest = json.loads(show.stdout)
    assert manifest["input_shape"] == [1, 8, 8]
    assert manifest["probes"]["source"] == "synthetic"
    assert len(manifest["references"]) == 4


def test_inspect_lists_layers_and_default(demo_models: dict[str, Path]) -> None:
    proc = run_gate("inspect", str(demo_models["clean"]), "--input-shape", "1,8,8")
    assert proc.returncode == 0, proc.stderr
    assert "features.0" in proc.stdout and "fc" in proc.stdout and "head" in proc.stdout
    default_line = next(line for line in proc.stdout.splitlines() if "<- default" in line)
    assert default_line.split()[0] == "@relu_0" and "64" in default_line


def test_ac_runs_on_training_data(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    proc = run_gate(
        "ac",
        str(demo_models["clean"]),
        "--data",
        str(demo_dir / "digits-train.npz"),
        "--report-dir",
        str(tmp_path),
        "--quiet",
    )
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    classes = report["activation_clustering"]["classes"]
    assert [c["label"] for c in classes] == list(range(10))
    assert all(
        {"label", "size", "silhouette", "flagged", "suspicious_indices"} <= set(c) for c in classes
    )
    assert report["fingerprint"] is None
