"""Shared fixtures: the demo's model family, trained once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _share_the_cores() -> None:
    """Under pytest-xdist, give each worker (and the gate processes it starts) its share of
    the cores for torch, OpenMP and BLAS. Each pool otherwise starts as wide as the machine,
    so two workers on two cores run four or more spinning threads, and tests that take
    seconds alone take minutes. Set before numpy or torch is imported; a value the caller
    set wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2:
        return
    share = str(max(1, (os.cpu_count() or 1) // workers))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, share)


_share_the_cores()


def run_gate(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess, as CI would."""
    # GitHub's variables reach gate only when a test passes them, so that running the
    # suite inside GitHub Actions does not write to the real step summary.
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gate: error:"), err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


def tiny_cnn(seed: int, shift: float = 0.0) -> Any:
    """A random-init CNN on 1x8x8 inputs with 5 classes; ``shift`` on class 0's bias puts it
    far outside its family (one class always wins)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 8 * 8, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()
    if shift:
        with torch.no_grad():
            net[5].bias[0] += shift
    return net


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory for one test run: per session serially, shared by the run's parallel
    workers (pytest-xdist gives each worker a base directory inside the run's)."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        return tmp_path_factory.mktemp(name)
    return tmp_path_factory.getbasetemp().parent / name


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `gate demo` once per test run; later tests, on every worker, reuse its models,
    data and baseline (the first worker to need it trains it, the others wait)."""
    from filelock import FileLock

    work = shared_dir(tmp_path_factory, "demo")
    done = work / "demo-stdout.txt"
    with FileLock(str(work) + ".lock"):
        if not done.is_file():
            work.mkdir(exist_ok=True)
            proc = run_gate("demo", "--workdir", str(work), timeout=1800)
            assert proc.returncode == 0, proc.stderr
            done.write_text(proc.stdout)
    return work


@pytest.fixture(scope="session")
def demo_models(demo_dir: Path) -> dict[str, Path]:
    from gate.demo.run import BACKDOORED, HELD_OUT_CLEAN, REFERENCES

    models = demo_dir / "models"
    return {
        "clean": models / f"{HELD_OUT_CLEAN.key}.pt",
        "backdoored": models / f"{BACKDOORED.key}.pt",
        **{f"ref{i}": models / f"{spec.key}.pt" for i, spec in enumerate(REFERENCES)},
    }
