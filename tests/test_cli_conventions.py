"""CLI conventions and report polish (issue 16): -o, help on every option, completion,
SARIF rule metadata, JUnit warnings, the step summary's links, file modes, gate.ci."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, assert_one_line_error, run_gate, tiny_cnn
from tests.test_formats import check_sarif, fixed_report

SHAPE = "1,8,8"


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Six references (so baseline_size warns), a failing candidate, their baseline."""
    import torch

    d = tmp_path_factory.mktemp("conventions")
    paths = {}
    for name, seed, shift in [*((f"ref{s}", s, 0.0) for s in range(6)), ("bad", 7, 25.0)]:
        paths[name] = d / f"{name}.pt"
        torch.jit.save(torch.jit.script(tiny_cnn(seed, shift)), str(paths[name]))
    base = d / "baseline"
    refs = [str(paths[f"ref{s}"]) for s in range(6)]
    proc = run_gate("baseline", "build", *refs, "--out", str(base), "--input-shape", SHAPE,
                    "--quiet", "--no-cache")
    assert proc.returncode == 0, proc.stderr
    return {"dir": d, "bad": paths["bad"], "baseline": base}


def _scan(family: dict[str, Path], *extra: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run_gate(
        "scan", str(family["bad"]), "--baseline", str(family["baseline"]), "--no-cache",
        *extra, **kw,
    )


# --- -o / --output ---------------------------------------------------------------------------


def test_output_dash_pipes_only_json(family: dict[str, Path], tmp_path: Path) -> None:
    rdir = tmp_path / "rep"
    proc = _scan(family, "--format", "json", "-o", "-", "--report-dir", str(rdir))
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the report on stdout
    assert doc["verdict"] == "fail" and doc["model"]["path"] == str(family["bad"])
    assert "gate: **FAIL**" in proc.stderr  # the human summary went to stderr
    assert not (rdir / "report.json").exists()  # -o replaces the format's file...
    assert (rdir / "timing.json").is_file()  # ...the side files stay in --report-dir


def test_output_dash_under_github_keeps_stdout_clean(
    family: dict[str, Path], tmp_path: Path
) -> None:
    env = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(tmp_path / "out")}
    proc = _scan(family, "--format=json", "--output=-", "--report-dir", str(tmp_path), env=env)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["verdict"] == "fail"
    lines = proc.stderr.splitlines()  # the stop-commands wrap and the annotations moved too
    assert lines[0].startswith("::stop-commands::")
    assert any(line.startswith("::error file=") for line in lines)


