"""Red team (issue 13): cache poisoning, workflow-command injection through names, formats
that a file name could break, a check that analysed nothing, and bad --report-dir values.

Each test attacks the real CLI (a subprocess) as an attacker controlling the checkout would.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import assert_one_line_error, run_gate, tiny_cnn

SHAPE = "1,8,8"
# What a hostile file name holds: a newline that starts a workflow command, C0 and ESC.
EVIL = "m\n::set-output name=verdict::pass\n::add-mask::x\x01\x1b[31m::warning::owned"


def _save(net: Any, path: Path) -> Path:
    import torch

    torch.jit.save(torch.jit.script(net), str(path))
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six random-init references, a clean candidate, a failing one and their baseline."""
    d = tmp_path_factory.mktemp("redteam")
    refs = [_save(tiny_cnn(s), d / f"ref{s}.pt") for s in range(6)]
    clean = _save(tiny_cnn(6), d / "clean.pt")
    bad = _save(tiny_cnn(7, shift=25.0), d / "bad.pt")
    base = d / "baseline"
    proc = run_gate(
        "baseline",
        "build",
        *map(str, refs),
        "--out",
        str(base),
        "--input-shape",
        SHAPE,
        "--quiet",
        "--no-cache",
    )
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "clean": clean, "bad": bad, "baseline": base}


def _env(trusted: Path, **extra: str) -> dict[str, str]:
    return {"XDG_CACHE_HOME": str(trusted), "GATE_CACHE_SECRET": "", **extra}


def _timing(report_dir: Path) -> dict[str, Any]:
    return dict(json.loads((report_dir / "timing.json").read_text()))


