"""Every bad input is one line on stderr and exit code 2; nothing from a model file runs."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate


class _Payload:
    """Unpickling this would call os.system and create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_missing_model_file(demo_dir: Path, tmp_path: Path) -> None:
    proc = run_gate("scan", str(tmp_path / "nope.pt"), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc, "not found")


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "empty"),
        (os.urandom(4096), "unrecognised model format"),
        (b"PK\x03\x04" + os.urandom(200), "zip"),
    ],
)
def test_non_torchscript_files(demo_dir: Path, tmp_path: Path, content: bytes, needle: str) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    proc = run_gate("scan", str(model), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc, needle)


def test_truncated_torchscript(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    data = demo_models["clean"].read_bytes()
    model = tmp_path / "truncated.pt"
    model.write_bytes(data[: len(data) // 2])
    proc = run_gate("scan", str(model), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc)


def test_malicious_raw_pickle_never_runs(demo_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "evil.pkl"
    model.write_bytes(pickle.dumps(_Payload(marker)))
    before = model.read_bytes()
    proc = run_gate("scan", str(model), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc, "system", "code execution")
    assert not marker.exists()
    assert model.read_bytes() == before  # the user's file is left as it was


def test_malicious_pickle_inside_torch_archive_never_runs(demo_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = tmp_path / "evil.pt"
    with zipfile.ZipFile(model, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Payload(marker)))
        zf.writestr("archive/version", "3\n")
    proc = run_gate("inspect", str(model))
    assert_one_line_error(proc, "system")
    assert not marker.exists()


def test_npz_without_x_and_y(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, inputs=np.zeros((4, 1, 8, 8), np.float32))
    proc = run_gate(
        "scan",
        str(demo_models["clean"]),
        "--baseline",
        str(demo_dir / "baseline"),
        "--data",
        str(data),
    )
    assert_one_line_error(proc, "'x' and 'y'")


@pytest.mark.parametrize(
    "x, y, needle",
    [
        (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64), "rows"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), np.zeros(4, np.int64), "NaN"),
        (np.zeros((4, 1, 8, 8), np.float32), np.array(["a", "b", "c", "d"]), "integer"),
    ],
)
def test_malformed_data(
    demo_models: dict[str, Path], tmp_path: Path, x: np.ndarray, y: np.ndarray, needle: str
) -> None:
    data = tmp_path / "bad.npz"
    np.savez(data, x=x, y=y)
    proc = run_gate("ac", str(demo_models["clean"]), "--data", str(data))
    assert_one_line_error(proc, needle)


def test_not_a_baseline_directory(demo_models: dict[str, Path], tmp_path: Path) -> None:
    proc = run_gate("scan", str(demo_models["clean"]), "--baseline", str(tmp_path))
    assert_one_line_error(proc, "not a gate baseline")
    proc = run_gate("scan", str(demo_models["clean"]), "--baseline", str(tmp_path / "missing"))
    assert_one_line_error(proc, "not found")


def test_tampered_baseline(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "baseline"
    shutil.copytree(demo_dir / "baseline", copy)
    manifest = (
        (copy / "baseline.json").read_text().replace('"output_size": 10', '"output_size": "ten"')
    )
    (copy / "baseline.json").write_text(manifest)
    proc = run_gate("scan", str(demo_models["clean"]), "--baseline", str(copy))
    assert_one_line_error(proc, "output_size")


def test_baseline_from_another_family(demo_dir: Path, tmp_path: Path) -> None:
    import torch

    other = tmp_path / "tabular.pt"
    torch.jit.save(
        torch.jit.script(
            torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        ),
        str(other),
    )
    proc = run_gate("scan", str(other), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc, "another model family")


def test_other_output_size_is_a_mismatch(demo_dir: Path, tmp_path: Path) -> None:
    import torch

    other = tmp_path / "five-class.pt"
    torch.jit.save(
        torch.jit.script(
            torch.nn.Sequential(
                torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)
            )
        ),
        str(other),
    )
    proc = run_gate("scan", str(other), "--baseline", str(demo_dir / "baseline"))
    assert_one_line_error(proc, "5 outputs")


def test_unknown_policy_key(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("fingerprint:\n  fail_alpha: 0.01\n  fial_alpha: 0.02\n")
    proc = run_gate(
        "scan",
        str(demo_models["clean"]),
        "--baseline",
        str(demo_dir / "baseline"),
        "--policy",
        str(policy),
    )
    assert_one_line_error(proc, "fingerprint.fial_alpha")


def test_too_few_references(demo_models: dict[str, Path], tmp_path: Path) -> None:
    proc = run_gate(
        "baseline",
        "build",
        str(demo_models["ref0"]),
        str(demo_models["ref1"]),
        "--out",
        str(tmp_path / "b"),
        "--input-shape",
        "1,8,8",
    )
    assert_one_line_error(proc, "at least 3")


def test_baseline_build_refuses_to_clobber(demo_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refs = [str(demo_models[f"ref{i}"]) for i in range(3)]
    proc = run_gate("baseline", "build", *refs, "--out", str(out), "--input-shape", "1,8,8")
    assert_one_line_error(proc, "refusing to overwrite")
    assert (out / "notes.txt").read_text() == "keep me"
