"""Shared fixtures: the demo's model family, trained once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run `gate demo` once; later tests reuse its models, data and baseline."""
    work = tmp_path_factory.mktemp("demo")
    proc = run_gate("demo", "--workdir", str(work), timeout=1800)
    assert proc.returncode == 0, proc.stderr
    (work / "demo-stdout.txt").write_text(proc.stdout)
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
