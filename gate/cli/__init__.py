"""Command-line entry point. Exit codes: 0 pass/warn, 1 policy failure, 2 usage or tool error."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import NoReturn

from gate.cli.parser import build_parser
from gate.errors import GateError

EXIT_PASS = 0
EXIT_FAIL = 1
EXIT_ERROR = 2


def set_threads(n: int) -> None:
    """Limit torch and the BLAS/OpenMP pools to ``n`` threads (before they start)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")  # otherwise torch reads OMP_NUM_THREADS when imported
    if torch is not None:
        torch.set_num_threads(n)


def _arch_context(args: argparse.Namespace) -> AbstractContextManager[object]:
    """--arch/--arch-kwargs for the command's weights-only model files (gate.models.arch)."""
    arch, kwargs = getattr(args, "arch", None), getattr(args, "arch_kwargs", None)
    if arch is None and kwargs is None:
        return contextlib.nullcontext()
    from gate.models.arch import use_arch

    return use_arch(arch, kwargs)


def _sandbox_context(args: argparse.Namespace) -> AbstractContextManager[object]:
    """--timeout/--memory-limit/--device for the command's sandboxed model processes."""
    if not hasattr(args, "timeout"):
        return contextlib.nullcontext()
    from gate.device import check_spec
    from gate.sandbox import DEFAULT_TIMEOUT, SandboxOptions, use_sandbox

    timeout = args.timeout if args.timeout is not None else DEFAULT_TIMEOUT
    device = check_spec(getattr(args, "device", "cpu"))
    return use_sandbox(SandboxOptions(timeout=timeout, memory_mb=args.memory_limit, device=device))


def _prestart_sandbox(args: argparse.Namespace) -> None:
    """A command that runs a model starts its child first (see gate.sandbox.prestart)."""
    if getattr(args, "model", None) or getattr(args, "models", None):
        from gate.sandbox import prestart

        prestart()


def run() -> NoReturn:
    """The ``gate`` command: :func:`main`, then exit with its code. The collector is frozen
    first: the interpreter's last collections over torch's many objects otherwise add
    ~0.6 s to every run (measured with bench/bench_scale.py). The exit is otherwise the
    usual one (atexit handlers, buffers flushed)."""
    code = main()
    gc.freeze()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    from gate import ci

    # Under a CI system everything gate prints runs inside its guard (GitHub: a
    # ::stop-commands:: wrap with a random token): a model path or layer name cannot become
    # a workflow command even if some output missed escaping. gate's own annotations are
    # printed after it ends. The guard writes where the human output goes: stderr when
    # stdout carries a report (`-o -`).
    args = sys.argv[1:] if argv is None else list(argv)
    stream = sys.stderr if _stdout_is_data(args) else sys.stdout
    with ci.guard(os.environ, stream):
        return _main(argv)


def _stdout_is_data(argv: Sequence[str]) -> bool:
    """Whether ``-o -`` / ``--output -`` asks for the report on stdout. Looked for before
    parsing because the guard must be up before argparse may print an (untrusted) name."""
    for i, arg in enumerate(argv):
        if arg == "--":
            return False
        if arg in ("-o", "--output") and i + 1 < len(argv) and argv[i + 1] == "-":
            return True
        if arg in ("-o-", "--output=-"):
            return True
    return False


def _main(argv: Sequence[str] | None) -> int:
    from gate.report.escape import human

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    threads = getattr(args, "threads", None) or getattr(args, "global_threads", None)
    if threads:
        set_threads(threads)
    try:
        with _arch_context(args), _sandbox_context(args):
            _prestart_sandbox(args)
            return int(args.handler(args))
    except GateError as exc:
        # Messages name files and layers: escaped so that the error stays one line.
        print(f"gate: error: {human(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("gate: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug in gate: one line, the traceback only on request
        if os.environ.get("GATE_DEBUG"):
            raise
        print(
            f"gate: internal error: {type(exc).__name__}: {human(exc)} "
            "(set GATE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR
