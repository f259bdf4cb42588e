"""Gate in every pipeline: exit codes, GitHub Actions integration, schemas, packaging, the
Action/Docker contract and the CI templates."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gate.schemas import SCHEMAS, policy_schema, render, schema_dir
from tests.conftest import REPO, run_gate

GITHUB_VARS = ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY")


def scan(
    demo_dir: Path, model: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_gate(
        "scan",
        str(model),
        "--baseline",
        str(demo_dir / "baseline"),
        "--report-dir",
        str(out),
        "--quiet",
        *extra,
        env=env,
    )


@pytest.fixture(autouse=True)
def _no_github_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in GITHUB_VARS:
        monkeypatch.delenv(var, raising=False)


# --- exit codes -------------------------------------------------------------------------


def test_exit_0_pass(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    proc = scan(demo_dir, demo_models["clean"], tmp_path, "--policy", "default")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] in {"pass", "warn"}


def test_exit_0_warn_audit(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    proc = scan(demo_dir, demo_models["backdoored"], tmp_path, "--policy", "audit")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "report.json").read_text())["verdict"] == "warn"


def test_exit_1_fail(demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path) -> None:
    proc = scan(demo_dir, demo_models["backdoored"], tmp_path, "--format", "junit")
    assert proc.returncode == 1, proc.stderr
    assert (tmp_path / "junit.xml").is_file()
    assert not (tmp_path / "report.json").exists()


@pytest.mark.parametrize("bad", ["--fail-alpha=2", "--fail-alpha=abc", "--format=pdf"])
def test_exit_2_usage(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path, bad: str
) -> None:
    proc = scan(demo_dir, demo_models["clean"], tmp_path, bad)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "report.json").exists()


def test_fail_alpha_overrides_policy(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    # A fail alpha below any reachable p-value lets the backdoored model through (with a warning).
    proc = scan(demo_dir, demo_models["backdoored"], tmp_path, "--fail-alpha", "1e-12")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    fp_check = next(c for c in report["checks"] if c["name"] == "fingerprint")
    assert fp_check["status"] == "warn"


def test_empty_inputs_mean_not_given(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    proc = run_gate(
        "scan",
        str(demo_models["backdoored"]),
        f"--baseline={demo_dir / 'baseline'}",
        "--data=",
        "--policy=",
        "--format=",
        "--fail-alpha=",
        "--layer=",
        f"--report-dir={tmp_path}",
        "--quiet",
    )
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["policy"] == "default" and report["activation_clustering"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "report.json",
        "summary.md",
        "timing.json",
    ]


# --- GitHub Actions -----------------------------------------------------------------------


def test_github_env_writes_summary_outputs_annotations(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    out, summary, outputs = tmp_path / "rep", tmp_path / "summary", tmp_path / "outputs"
    outputs.write_text("earlier=1\n")
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_OUTPUT": str(outputs),
    }
    proc = scan(demo_dir, demo_models["backdoored"], out, env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "report.json").read_text())
    lines = outputs.read_text().splitlines()
    assert lines[0] == "earlier=1"
    values = dict(line.split("=", 1) for line in lines[1:])
    assert values == {
        "verdict": "fail",
        "anomaly-score": f"{report['fingerprint']['anomaly_score']:.6g}",
        "report-dir": str(out),
    }
    assert summary.read_text() == (out / "summary.md").read_text()
    # Everything runs inside ::stop-commands::TOKEN; gate's annotations follow ::TOKEN::.
    commands = [line for line in proc.stdout.splitlines() if line.startswith("::")]
    token = commands[0].removeprefix("::stop-commands::")
    assert len(token) == 32 and commands[1] == f"::{token}::", commands[:2]
    annotations = commands[2:]
    model = str(demo_models["backdoored"])
    expected = [
        ("error" if c["status"] == "fail" else "warning", c["message"])
        for c in report["checks"]
        if c["status"] in {"fail", "warn"}
    ]
    assert len(annotations) == len(expected)
    for line, (kind, message) in zip(annotations, expected, strict=True):
        assert line.startswith(f"::{kind} file={model},title=")
        assert line.endswith(f"::{message}")


def test_no_github_env_writes_nothing(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in GITHUB_VARS}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gate",
            "scan",
            str(demo_models["backdoored"]),
            "--baseline",
            str(demo_dir / "baseline"),
            "--report-dir",
            str(tmp_path / "rep"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""
    # Only the report directory: the activation cache is never in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_step_summary_is_truncated(tmp_path: Path) -> None:
    from gate.ci.github import STEP_SUMMARY_LIMIT, truncated

    data = truncated("é" * STEP_SUMMARY_LIMIT)
    assert len(data) < STEP_SUMMARY_LIMIT
    assert data.decode("utf-8").endswith("see report.json)_\n")


def test_annotation_escaping() -> None:
    from gate.ci.github import escape_data as _escape_data
    from gate.ci.github import escape_property as _escape_property

    assert _escape_data("50% a\nb") == "50%25 a%0Ab"
    assert _escape_property("a:b,c") == "a%3Ab%2Cc"


# --- schemas and policies -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schemas_are_current(name: str) -> None:
    """Regenerate with `python -m gate.schemas` after changing the models."""
    assert (schema_dir() / name).read_text(encoding="utf-8") == render(SCHEMAS[name]())


def test_policy_schema_command_and_shipped_policies() -> None:
    proc = run_gate("policy", "schema")
    assert proc.returncode == 0, proc.stderr
    schema = json.loads(proc.stdout)
    assert schema == policy_schema()
    for path in sorted((REPO / "policies").glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"fingerprint": {"fail_alfa": 0.1}}, schema)


def test_report_schema_validates_a_report(
    demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    scan(demo_dir, demo_models["clean"], tmp_path)
    schema = json.loads((schema_dir() / "report.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "report.json").read_text()), schema)


def test_wheel_ships_policies_templates_schemas(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (REPO / "policies").glob("*.yaml")}
    assert shipped and {f"gate/policies/{n}" for n in shipped} <= names
    assert {
        "gate/report/templates/summary.md.j2",
        "gate/schemas/policy.schema.json",
        "gate/schemas/report.schema.json",
        "gate/py.typed",
    } <= names


# --- linters on the CI files -------------------------------------------------------------------


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def test_hadolint_dockerfile() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ("vendor.github-workflows", "examples/github-workflow.yml"),
        ("vendor.gitlab-ci", "examples/gitlab-ci.yml"),
        ("vendor.github-actions", "action.yml"),
    ],
)
def test_check_jsonschema(schema: str, path: str) -> None:
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", schema, path],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_examples_wire_the_reports() -> None:
    gh = yaml.safe_load((REPO / "examples/github-workflow.yml").read_text())
    steps = gh["jobs"]["scan"]["steps"]
    assert any(s.get("uses", "").startswith("github/codeql-action/upload-sarif") for s in steps)
    assert any(s.get("uses", "").startswith("actions/upload-artifact") for s in steps)
    gl = yaml.safe_load((REPO / "examples/gitlab-ci.yml").read_text())
    reports = gl[".gate-scan"]["artifacts"]["reports"]
    assert reports == {
        "junit": "gate-report/junit.xml",
        "codequality": "gate-report/gl-code-quality.json",
        "dotenv": "gate-report/gate.env",
    }


# --- the Action/Docker contract -------------------------------------------------------------


def entrypoint() -> list[str]:
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            value: list[str] = json.loads(line.removeprefix("ENTRYPOINT").strip())
            return value
    raise AssertionError("Dockerfile has no ENTRYPOINT")


def action_args(inputs: dict[str, str]) -> list[str]:
    """action.yml's args with ${{ inputs.X }} substituted as the runner does (defaults filled)."""
    action: dict[str, Any] = yaml.safe_load((REPO / "action.yml").read_text())
    assert action["runs"]["using"] == "docker" and action["runs"]["image"] == "Dockerfile"
    values = {k: str(v.get("default", "")) for k, v in action["inputs"].items()}
    values.update(inputs)
    args = []
    for arg in action["runs"]["args"]:
        for name, value in values.items():
            arg = arg.replace("${{ inputs." + name + " }}", value)
        assert "${{" not in arg, arg
        args.append(arg)
    return args