def test_output_file_and_default_format(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sub" / "result.sarif"
    proc = _scan(family, "--format", "sarif", "-o", str(out), "--report-dir", str(tmp_path),
                 "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert json.loads(out.read_text())["version"] == "2.1.0"
    assert not (tmp_path / "gate.sarif").exists() and proc.stdout == ""
    proc = _scan(family, "-o", "-", "--report-dir", str(tmp_path), "--quiet")
    assert json.loads(proc.stdout)["schema_version"] == 1  # -o without --format: json


@pytest.mark.parametrize("fmt", ["json,sarif", "markdown,json"])
def test_several_formats_with_output_is_a_usage_error(
    family: dict[str, Path], tmp_path: Path, fmt: str
) -> None:
    proc = _scan(family, "--format", fmt, "-o", "-", "--report-dir", str(tmp_path))
    assert_one_line_error(proc, "-o/--output takes one format", "2 (")
    assert proc.stdout == ""


# --- help and completion ---------------------------------------------------------------------


def _actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _actions(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            found.append((path, action))
    return found


def test_every_option_of_every_subcommand_has_help() -> None:
    from gate.cli.parser import build_parser

    actions = _actions(build_parser(), "gate")
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, a in actions
        if not (a.help or "").strip() or a.help == argparse.SUPPRESS
    ]
    assert not missing, missing
    options = {(p, s) for p, a in actions for s in a.option_strings}
    for command in ("gate scan", "gate ac", "gate ac-merge"):  # what the issue named
        for opt in ("--baseline", "--report-dir", "--format", "-o", "--output"):
            if (command, opt) in options or (opt == "--baseline" and command != "gate scan"):
                continue
            raise AssertionError(f"{command} lacks {opt}")


@pytest.mark.parametrize("shell", ["bash", "zsh", "tcsh"])
def test_completion_scripts(shell: str) -> None:
    proc = run_gate("completion", shell)
    assert proc.returncode == 0, proc.stderr
    assert "scan" in proc.stdout and "completion" in proc.stdout
    if shell != "tcsh":  # shtab's tcsh script completes commands, not their options
        assert "--baseline" in proc.stdout and "--report-dir" in proc.stdout


def test_help_does_not_import_shtab_and_starts_fast() -> None:
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from gate.cli import main\n"
        "main(['--help'])\n"
        "print('SHTAB=' + str('shtab' in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "SHTAB=False" in out.stdout
    assert "completion" in out.stdout


def test_bad_shell_is_a_usage_error() -> None:
    proc = run_gate("completion", "fish")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# --- SARIF and JUnit -------------------------------------------------------------------------


def test_sarif_rules_rank_and_levels_are_consistent(family: dict[str, Path]) -> None:
    from gate.report.formats import FORMATS

    report = fixed_report()
    doc = check_sarif(FORMATS["sarif"].render(report), report)
    run = doc["runs"][0]
    rules = {r["id"]: r for r in run["tool"]["driver"]["rules"]}
    for rule in rules.values():
        score = float(rule["properties"]["security-severity"])
        assert 0.0 <= score <= 10.0 and isinstance(rule["properties"]["security-severity"], str)
        assert rule["shortDescription"]["text"] != f"gate check: {rule['id']}"
        assert len(rule["fullDescription"]["text"]) > len(rule["shortDescription"]["text"])
    assert rules["baseline_size"]["defaultConfiguration"]["level"] == "warning"
    assert rules["fingerprint"]["defaultConfiguration"]["level"] == "error"
    # A rule's results never exceed its default level; a rule the policy fails on ranks
    # above one it only warns on.
    order = ["none", "note", "warning", "error"]
    for result in run["results"]:
        default = rules[result["ruleId"]]["defaultConfiguration"]["level"]
        assert order.index(result["level"]) <= order.index(default)
    sev = {k: float(r["properties"]["security-severity"]) for k, r in rules.items()}
    assert sev["fingerprint"] >= 7.0 > sev["baseline_size"]
    assert "invocations" not in run  # a relative path: nothing to warn about


def test_absolute_model_path_warns(family: dict[str, Path], tmp_path: Path) -> None:
    proc = _scan(family, "--format", "sarif", "--report-dir", str(tmp_path), "--quiet")
    assert proc.returncode == 1, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("gate: warning:")]
    assert len(warnings) == 1 and "absolute" in warnings[0], proc.stderr
    run = json.loads((tmp_path / "gate.sarif").read_text())["runs"][0]
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert notes[0]["level"] == "warning" and "file:///" in notes[0]["message"]["text"]
    # The same scan with a repository-relative path: no warning.
    rel = run_gate(
        "scan", "bad.pt", "--baseline", "baseline", "--format", "sarif", "--no-cache",
        "--report-dir", str(tmp_path / "rel"), "--quiet", cwd=family["dir"],
    )
    assert rel.returncode == 1 and "warning" not in rel.stderr, rel.stderr


def test_junit_warning_carries_its_message(family: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "junit.xml"
    proc = _scan(family, "--format", "junit", "-o", str(out), "--report-dir", str(tmp_path),
                 "--quiet")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(_scan(family, "-o", "-", "--report-dir", str(tmp_path)).stdout)
    warn = next(c for c in report["checks"] if c["status"] == "warn")  # baseline_size: 6 refs
    case = next(
        c for c in ET.parse(out).getroot().iter("testcase") if c.get("name") == warn["name"]
    )
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props == {"gate.status": "warn", "gate.message": warn["message"]}
    system_out = case.find("system-out")
    assert system_out is not None and system_out.text == f"WARNING: {warn['message']}"
    assert case.find("failure") is None and case.find("skipped") is None


# --- step summary ----------------------------------------------------------------------------


def _report_with_pictures() -> Any:
    from gate.report.schema import (
        ActivationClusteringReport,
        ClassReport,
        TriggerSearchReport,
    )

    ac = ActivationClusteringReport(
        layer="fc", data="train.npz", n_samples=100, labels=[0, 1],
        classes=[
            ClassReport(label=0, size=60, silhouette=0.5, flagged=True,
                        suspicious_indices=[1, 2], cluster_sizes=[58, 2]),
            ClassReport(label=1, size=40, silhouette=0.1, flagged=False,
                        suspicious_indices=[], cluster_sizes=[40]),
        ],
    )
    ts = TriggerSearchReport(status="ok", p_value=0.001, anomaly_score=0.999,
                             null="within_model", within_model_p_value=0.001,
                             suspected_target=0, most_suspicious_class=0, classes=[],
                             input_range=[0.0, 1.0], inputs="data")
    return fixed_report().model_copy(update={"activation_clustering": ac, "trigger_search": ts})


@pytest.mark.parametrize("with_run", [True, False])
def test_step_summary_has_no_relative_picture_links(tmp_path: Path, with_run: bool) -> None:
    import re

    from gate.ci import github
    from gate.report.formats import markdown

    report = _report_with_pictures()
    env = {"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(tmp_path / "s")}
    if with_run:
        env |= {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "o/r",
                "GITHUB_RUN_ID": "42"}
    pub = github.SYSTEM.publish(report, tmp_path, env)
    [(path, data)] = pub.appends
    assert path == tmp_path / "s"
    summary = data.decode()
    links = re.findall(r"\]\(([^)]*)\)", summary)
    assert all(link.startswith("https://") for link in links), links
    for name in ("ac-class-0-clusters.png", "ac-class-0-suspicious.png",
                 "trigger-search-class-0.png"):
        assert f"`{name}`" in summary
    assert ("https://github.com/o/r/actions/runs/42#artifacts" in links) == with_run
    assert "artifact" in summary
    # The plain summary.md sits next to the pictures: it keeps its relative links.
    assert "](ac-class-0-clusters.png)" in markdown.render(report)


# --- file modes ------------------------------------------------------------------------------


def test_files_respect_the_umask(family: dict[str, Path], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GITHUB_")}
    rdir, base = tmp_path / "rep", tmp_path / "base"
    refs = [str(family["dir"] / f"ref{s}.pt") for s in range(6)]
    cmd = (
        f"umask 022 && {sys.executable} -m gate scan {family['bad']} --baseline "
        f"{family['baseline']} --report-dir {rdir} --format markdown,json,sarif --quiet "
        f"--no-cache; {sys.executable} -m gate baseline build {' '.join(refs)} --out {base} "
        f"--input-shape {SHAPE} --quiet --no-cache"
    )
    proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    files = [*rdir.iterdir(), *base.iterdir()]
    assert {"report.json", "gate.sarif", "baseline.json"} <= {f.name for f in files}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, (f, oct(f.stat().st_mode))


# --- gate.ci ---------------------------------------------------------------------------------


def test_ci_registry_lists_each_system_once() -> None:
    from gate import ci

    names = [s.name for s in ci.SYSTEMS]
    assert names == ["github", "gitlab"]
    assert [s.name for s in ci.detected({"GITLAB_CI": "true"})] == ["gitlab"]
    assert [s.name for s in ci.detected({"GITHUB_ACTIONS": "true"})] == ["github"]
    assert ci.detected({}) == []


def test_gitlab_dotenv(family: dict[str, Path], tmp_path: Path) -> None:
    proc = _scan(family, "--report-dir", str(tmp_path / "gl"), "--quiet",
                 env={"GITLAB_CI": "true"})
    assert proc.returncode == 1, proc.stderr
    lines = (tmp_path / "gl" / "gate.env").read_text().splitlines()
    values = dict(line.split("=", 1) for line in lines)
    assert values["GATE_VERDICT"] == "fail" and values["GATE_REPORT_DIR"] == str(tmp_path / "gl")
    assert proc.stdout == ""  # GitLab gets no workflow commands
    plain = _scan(family, "--report-dir", str(tmp_path / "plain"), "--quiet")
    assert plain.returncode == 1 and not (tmp_path / "plain" / "gate.env").exists()


def test_a_new_ci_system_is_one_object_in_the_registry(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """What a new module would provide, registered with one line: the CLI writes its files,
    appends and commands without knowing it."""
    import contextlib

    from gate import ci
    from gate.ci.base import Publication
    from gate.cli import main

    class Fake:
        name = "fake"

        def detected(self, env: Any) -> bool:
            return env.get("FAKE_CI") == "1"

        def guard(self, env: Any, stream: Any) -> Any:
            return contextlib.nullcontext()

        def publish(self, report: Any, report_dir: Path, env: Any) -> Publication:
            return Publication(
                commands=[f"##fake verdict={report.verdict}"],
                appends=[(tmp_path / "fake-log", b"appended\n")],
                files={"fake.txt": report.verdict.encode()},
            )

    monkeypatch.setattr(ci, "SYSTEMS", (*ci.SYSTEMS, Fake()))
    monkeypatch.setenv("FAKE_CI", "1")
    for var in ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITLAB_CI"):
        monkeypatch.delenv(var, raising=False)
    rdir = tmp_path / "rep"
    code = main(["scan", str(family["bad"]), "--baseline", str(family["baseline"]),
                 "--report-dir", str(rdir), "--quiet", "--no-cache"])
    assert code == 1
    assert (rdir / "fake.txt").read_text() == "fail"
    assert (tmp_path / "fake-log").read_text() == "appended\n"
    assert capsys.readouterr().out.splitlines()[-1] == "##fake verdict=fail"


def test_demo_does_not_import_the_cli() -> None:
    code = (
        "import sys\nimport gate.demo.run\n"
        "print(sorted(m for m in sys.modules if m.startswith('gate.cli')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
