"""The one exception hierarchy that the CLI catches and turns into exit code 2."""

from __future__ import annotations


class GateError(Exception):
    """Base class for every error gate reports to the user as a one-line message."""

    exit_code: int = 2


class UsageError(GateError):
    """The command line is inconsistent (missing option, bad value)."""


class DataError(GateError):
    """A data file (``.npz``) is missing, unreadable or malformed."""


class ModelLoadError(GateError):
    """A model file could not be loaded (missing, corrupt, unsupported format)."""


class UnsafeModelError(ModelLoadError):
    """A model file would need code execution to load; it is refused, never run."""


class LayerError(GateError):
    """A requested layer does not exist or produced no usable activations."""


class BaselineError(GateError):
    """A baseline directory is missing, corrupt or was built for something else."""


class MismatchError(BaselineError):
    """The candidate does not belong to the family the baseline was built for."""


class SandboxError(GateError):
    """The model's sandboxed process crashed, hit a limit, timed out or misbehaved."""


class PolicyError(GateError):
    """A policy file is invalid (unknown key, wrong type, out-of-range value)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's text: library errors are often pages long."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