def test_action_inputs_and_outputs() -> None:
    action = yaml.safe_load((REPO / "action.yml").read_text())
    assert set(action["inputs"]) == {
        "model",
        "baseline",
        "data",
        "input-shape",
        "trigger-budget",
        "policy",
        "formats",
        "report-dir",
        "fail-threshold",
    }
    assert set(action["outputs"]) == {"verdict", "anomaly-score", "report-dir"}
    assert action["name"] and action["description"] and action["branding"]


@pytest.fixture(scope="session")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv (no system site-packages) with gate installed as the image installs it."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "-c",
            str(REPO / "constraints.txt"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return venv


@pytest.mark.slow
def test_action_contract_in_fresh_venv(
    fresh_venv: Path, demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    workspace = tmp_path / "workspace"  # plays /github/workspace
    (workspace / "models").mkdir(parents=True)
    shutil.copy(demo_models["backdoored"], workspace / "models" / "candidate.pt")
    shutil.copytree(demo_dir / "baseline", workspace / "models" / "baseline")
    outputs, summary = tmp_path / "outputs", tmp_path / "summary"
    argv = entrypoint() + action_args(
        {
            "model": "models/candidate.pt",
            "baseline": "models/baseline",
            "formats": "markdown,json,sarif,junit,codequality",
        }
    )
    argv[0] = str(fresh_venv / "bin" / argv[0])
    env = {
        "PATH": f"{fresh_venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GITHUB_ACTIONS": "true",
        "GITHUB_OUTPUT": str(outputs),
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    proc = subprocess.run(argv, cwd=workspace, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, (shlex.join(argv), proc.stdout, proc.stderr)
    report_dir = workspace / "gate-report"
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(
        [
            "summary.md",
            "report.json",
            "gate.sarif",
            "junit.xml",
            "gl-code-quality.json",
            "timing.json",
        ]
    )
    assert "verdict=fail" in outputs.read_text().splitlines()
    assert "report-dir=gate-report" in outputs.read_text().splitlines()
    assert summary.read_text().startswith("## ")
    assert "::error file=models/candidate.pt," in proc.stdout
    # the installed package finds its shipped policies without the source tree
    show = subprocess.run(
        [argv[0], "policy", "show", "strict"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert show.returncode == 0 and "name: strict" in show.stdout, show.stderr


# --- the image (needs a Docker daemon) --------------------------------------------------------


@pytest.fixture(scope="session")
def docker_image() -> str:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # no daemon, no socket, no permission
        pytest.skip(f"no Docker daemon: docker.from_env().ping() failed ({exc})")
    image, _ = client.images.build(path=str(REPO), tag="gate:test", rm=True)
    size = image.attrs["Size"]
    assert size < 1.2 * 1024**3, f"image is {size / 1024**3:.2f} GiB (target < 1.2 GB)"
    return "gate:test"


@pytest.mark.slow
def test_docker_image_scans_offline(
    docker_image: str, demo_dir: Path, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    import docker

    workspace = tmp_path / "workspace"
    (workspace / "models").mkdir(parents=True)
    shutil.copy(demo_models["backdoored"], workspace / "models" / "candidate.pt")
    shutil.copytree(demo_dir / "baseline", workspace / "models" / "baseline")
    os.chmod(workspace, 0o777)  # the image runs as uid 1001
    client = docker.from_env()
    container = client.containers.run(
        docker_image,
        action_args({"model": "models/candidate.pt", "baseline": "models/baseline"}),
        volumes={str(workspace): {"bind": "/github/workspace", "mode": "rw"}},
        network_disabled=True,
        detach=True,
    )
    try:
        result = container.wait(timeout=600)
        logs = container.logs().decode()
    finally:
        container.remove(force=True)
    assert result["StatusCode"] == 1, logs
    assert (workspace / "gate-report" / "gate.sarif").is_file()
    assert container.attrs["Config"]["User"] == "1001:1001"
