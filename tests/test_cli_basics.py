from __future__ import annotations

import subprocess
import sys

from gate import __version__
from gate.cli import main
from tests.conftest import run_gate


def test_help_does_not_import_torch_or_sklearn() -> None:
    code = (
        "import sys\n"
        "from gate.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY=\n" in out.stdout, out.stdout
    assert "baseline" in out.stdout and "scan" in out.stdout


def test_version() -> None:
    proc = run_gate("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"gate {__version__}"


def test_main_returns_int_and_usage_errors_are_exit_2(capsys: object) -> None:
    assert main(["scan"]) == 2  # missing MODEL and --baseline
    assert main(["--help"]) == 0
    assert main([]) == 2


def test_unknown_subcommand_is_exit_2() -> None:
    proc = run_gate("frobnicate")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