def _old_key(version: str, *parts: str) -> str:
    """The pre-issue-13 cache key: a plain sha256 anyone can compute offline."""
    h = hashlib.sha256()
    for part in (version, *parts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _plant(root: Path, key: str, entry: Path) -> None:
    dest = root / key[:2] / key
    dest.mkdir(parents=True, exist_ok=True)
    for f in entry.iterdir():
        shutil.copyfile(f, dest / f.name)


def test_planted_cache_entries_are_never_used(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gate.activations import ActivationCache, cache_secret
    from gate.fingerprint.baseline import load_baseline
    from gate.models.base import ForwardResult

    base, bad, clean = family["baseline"], family["bad"], family["clean"]
    scan = ["--baseline", str(base), "--quiet"]
    trusted = tmp_path / "trusted-home-cache"
    ref = run_gate("scan", str(bad), *scan, "--report-dir", str(tmp_path / "r0"), "--no-cache")
    assert ref.returncode == 1, ref.stderr  # without any cache the bad model fails
    truth = (tmp_path / "r0" / "report.json").read_bytes()
    sha = json.loads(truth)["model"]["sha256"]
    assert sha == hashlib.sha256(bad.read_bytes()).hexdigest()  # known to the attacker
    b = load_baseline(base)
    probes, layer = b.probes.sha256, b.manifest.layer

    # The attacker runs gate on the clean model with a secret of their own, to get its
    # activations as cache files, then plants them under every key they can compute.
    attacker = tmp_path / "attacker"
    env_a = _env(trusted, GATE_CACHE_SECRET="attacker's own secret")
    proc = run_gate(
        "scan",
        str(clean),
        *scan,
        "--report-dir",
        str(tmp_path / "ra"),
        "--cache-dir",
        str(attacker),
        env=env_a,
    )
    assert proc.returncode == 0, proc.stderr
    (entry,) = [p.parent for p in attacker.rglob("outputs.npy")]
    acts = np.load(entry / "layer-0.npy")
    clean_result = ForwardResult(outputs=np.load(entry / "outputs.npy"), activations={layer: acts})

    # The plant is real poison: with the attacker's secret trusted, the bad model passes.
    monkeypatch.setenv("GATE_CACHE_SECRET", env_a["GATE_CACHE_SECRET"])
    secret_a = cache_secret()
    monkeypatch.delenv("GATE_CACHE_SECRET")
    assert secret_a is not None
    own = ActivationCache(attacker, secret_a)
    own.put(own.key(sha, probes, [layer]), clean_result, [layer])
    poisoned = run_gate(
        "scan",
        str(bad),
        *scan,
        "--report-dir",
        str(tmp_path / "rp"),
        "--cache-dir",
        str(attacker),
        env=env_a,
    )
    assert poisoned.returncode == 0, poisoned.stderr
    assert _timing(tmp_path / "rp")["cache"] == {"hits": 1, "misses": 0}

    checkout = tmp_path / "checkout"
    inside = checkout / "cache"
    for version in ("3", "4"):
        key = _old_key(version, sha, probes, layer)
        _plant(checkout / ".gate-cache" / "activations", key, entry)  # the old default
        _plant(inside, key, entry)
    # A guessed secret: the attacker commits a key file of their own, and entries (with
    # their MACs) made with it, into the explicit --cache-dir and into a cache root in
    # the checkout (as when $HOME or $XDG_CACHE_HOME points into it).
    guessed = b"\x07" * 32
    for root, entries in ((inside, inside), (checkout / ".cache" / "gate", None)):
        root.mkdir(parents=True, exist_ok=True)
        (root / "cache.key").write_bytes(guessed)
        (root / "cache.key").chmod(0o644)  # what a git checkout gives
        fake = ActivationCache(entries or root / "activations", guessed)
        fake.put(fake.key(sha, probes, [layer]), clean_result, [layer])
    runs = {
        "default cache, cwd = checkout": ([], _env(trusted)),
        "--cache-dir inside the checkout": (["--cache-dir", str(inside)], _env(trusted)),
        "cache root inside the checkout": ([], _env(checkout / ".cache")),
    }
    for i, (what, (extra, env)) in enumerate(runs.items()):
        out = tmp_path / f"r{i + 1}"
        proc = run_gate(
            "scan", str(bad), *scan, "--report-dir", str(out), *extra, env=env, cwd=checkout
        )
        assert proc.returncode == 1, (what, proc.stderr)
        assert (out / "report.json").read_bytes() == truth, what
        cache = _timing(out)["cache"]
        assert cache is None or cache["hits"] == 0, (what, cache)
    # The checkout's key file (mode 0644) was refused, not adopted or rewritten.
    assert (checkout / ".cache" / "gate" / "cache.key").read_bytes() == guessed

    # The trusted cache still works, and an entry edited in place is not used.
    for name in ("r4", "r5"):
        proc = run_gate(
            "scan",
            str(bad),
            *scan,
            "--report-dir",
            str(tmp_path / name),
            env=_env(trusted),
            cwd=checkout,
        )
        assert proc.returncode == 1, proc.stderr
    assert _timing(tmp_path / "r5")["cache"] == {"hits": 1, "misses": 0}
    key_file = trusted / "gate" / "cache.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    (genuine,) = [p.parent for p in (trusted / "gate").rglob("outputs.npy")]
    for f in ("layer-0.npy", "outputs.npy"):
        shutil.copyfile(entry / f, genuine / f)  # the clean model's activations, same name
    proc = run_gate(
        "scan",
        str(bad),
        *scan,
        "--report-dir",
        str(tmp_path / "r6"),
        env=_env(trusted),
        cwd=checkout,
    )
    assert proc.returncode == 1, proc.stderr
    assert _timing(tmp_path / "r6")["cache"] == {"hits": 0, "misses": 1}
    assert (tmp_path / "r6" / "report.json").read_bytes() == truth
    assert not (checkout / "gate-report").exists()


def _check_lines(text: str, allowed: set[str]) -> None:
    """No line of ``text`` is a workflow command except the ``allowed`` ones."""
    for line in text.splitlines():
        if line.lstrip().startswith("::"):
            assert line in allowed, line


def _gate_commands(stdout: str) -> tuple[set[str], list[str]]:
    """gate's stop/resume markers and the annotations printed after the resume."""
    lines = stdout.splitlines()
    assert lines[0].startswith("::stop-commands::"), lines[:3]
    token = lines[0].split("::")[2]
    assert len(token) == 32
    resume = lines.index(f"::{token}::")
    after = lines[resume + 1 :]
    assert all(a.startswith(("::error ", "::warning ")) for a in after), after
    return {lines[0], f"::{token}::", *after}, after


def test_names_cannot_inject_workflow_commands(family: dict[str, Path], tmp_path: Path) -> None:
    evil_dir = tmp_path / "repo"
    evil_dir.mkdir()
    model = evil_dir / f"{EVIL}.pt"
    shutil.copyfile(family["bad"], model)
    out, summary = tmp_path / "gh-output", tmp_path / "gh-summary"
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(out),
        "GITHUB_STEP_SUMMARY": str(summary),
        "XDG_CACHE_HOME": str(tmp_path / "c"),
    }
    rdir = tmp_path / f"rep{EVIL}"
    proc = run_gate(
        "scan",
        str(model),
        "--baseline",
        str(family["baseline"]),
        "--report-dir",
        str(rdir),
        env=env,
    )
    assert proc.returncode == 1, proc.stderr
    allowed, annotations = _gate_commands(proc.stdout)
    assert annotations and all("%0A" in a for a in annotations)  # gate's own: escaped
    _check_lines(proc.stdout, allowed)
    _check_lines(proc.stderr, set())
    _check_lines(summary.read_text(), set())
    assert "\\x1b[31m" in proc.stdout and "\x1b" not in proc.stdout
    outputs = out.read_text().splitlines()
    assert [line.split("=")[0] for line in outputs] == ["verdict", "anomaly-score", "report-dir"]
    assert outputs[0] == "verdict=fail"

    # The same name in an error message: one line, inside the wrap under GitHub Actions.
    args = ("scan", str(model), "--baseline", str(tmp_path / f"none{EVIL}"))
    err = run_gate(*args, env=env)
    assert err.returncode == 2 and len(err.stderr.splitlines()) == 1, err.stderr
    allowed, annotations = _gate_commands(err.stdout)
    assert not annotations
    _check_lines(err.stdout + err.stderr, allowed)
    assert_one_line_error(run_gate(*args), "\\x0a::set-output")  # outside Actions: no wrap


def test_onnx_layer_names_are_escaped(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = f"h{EVIL}"
    w1 = numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(6, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["pre"]),
            helper.make_node("Relu", ["pre"], [hidden]),
            helper.make_node("MatMul", [hidden, "w2"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [w1, w2],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    x = rng.normal(size=(60, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(60) % 3)
    env = {"GITHUB_ACTIONS": "true", "XDG_CACHE_HOME": str(tmp_path / "c")}
    runs = [
        run_gate("inspect", str(path), "--input-shape", "8", env=env),
        run_gate(
            "ac",
            str(path),
            "--data",
            str(tmp_path / "d.npz"),
            "--layer",
            hidden,
            "--report-dir",
            str(tmp_path / "r"),
            "--format",
            "markdown,json,junit",
            env=env,
        ),
    ]
    for proc in runs:
        assert proc.returncode in (0, 1), proc.stderr
        allowed, _ = _gate_commands(proc.stdout)
        _check_lines(proc.stdout + proc.stderr, allowed)
    assert "hm\\x0a::set-output" in runs[0].stdout  # listed, escaped
    ET.fromstring((tmp_path / "r" / "junit.xml").read_bytes())
    assert (
        json.loads((tmp_path / "r" / "report.json").read_text())["activation_clustering"]["layer"]
        == hidden
    )  # report.json keeps the exact name (JSON escapes it)


def test_every_format_is_well_formed_for_any_file_name(
    family: dict[str, Path], tmp_path: Path
) -> None:
    name = EVIL + "\x00x\x7f\ufffe\u202e\u2028::"  # NUL, DEL, non-character, bidi, ...
    try:
        model = tmp_path / f"{name.replace(chr(0), '')}.pt"
        shutil.copyfile(family["bad"], model)
    except (UnicodeEncodeError, OSError):
        pytest.skip("the filesystem refuses such names")
    rdir = tmp_path / "r\udcff"  # not UTF-8: a surrogate under surrogateescape
    formats = "markdown,json,sarif,junit,codequality"
    proc = run_gate(
        "scan",
        str(model),
        "--baseline",
        str(family["baseline"]),
        "--report-dir",
        str(rdir),
        "--format",
        formats,
        env={"XDG_CACHE_HOME": str(tmp_path / "c")},
    )
    assert proc.returncode == 1, proc.stderr
    ET.fromstring((rdir / "junit.xml").read_bytes())  # well-formed XML 1.0
    for f in ("report.json", "gate.sarif", "gl-code-quality.json"):
        json.loads((rdir / f).read_bytes().decode("utf-8"))
    report = json.loads((rdir / "report.json").read_text())
    assert report["model"]["path"] == str(model)  # the exact name, JSON-escaped
    md = (rdir / "summary.md").read_text()
    for text in (md, proc.stdout, proc.stderr):
        _check_lines(text, set())
        assert not any(ch in text for ch in "\x00\x01\x1b\x7f\u202e\u2028")


def test_ac_that_analysed_nothing_is_not_a_pass(family: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    # 5 classes of 8 samples: fewer than the 22 the default n_components needs per class.
    x = rng.normal(size=(40, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "small.npz", x=x, y=np.arange(40) % 5)
    env = {"XDG_CACHE_HOME": str(tmp_path / "c")}
    formats = "markdown,json,sarif,junit,codequality"
    common = ["--data", str(tmp_path / "small.npz"), "--format", formats, "--quiet"]
    proc = run_gate(
        "ac", str(family["clean"]), *common, "--report-dir", str(tmp_path / "a"), env=env
    )
    assert proc.returncode == 1, proc.stderr  # required by `gate ac`: not analysed = fail
    rdir = tmp_path / "a"
    report = json.loads((rdir / "report.json").read_text())
    (check,) = [c for c in report["checks"] if c["name"] == "activation_clustering"]
    assert check["status"] == "not_analysed" and check["severity"] == "fail", check
    assert "too small to cluster" in check["message"]
    assert report["verdict"] == "fail"
    assert "not analysed" in (rdir / "summary.md").read_text()
    sarif = json.loads((rdir / "gate.sarif").read_text())
    assert [r["level"] for r in sarif["runs"][0]["results"]] == ["error"]
    assert json.loads((rdir / "gl-code-quality.json").read_text())[0]["severity"] == "critical"
    junit = ET.fromstring((rdir / "junit.xml").read_bytes())
    assert junit.get("failures") == "1" and junit.find(".//failure") is not None

    # The audit policy makes it a warning; scan under default (AC not required) reports it
    # without changing the fingerprint's verdict; strict (AC required) fails.
    audit = run_gate(
        "ac",
        str(family["clean"]),
        *common,
        "--policy",
        "audit",
        "--report-dir",
        str(tmp_path / "b"),
        env=env,
    )
    assert audit.returncode == 0, audit.stderr
    assert json.loads((tmp_path / "b" / "report.json").read_text())["verdict"] == "warn"
    verdicts = {}
    for policy in ("default", "strict"):
        out = tmp_path / f"s-{policy}"
        proc = run_gate(
            "scan",
            str(family["clean"]),
            "--baseline",
            str(family["baseline"]),
            *common,
            "--policy",
            policy,
            "--report-dir",
            str(out),
            env=env,
        )
        report = json.loads((out / "report.json").read_text())
        (check,) = [c for c in report["checks"] if c["name"] == "activation_clustering"]
        assert check["status"] == "not_analysed", check
        verdicts[policy] = (proc.returncode, report["verdict"])
    fp_default = verdicts["default"][1]
    assert fp_default in ("pass", "warn")  # the clean model's fingerprint decides alone
    assert verdicts["strict"] == (1, "fail")


def test_report_dir_that_is_a_file_or_unwritable(family: dict[str, Path], tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    scan = ["scan", str(family["clean"]), "--baseline", str(family["baseline"]), "--no-cache"]
    assert_one_line_error(run_gate(*scan, "--report-dir", str(a_file)), "is a file")
    assert_one_line_error(run_gate(*scan, "--report-dir", str(a_file / "sub")), "is a file")
    assert_one_line_error(
        run_gate("ac", str(family["clean"]), "--data", str(a_file), "--report-dir", str(a_file)),
        "is a file",
    )
    # /proc refuses new directories even to root, whose permission bits are ignored.
    assert_one_line_error(run_gate(*scan, "--report-dir", "/proc/gate-report"), "cannot write")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(run_gate(*scan, "--report-dir", str(locked / "r")), "cannot write")
