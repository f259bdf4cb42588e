"""Issue 7: baseline sharding, activation cache, timing.json, --threads, progress, start-up."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gate.cli import main
from gate.progress import Progress
from tests.conftest import REPO, assert_one_line_error, run_gate, tiny_cnn

SHAPE = "1,8,8"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Seven tiny random-init CNNs on 1x8x8 inputs: six references and a candidate."""
    import torch

    d = tmp_path_factory.mktemp("family")
    paths = []
    for seed in range(7):
        path = d / f"m{seed}.pt"
        torch.jit.save(torch.jit.script(tiny_cnn(seed)), str(path))
        paths.append(str(path))
    return paths


def _build(out: Path, models: list[str], *extra: str) -> int:
    return main(
        [
            "baseline",
            "build",
            *models,
            "--out",
            str(out),
            "--input-shape",
            SHAPE,
            "--quiet",
            "--no-cache",
            *extra,
        ]
    )


def test_sharded_build_merges_byte_identical(family: list[str], tmp_path: Path) -> None:
    refs = family[:6]
    assert _build(tmp_path / "full", refs) == 0
    for i in (1, 2, 3, 4):
        assert _build(tmp_path / f"s{i}", refs, "--shard", f"{i}/4") == 0
    shard1 = json.loads((tmp_path / "s1" / "shard.json").read_text())
    assert shard1["indices"] == [0] and shard1["total_references"] == 6  # 1-based, contiguous
    merged = tmp_path / "merged"
    shards = [str(tmp_path / f"s{i}") for i in (3, 1, 4, 2)]  # any order
    assert main(["baseline", "merge", *shards, "--out", str(merged)]) == 0
    for name in ("baseline.json", "fingerprints.npz"):
        assert (merged / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_merge_refuses_inconsistent_shards(
    family: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    refs = family[:4]  # two per shard: enough to tell the shards apart, fewer model loads
    for i in (1, 2):
        assert _build(tmp_path / f"s{i}", refs, "--shard", f"{i}/2") == 0
    assert _build(tmp_path / "seed", refs, "--shard", "2/2", "--seed", "1") == 0
    assert _build(tmp_path / "rep", refs, "--shard", "2/2", "--representation", "raw") == 0
    assert _build(tmp_path / "layer", refs, "--shard", "2/2", "--layer", "1") == 0
    assert _build(tmp_path / "three", refs, "--shard", "2/3") == 0
    s1 = str(tmp_path / "s1")
    cases = {
        "missing shard(s) 2": [s1],
        "given twice": [s1, s1, str(tmp_path / "s2")],
        "probes": [s1, str(tmp_path / "seed")],
        "representation": [s1, str(tmp_path / "rep")],
        "layer": [s1, str(tmp_path / "layer")],
        "shard_count": [s1, str(tmp_path / "three")],
        "not a gate baseline shard": [s1, str(tmp_path)],
    }
    for needle, dirs in cases.items():
        capsys.readouterr()
        assert main(["baseline", "merge", *dirs, "--out", str(tmp_path / "out")]) == 2, needle
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("gate: error:"), err
        assert needle in err, (needle, err)
    # The real CLI, as CI runs it: exit 2 and one line.
    proc = run_gate("baseline", "merge", s1, "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, "missing shard(s) 2 of 2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["0/3", "4/3", "a/b", "2", "9/9"])
def test_bad_shard_values_exit_2(family: list[str], tmp_path: Path, bad: str) -> None:
    assert _build(tmp_path / "s", family[:6], "--shard", bad) == 2


def _scan(model: str, baseline: Path, report: Path, *extra: str) -> int:
    return main(
        [
            "scan",
            model,
            "--baseline",
            str(baseline),
            "--quiet",
            "--report-dir",
            str(report),
            "--format",
            "markdown,json",
            *extra,
        ]
    )


def test_activation_cache_hit_skips_forward_and_gives_identical_reports(
    family: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gate.models import torchscript

    base = tmp_path / "base"
    cache = tmp_path / "cache"
    assert _build(base, family[:6]) == 0
    cand = family[6]
    assert _scan(cand, base, tmp_path / "r0", "--no-cache") in (0, 1)
    assert not cache.exists()
    assert _scan(cand, base, tmp_path / "r1", "--cache-dir", str(cache)) in (0, 1)
    entries = list(cache.rglob("*.npy"))
    assert entries, "the first scan writes the cache"

    def no_forward(*args: object, **kwargs: object) -> None:
        raise AssertionError("forward ran although the activations were cached")

    with monkeypatch.context() as mp:
        mp.setattr(torchscript.TorchScriptModel, "forward", no_forward)
        assert _scan(
            cand,
            base,
            tmp_path / "r2",
            "--cache-dir",
            str(cache),
            "--policy",
            "strict",
            "--threads",
            "1",
        ) in (0, 1)
    timing = json.loads((tmp_path / "r2" / "timing.json").read_text())
    assert timing["cache"] == {"hits": 1, "misses": 0}
    assert set(timing["seconds"]) >= {"load", "extract", "detect", "report", "total"}
    # Same policy, cached or not: byte-identical report.json; timings stay out of it.
    assert _scan(cand, base, tmp_path / "r3", "--cache-dir", str(cache)) in (0, 1)
    report0 = (tmp_path / "r0" / "report.json").read_bytes()
    assert (tmp_path / "r1" / "report.json").read_bytes() == report0
    assert (tmp_path / "r3" / "report.json").read_bytes() == report0
    assert b"seconds" not in report0

    # A corrupt entry is ignored and recomputed (and rewritten).
    for entry in entries:
        entry.write_bytes(b"\x93NUMPY garbage")
    assert _scan(cand, base, tmp_path / "r4", "--cache-dir", str(cache)) in (0, 1)
    assert (tmp_path / "r4" / "report.json").read_bytes() == report0
    timing = json.loads((tmp_path / "r4" / "timing.json").read_text())
    assert timing["cache"] == {"hits": 0, "misses": 1}


def test_baseline_build_uses_the_cache(family: list[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ["--cache-dir", str(cache)]
    refs = family[:4]
    assert _build(tmp_path / "a", refs) == 0
    assert (
        main(
            [
                "baseline",
                "build",
                *refs,
                "--out",
                str(tmp_path / "b"),
                "--input-shape",
                SHAPE,
                "--quiet",
                *args,
            ]
        )
        == 0
    )
    assert len({p.parent for p in cache.rglob("*.npy")}) == len(refs)
    assert (
        main(
            [
                "baseline",
                "build",
                *refs,
                "--out",
                str(tmp_path / "c"),
                "--input-shape",
                SHAPE,
                "--quiet",
                *args,
            ]
        )
        == 0
    )
    for d in ("b", "c"):
        assert (tmp_path / d / "baseline.json").read_bytes() == (
            tmp_path / "a" / "baseline.json"
        ).read_bytes()


def test_threads_option_is_validated(family: list[str], tmp_path: Path) -> None:
    assert main(["--threads", "0", "policy", "show"]) == 2
    assert main(["scan", family[0], "--baseline", str(tmp_path), "--threads", "x"]) == 2


def test_progress_non_tty_is_silent_within_the_interval() -> None:
    out = io.StringIO()
    with Progress(3, "refs", stream=out, interval=60.0, tty=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_progress_non_tty_logs_lines() -> None:
    out = io.StringIO()
    bar = Progress(3, "refs", unit="models", stream=out, interval=0.0, tty=False)
    for _ in range(3):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("gate: refs: 1/3 models")
    assert lines[-1].startswith("gate: refs: 3/3 models (100%)")
    assert "\r" not in out.getvalue()


def test_progress_tty_bar_and_quiet() -> None:
    out = io.StringIO()
    with Progress(4, "extract", stream=out, tty=True) as bar:
        bar.update(4)
    text = out.getvalue()
    assert text.startswith("\rextract [") and "4/4" in text and "ETA 0s" in text
    assert text.endswith("\n")
    quiet = io.StringIO()
    with Progress(4, "extract", stream=quiet, tty=True, quiet=True) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""


def test_build_progress_goes_to_stderr_unless_quiet(family: list[str], tmp_path: Path) -> None:
    common = ["baseline", "build", *family[:3], "--input-shape", SHAPE, "--no-cache"]
    loud = run_gate(*common, "--out", str(tmp_path / "a"), env={"GATE_PROGRESS_INTERVAL": "0"})
    assert loud.returncode == 0, loud.stderr
    assert "gate: fingerprinting references: 3/3 models" in loud.stderr
    quiet = run_gate(
        *common, "--out", str(tmp_path / "b"), "--quiet", env={"GATE_PROGRESS_INTERVAL": "0"}
    )
    assert "fingerprinting" not in quiet.stderr
    # By default a run shorter than the 10 s interval prints no progress in CI logs.
    short = run_gate(*common, "--out", str(tmp_path / "c"))
    assert "fingerprinting" not in short.stderr


def test_help_and_version_import_no_heavy_modules() -> None:
    code = (
        "import sys, io, contextlib\n"
        "from gate.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    main([sys.argv[1]])\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))\n"
    )
    for flag in ("--help", "--version"):
        proc = subprocess.run(
            [sys.executable, "-c", code, flag], capture_output=True, text=True, cwd=REPO
        )
        assert proc.stdout.strip() == "[]", (flag, proc.stdout, proc.stderr)


@pytest.mark.parametrize(
    ("example", "schema"),
    [
        ("github-sharded-baseline.yml", "vendor.github-workflows"),
        ("gitlab-sharded-baseline.yml", "vendor.gitlab-ci"),
        ("github-split-ac.yml", "vendor.github-workflows"),
        ("gitlab-split-ac.yml", "vendor.gitlab-ci"),
    ],
)
def test_sharding_examples_are_valid_ci_files(example: str, schema: str) -> None:
    tool = shutil.which("check-jsonschema") or str(
        Path(sys.executable).with_name("check-jsonschema")
    )
    if not Path(tool).is_file():
        pytest.skip("check-jsonschema is not installed")
    proc = subprocess.run(
        [tool, "--builtin-schema", schema, str(REPO / "examples" / example)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_batches_are_bounded_by_memory_and_give_the_same_activations(
    family: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small GATE_BATCH_MEMORY_MB shrinks the batches (measured on the first rows) without
    changing what is extracted; AC streaming goes through the same batching."""
    import numpy as np

    from gate.ac.extract import stream_activations
    from gate.activations import extract
    from gate.models import load_model

    model = load_model(family[0])
    layer = model.default_layer()
    x = np.random.default_rng(0).random((300, 1, 8, 8), dtype=np.float32)
    sizes: list[int] = []
    forward = model.forward

    def counting(batch: np.ndarray, layers: list[str]) -> object:
        sizes.append(len(batch))
        return forward(batch, layers)

    monkeypatch.setattr(model, "forward", counting)
    big = extract(model, x, [layer])
    assert sizes == [4, 256, 40]  # measured on 4 rows, then the default batch size
    sizes.clear()
    # One row holds 16 activations + 5 outputs as float32 = 84 bytes: 0.01 MiB is 124 rows.
    monkeypatch.setenv("GATE_BATCH_MEMORY_MB", "0.01")
    small = extract(model, x, [layer])
    assert sizes[0] == 4 and max(sizes) == 124 and sum(sizes) == 300
    np.testing.assert_allclose(small.activations[layer], big.activations[layer], rtol=1e-5)
    np.testing.assert_allclose(small.outputs, big.outputs, rtol=1e-5, atol=1e-6)
    sizes.clear()
    streamed = stream_activations(model, x, layer)
    assert max(sizes) == 124
    np.testing.assert_allclose(streamed.activations, big.activations[layer], rtol=1e-5)
    assert streamed.path is not None
    tmp = Path(streamed.path).parent
    del streamed
    shutil.rmtree(tmp, ignore_errors=True)
