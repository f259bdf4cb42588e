"""Trigger search (issue 14): a backdoor no fixed probe contains is found without a baseline.

Two tiny MLPs are trained here on scikit-learn's digits: a clean one and its twin trained on
the same data with a one-pixel trigger at an unusual place (row 2 of the left edge; the
fixed probes stamp corner patches) relabelled to class 3. Scans run the real CLI in
subprocesses, on synthetic [0, 1] inputs (--input-shape) with the default budget.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate

TARGET = 3
SEED = 2


def _stamp(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[..., 2, 0] = 1.0
    return out


def _train(x: np.ndarray, y: np.ndarray, seed: int, path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(25):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(0, len(xt), 64):
            b = perm[s : s + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt[b]), yt[b]).backward()  # type: ignore[no-untyped-call]
            opt.step()
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from gate.demo.zoo import digits

    work = tmp_path_factory.mktemp("trigger")
    x, y = digits("train")
    xte, yte = digits("test")
    rng = np.random.default_rng(SEED)
    idx = rng.choice(np.flatnonzero(y != TARGET), size=len(x) // 10, replace=False)
    xp, yp = x.copy(), y.copy()
    xp[idx], yp[idx] = _stamp(x[idx]), TARGET
    clean = _train(x, y, SEED, work / "clean.pt")
    bad = _train(xp, yp, SEED, work / "backdoored.pt")
    import torch

    net = torch.jit.load(str(bad))  # type: ignore[no-untyped-call]
    with torch.inference_mode():
        victims = xte[yte != TARGET]
        asr = float((net(torch.from_numpy(_stamp(victims))).argmax(1) == TARGET).float().mean())
    assert asr > 0.9, asr  # the backdoor works, so a miss would be the search's
    data = work / "data.npz"
    np.savez(data, x=xte[:150], y=yte[:150])
    return {"clean": clean, "bad": bad, "data": data, "work": work}


def _scan(model: Path, report: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = run_gate(
        "scan", str(model), "--input-shape", "1,8,8",
        "--report-dir", str(report), "--format", "markdown,json,sarif,junit", "--quiet", *extra,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads((report / "report.json").read_text())


def test_backdoor_flagged_without_baseline_and_clean_twin_passes(models: dict[str, Any]) -> None:
    work: Path = models["work"]
    rc, rep = _scan(models["bad"], work / "r-bad")
    ts = rep["trigger_search"]
    assert rc == 1 and rep["verdict"] == "fail", ts
    assert ts["status"] == "ok" and ts["null"] == "within_model"
    assert ts["p_value"] < 0.01 and ts["anomaly_score"] == pytest.approx(1 - ts["p_value"])
    assert ts["suspected_target"] == TARGET  # the right class is named
    assert len(ts["classes"]) == 10
    checks = {c["name"]: c["status"] for c in rep["checks"]}
    assert checks["trigger_search"] == "fail" and checks["fingerprint"] == "skipped"
    assert (work / "r-bad" / f"trigger-search-class-{TARGET}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Trigger search" in (work / "r-bad" / "summary.md").read_text()
    assert "trigger_search" in (work / "r-bad" / "gate.sarif").read_text()
    assert "trigger_search" in (work / "r-bad" / "junit.xml").read_text()
    timing = json.loads((work / "r-bad" / "timing.json").read_text())
    assert timing["seconds"]["trigger_search"] > 0

    rc, rep = _scan(models["clean"], work / "r-clean")
    ts = rep["trigger_search"]
    assert rc == 0 and rep["verdict"] != "fail", ts
    assert ts["p_value"] >= 0.01 and ts["suspected_target"] in (None, *range(10))


def test_with_a_baseline_the_search_is_calibrated_on_the_references(
    models: dict[str, Any],
) -> None:
    """`baseline build --trigger-search` stores each reference's per-class statistics; scans
    compare each class with the same class of the references instead of the within-model
    null, and name the backdoor's target."""
    from gate.demo.zoo import digits

    work: Path = models["work"]
    x, y = digits("train")
    refs = [str(_train(x, y, seed, work / f"ref{seed}.pt")) for seed in (3, 4, 5)]
    out = work / "baseline"
    proc = run_gate(
        "baseline", "build", *refs, "--out", str(out), "--input-shape", "1,8,8",
        "--trigger-search", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((out / "baseline.json").read_text())["trigger_search"]
    assert len(stored["reference_classes"]) == 3 and stored["inputs"] == "synthetic"
    for ref in stored["reference_classes"]:
        assert set(ref) == {"max_margin", "mask_l1", "flip_l1"}
        assert all(len(v) == 10 for v in ref.values())
    for name, status in (("bad", "fail"), ("clean", "pass")):
        _, rep = _scan(models[name], work / f"bl-{name}", "--baseline", str(out))
        ts = rep["trigger_search"]
        assert ts["null"] == "baseline" and ts["n_references"] == 3, ts
        check = next(c for c in rep["checks"] if c["name"] == "trigger_search")
        assert check["status"] == status, (name, check)
        if name == "bad":
            assert ts["suspected_target"] == TARGET, ts
            assert ts["classes"][TARGET]["z_reference"] == max(
                c["z_reference"] for c in ts["classes"]
            )


def test_same_inputs_give_byte_identical_report(models: dict[str, Any]) -> None:
    work: Path = models["work"]
    _scan(models["bad"], work / "det-1")
    _scan(models["bad"], work / "det-2")
    assert (work / "det-1" / "report.json").read_bytes() == (
        work / "det-2" / "report.json"
    ).read_bytes()


def test_budget_bounds_the_steps(models: dict[str, Any]) -> None:
    report = models["work"] / "budget"
    proc = run_gate(
        "scan", str(models["clean"]), "--input-shape", "1,8,8", "--trigger-budget", "6",
        "--report-dir", str(report), "--quiet",
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    steps = json.loads((report / "report.json").read_text())["trigger_search"]["steps"]
    assert steps == {"mask": 6, "max_margin": 4}


def test_search_runs_on_data_inputs_in_process(models: dict[str, Any]) -> None:
    """--data inputs (the search's own entry point, as the sandbox child calls it)."""
    from gate.models import load_in_process
    from gate.trigger import run_search, stats

    with np.load(models["data"]) as d:
        x, y = d["x"], d["y"]
    res = run_search(load_in_process(models["bad"]), x, y, {"input_range": [0.0, 1.0]}, 0)
    assert res["status"] == "ok" and res["masks"].shape == (10, 1, 8, 8)
    w = stats.within_model(res)
    assert w["suspect"] == TARGET and w["p_value"] < 0.01
    # The mask found for the target is the trigger's pixel, not the digit.
    mask = res["masks"][TARGET][0]
    assert np.unravel_index(int(mask.argmax()), mask.shape) == (2, 0)


class _Fake:
    def __init__(self, fmt: str) -> None:
        self.format = fmt
        self.path = "fake"


@pytest.mark.parametrize("fmt", ["onnx", "huggingface"])
def test_onnx_and_text_models_are_not_run_with_a_reason(fmt: str) -> None:
    from gate.report.schema import TriggerSearchReport
    from gate.trigger import run_search
    from gate.trigger.report import build_report

    res = run_search(_Fake(fmt), np.zeros((4, 1, 8, 8), np.float32), None, {}, 0)
    assert res["status"] == "not_run" and res["reason"]
    rep = build_report(res, 0.05, None, "data")
    assert isinstance(rep, TriggerSearchReport) and rep.p_value is None and rep.reason


def test_not_run_is_never_a_pass() -> None:
    from gate.policy.evaluate import decide
    from gate.policy.load import load_policy
    from gate.report.schema import TriggerSearchReport

    ts = TriggerSearchReport(status="not_run", reason="text model")
    decision = decide(load_policy("default"), None, None, ts)
    assert decision.verdict == "fail"  # no baseline and no search: nothing vouches for it
    assert any(c.name == "trigger_search" and c.status == "not_analysed" for c in decision.checks)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--input-shape", "1,8,8", "--trigger-budget", "0"], "at least 1"),
        (["--input-shape", "1,8,8", "--trigger-budget", "x"], "positive integer"),
        (["--input-shape", "1,8,8", "--trigger-budget", "-3"], "at least 1"),
        (["--input-shape", "1,9,9"], "9"),
        (["--data", "DATA", "--input-shape", "1,4,4"], "contradicts"),
        ([], "--input-shape"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    models: dict[str, Any], extra: list[str], needle: str
) -> None:
    args = [str(models["data"]) if a == "DATA" else a for a in extra]
    proc = run_gate("scan", str(models["clean"]), *args, "--report-dir", str(models["work"] / "e"))
    assert_one_line_error(proc, needle)
