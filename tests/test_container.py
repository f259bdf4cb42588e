"""The image, built and run by a real container engine (podman or docker), offline.

Skipped, with the reason, unless an engine answers and the base image and a wheelhouse are
on this machine (the build never pulls and never reaches a package index):

* ``GATE_TEST_ENGINE``: ``podman`` or ``docker`` (default: whichever is on PATH, podman first).
* ``GATE_TEST_BASE_IMAGE``: a local Python 3.11 image with ``python3 -m venv`` and
  libseccomp2 (default ``localhost/debian-bookworm-py311``; README "Container image" shows
  how to bootstrap it with mmdebstrap and ``podman import``).
* ``GATE_TEST_WHEELHOUSE``: a directory of wheels for torch 2.13.0 and the runtime
  dependencies pinned by constraints.txt, plus setuptools and wheel (default
  ``/tmp/gate-image/wheelhouse``).
* ``GATE_TEST_CONTAINER=0`` skips the test outright.

The image is built from a staged copy of the build context (the repository's context files
and the wheelhouse, hard-linked), so nothing is written into the checkout. The containers
then run as a CI job would harden them: ``--network none``, ``--read-only`` with a tmpfs on
/tmp, ``--user 1001``, the workspace mounted at /github/workspace.

The docker SDK test in test_pipeline.py (an image built by a Docker daemon from the public
indexes) stays for machines where a daemon answers.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, run_gate

pytestmark = pytest.mark.slow

IMAGE = "localhost/gate:container-test"
DEFAULT_BASE = "localhost/debian-bookworm-py311"
DEFAULT_WHEELHOUSE = "/tmp/gate-image/wheelhouse"
# What `pip install .` reads, as .dockerignore lets through.
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "constraints.txt", "README.md")
CONTEXT_DIRS = ("gate", "policies")
SIZE_TARGET = 1.2e9


def _engine() -> str:
    wanted = os.environ.get("GATE_TEST_ENGINE", "")
    for name in [wanted] if wanted else ["podman", "docker"]:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip(f"no container engine: {wanted or 'podman or docker'} is not on PATH")


def _engine_flags(engine: str) -> list[str]:
    """podman here: crun fails on setrlimit, and runc may only set limits that do not exceed
    the caller's own; so runc, and nofile/nproc at or under this process's hard limits."""
    if Path(engine).name != "podman":
        return []
    flags = ["--runtime", "runc"] if shutil.which("runc") else []
    for name, which, want in (
        ("nofile", resource.RLIMIT_NOFILE, 1024),
        ("nproc", resource.RLIMIT_NPROC, 4096),
    ):
        hard = resource.getrlimit(which)[1]
        n = want if hard == resource.RLIM_INFINITY else min(want, hard)
        flags += ["--ulimit", f"{name}={n}:{n}"]
    return flags


def _run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def engine() -> tuple[str, list[str]]:
    if os.environ.get("GATE_TEST_CONTAINER") == "0":
        pytest.skip("GATE_TEST_CONTAINER=0")
    engine = _engine()
    info = _run([engine, "info"], timeout=120)
    if info.returncode != 0:
        pytest.skip(f"{engine} info failed: {info.stderr.strip()[-300:]}")
    return engine, _engine_flags(engine)


@pytest.fixture(scope="session")
def image(engine: tuple[str, list[str]], tmp_path_factory: pytest.TempPathFactory) -> str:
    exe, flags = engine
    base = os.environ.get("GATE_TEST_BASE_IMAGE", DEFAULT_BASE)
    if _run([exe, "image", "inspect", base], timeout=120).returncode != 0:
        pytest.skip(f"base image {base} is not present locally (set GATE_TEST_BASE_IMAGE)")
    wheelhouse = Path(os.environ.get("GATE_TEST_WHEELHOUSE", DEFAULT_WHEELHOUSE))
    if not list(wheelhouse.glob("torch-2.13.0*.whl")):
        pytest.skip(f"no torch 2.13.0 wheel in {wheelhouse} (set GATE_TEST_WHEELHOUSE)")

    ctx = tmp_path_factory.mktemp("context")
    for name in CONTEXT_FILES:
        shutil.copy2(REPO / name, ctx / name)
    for name in CONTEXT_DIRS:
        shutil.copytree(REPO / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    (ctx / "wheelhouse").mkdir()
    for wheel in wheelhouse.glob("*.whl"):
        try:
            os.link(wheel, ctx / "wheelhouse" / wheel.name)
        except OSError:  # another filesystem
            shutil.copy2(wheel, ctx / "wheelhouse" / wheel.name)

    build_args = ["--network", "none", "--build-arg", f"BASE_IMAGE={base}", "-t", IMAGE]
    build = _run([exe, "build", *flags, *build_args, str(ctx)], timeout=1800)
    # --network none: the build reaches no index, so everything came from the wheelhouse.
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    fmt = "{{.Size}} {{.Config.User}}"
    inspect = _run([exe, "image", "inspect", "--format", fmt, IMAGE], timeout=120)
    size, user = inspect.stdout.split()
    assert int(size) < SIZE_TARGET, f"image is {int(size) / 1e9:.2f} GB (target < 1.2 GB)"
    assert user == "1001:1001"
    return IMAGE


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    return x, digits.target.astype(np.int64)


def _train(x: np.ndarray, y: np.ndarray, seed: int, out: Path) -> None:
    """A small digits CNN (1x8x8 inputs), saved as TorchScript."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    torch.jit.script(model.eval()).save(str(out))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/candidate.pt, models/baseline (3 references, built here) and data/train.npz."""
    ws = tmp_path_factory.mktemp("workspace")
    (ws / "models").mkdir()
    (ws / "data").mkdir()
    x, y = _digits()
    # Activation clustering on 30 rows per class: enough to cluster, quick on 2 cores.
    rows = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(10)])
    np.savez(ws / "data" / "train.npz", x=x[rows], y=y[rows])
    refs = []
    for seed in (1, 2, 3):
        refs.append(ws / "models" / f"ref{seed}.pt")
        _train(x, y, seed, refs[-1])
    _train(x, y, 7, ws / "models" / "candidate.pt")
    proc = run_gate(
        "baseline", "build", *map(str, refs), "--out", str(ws / "models" / "baseline"),
        "--input-shape", "1,8,8", "--quiet", "--no-cache",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for path in ws.rglob("*"):
        path.chmod(0o777 if path.is_dir() else 0o644)
    ws.chmod(0o777)  # the container's uid 1001 writes its reports here
    return ws


# How a CI job should run the image: no network, a read-only root with a tmpfs, uid 1001.
HARDENED = ("--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "1001:1001")


def _gate(
    engine: tuple[str, list[str]], image: str, ws: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    exe, flags = engine
    volume = ["-v", f"{ws}:/github/workspace"]
    return _run([exe, "run", "--rm", *flags, *HARDENED, *volume, image, *args], timeout=900)


def _verdict_matches(proc: subprocess.CompletedProcess[str], report: Path) -> str:
    assert proc.returncode in (0, 1), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    verdict = json.loads(report.read_text())["verdict"]
    assert (verdict == "fail") == (proc.returncode == 1), (verdict, proc.returncode)
    return str(verdict)


def test_container_scan_offline_readonly_uid1001(
    engine: tuple[str, list[str]], image: str, workspace: Path
) -> None:
    """The fingerprint scan against the baseline (a clean candidate of the same family)."""
    proc = _gate(
        engine, image, workspace,
        "scan", "models/candidate.pt", "--baseline", "models/baseline",
        "--report-dir", "out/scan", "--format", "markdown,json,sarif,junit,codequality",
    )  # fmt: skip
    out = workspace / "out" / "scan"
    assert _verdict_matches(proc, out / "report.json") in ("pass", "warn")
    report = json.loads((out / "report.json").read_text())
    assert "fingerprint" in {c["name"] for c in report["checks"]}
    assert report["fingerprint"]["n_references"] == 3
    for name in ("summary.md", "gate.sarif", "junit.xml", "gl-code-quality.json"):
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
    assert json.loads((out / "gate.sarif").read_text())["version"] == "2.1.0"
    if os.getuid() == 0:  # rootful engine: the container's uid is the host's
        assert {p.stat().st_uid for p in out.iterdir()} == {1001}


def test_container_ac_offline_readonly_uid1001(
    engine: tuple[str, list[str]], image: str, workspace: Path
) -> None:
    proc = _gate(
        engine, image, workspace,
        "ac", "models/candidate.pt", "--data", "data/train.npz", "--report-dir", "out/ac",
    )  # fmt: skip
    out = workspace / "out" / "ac"
    _verdict_matches(proc, out / "report.json")
    for name in ("summary.md", "clean_indices.npy", "suspicious.csv"):
        assert (out / name).is_file(), sorted(p.name for p in out.iterdir())
    report = json.loads((out / "report.json").read_text())
    ac = {c["name"]: c for c in report["checks"]}["activation_clustering"]
    assert ac["status"] in ("pass", "warn", "fail"), ac


def test_container_sandbox_has_seccomp_and_writable_tmp(
    engine: tuple[str, list[str]], image: str
) -> None:
    """The model child's seccomp filter installs (libseccomp2 is in the image), and the
    cache and temp dirs resolve to the tmpfs, not the read-only home."""
    probe = (
        "from gate.sandbox.limits import install_seccomp; import tempfile;"
        "from gate.activations import cache_secret, default_cache_root;"
        "print(default_cache_root(), tempfile.gettempdir(), cache_secret() is not None,"
        " install_seccomp())"
    )
    exe, flags = engine
    python = ["--entrypoint", "python3", image, "-c", probe]
    proc = _run([exe, "run", "--rm", *flags, *HARDENED, *python], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/tmp/.cache/gate", "/tmp", "True", "None"], proc.stdout
