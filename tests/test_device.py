"""``--device``: the CPU is the reference; another device must agree with it (gate.device).

The agreement test needs a CUDA or MPS device and skips, saying so, without one; the rest
runs everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate, tiny_cnn


def _accelerator() -> str | None:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("device") / "model.pt"
    torch.jit.save(torch.jit.script(tiny_cnn(3)), str(path))
    return path


def _scan(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    proc = run_gate(
        "scan", str(model), "--input-shape", "1,8,8", "--trigger-budget", "30",
        "--report-dir", str(out), "--format", "json", "--quiet", *extra,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "CPU", "cuda:1:2", ""])
def test_a_misspelt_device_is_a_one_line_usage_error(model: Path, spec: str) -> None:
    proc = run_gate("inspect", str(model), "--input-shape", "1,8,8", "--device", spec)
    assert_one_line_error(proc, "--device", "auto, cpu, cuda")


def test_an_absent_device_is_a_usage_error_not_a_quiet_cpu_run(model: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: nothing is absent to ask for")
    for command in (["inspect"], ["scan", "--trigger-budget", "5"]):
        proc = run_gate(command[0], str(model), "--input-shape", "1,8,8", *command[1:],
                        "--device", "cuda")  # fmt: skip
        assert_one_line_error(proc, "--device cuda", "no CUDA device")


def test_auto_without_a_gpu_runs_on_the_cpu_and_changes_nothing(
    model: Path, tmp_path: Path
) -> None:
    if _accelerator() is not None:
        pytest.skip(f"this machine has a {_accelerator()} device, which auto would pick")
    cpu = _scan(model, tmp_path / "cpu")
    auto = _scan(model, tmp_path / "auto", "--device", "auto")
    assert cpu["model"]["device"] == auto["model"]["device"] == "cpu"
    assert cpu["trigger_search"]["status"] == "ok"
    assert (tmp_path / "cpu" / "report.json").read_bytes() == (
        tmp_path / "auto" / "report.json"
    ).read_bytes()


def _trained_digits_cnn(path: Path) -> Path:
    """A real digits CNN (a few seconds on a CPU), so that the scores compared mean something."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i : i + 128]), y[i : i + 128])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    np.savez(path.with_suffix(".npz"), x=x[:300].numpy(), y=y[:300].numpy())
    return path


def test_an_accelerator_agrees_with_the_cpu(tmp_path: Path) -> None:
    """Same verdict, and scores within gate.device.SCORE_TOLERANCE of the CPU's."""
    from gate.device import SCORE_TOLERANCE

    device = _accelerator()
    if device is None:
        pytest.skip("no CUDA or MPS device on this machine (the CPU is the only device)")
    model = _trained_digits_cnn(tmp_path / "digits.pt")
    data = str(model.with_suffix(".npz"))
    reports = {}
    for name in ("cpu", device):
        proc = run_gate(
            "scan", str(model), "--data", data, "--report-dir", str(tmp_path / name),
            "--format", "json", "--quiet", "--device", name,
        )  # fmt: skip
        assert proc.returncode in (0, 1), proc.stderr
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    cpu, other = reports["cpu"], reports[device]
    assert other["model"]["device"].startswith(device)
    assert other["verdict"] == cpu["verdict"]
    a, b = cpu["trigger_search"], other["trigger_search"]
    assert abs(a["p_value"] - b["p_value"]) <= SCORE_TOLERANCE["p_value"] or (
        min(a["p_value"], b["p_value"]) < 1e-3 and max(a["p_value"], b["p_value"]) < 1e-2
    )
    for ca, cb in zip(a["classes"], b["classes"], strict=True):
        for key in ("max_margin", "mask_l1"):
            assert abs(ca[key] - cb[key]) <= SCORE_TOLERANCE["trigger_statistic"] * max(
                1.0, abs(ca[key])
            ), (key, ca, cb)
