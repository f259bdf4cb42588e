"""Every model runs in a confined child process; gate itself never executes model code.

:func:`open_model` starts a child (gate.sandbox.child), has it load the file with the
format's loader and returns a proxy that forwards batches over pipes. The child has a
scrubbed environment, an empty private working directory, resource limits, a wall-clock
deadline (``--timeout``) and, where the kernel allows it, a seccomp filter; its own output
is captured and never reaches the CI log. See the README's threat model.
"""

from __future__ import annotations

from pathlib import Path

from gate.models.base import LoadedModel
from gate.sandbox.options import DEFAULT_TIMEOUT, SandboxOptions, current_options, use_sandbox
from gate.sandbox.process import ModelProcess, prestart_zygote, python_path

__all__ = [
    "DEFAULT_TIMEOUT",
    "SandboxOptions",
    "current_options",
    "open_model",
    "prestart",
    "use_sandbox",
]


_spare: list[ModelProcess] = []


def open_model(path: str | Path, more: bool = False) -> LoadedModel:
    """Load ``path`` in a new sandboxed child; the proxy behaves like the loaded model.

    Each model gets its own child, so one model cannot touch another's results. On Linux
    with the CPU, children are forked by the zygote (gate.sandbox.zygote), which imported
    torch once; elsewhere, with ``more`` (another model will follow, as in ``baseline
    build``), the next child starts now, importing torch while this one works.
    """
    from gate.models.arch import current_arch
    from gate.sandbox.proxy import SandboxedModel, SandboxedTextModel

    shown = str(path)
    options = current_options()
    proc = _take_spare(options, shown) or ModelProcess(options, shown)
    if more and not prestart_zygote(options):
        _spare.append(ModelProcess(options, "(spare)"))
    try:
        arch = current_arch()
        info = proc.call(
            "load",
            path=str(Path(path).absolute()),
            arch=None if arch is None else {"target": arch.target, "kwargs": arch.kwargs},
            python_path=None if arch is None else python_path(),
        )
        if not isinstance(info, dict):
            from gate.errors import SandboxError

            raise SandboxError(f"{shown}: the model process sent a malformed description")
        cls = SandboxedTextModel if info.get("text") is not None else SandboxedModel
        return cls(shown, proc, info)
    except BaseException:
        proc.close()
        raise


def prestart() -> None:
    """Start the zygote, or where it does not serve the first model's child, now, so that
    torch's import overlaps gate's own set-up (policy, baseline, data)."""
    if not _spare and not prestart_zygote(current_options()):
        _spare.append(ModelProcess(current_options(), "(spare)"))


def _take_spare(options: SandboxOptions, what: str) -> ModelProcess | None:
    while _spare:
        proc = _spare.pop()
        # The timeout may have changed since (a policy's timeout_seconds): the deadline is
        # set on claiming, but the CPU and memory limits were fixed at the child's start.
        if (
            proc.options.memory_mb == options.memory_mb
            and proc.options.device == options.device
            and proc.options.cpu_seconds() >= options.cpu_seconds()
        ):
            proc.options = options
            proc.claim(what)
            return proc
        proc.close()
    return None
